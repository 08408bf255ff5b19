"""What an artifact folder (an export, a program) holds, and whether it still holds it.

An artifact's manifest (``export.json``, ``qeff_graph.json``) lists every file under
``"files"`` with its size and SHA-256. :func:`check_files` compares a folder with that table:
sizes always, hashes of files up to :data:`CHEAP_HASH_BYTES` always (graphs, tokenizers,
configs) and of every file with ``hashes=True`` (``--verify-cache``). A mismatch is reported as
one line naming the file, so a cache can rebuild the entry instead of reusing it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from qeff_graph.errors import QeffGraphError

__all__ = ["BrokenArtifactError", "CHEAP_HASH_BYTES", "check_files", "file_sha256", "file_table",
           "read_json", "lists_file"]

CHEAP_HASH_BYTES = 16 * 2**20


class BrokenArtifactError(QeffGraphError):
    """An artifact folder does not match its manifest (missing, truncated or changed file)."""


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_table(directory: str | os.PathLike, *, exclude: tuple[str, ...] = (),
               known: dict[str, dict] | None = None) -> dict[str, dict]:
    """``{relative path: {"size", "sha256"}}`` for every regular file under ``directory``.

    ``known`` supplies hashes already computed (e.g. of a hard-linked weight file whose source
    manifest lists it) for files of the same size, so big files are not read twice.
    """
    from qeff_graph.fs import iter_files

    directory = Path(directory)
    table = {}
    for rel in iter_files(directory):
        name = rel.as_posix()
        if name in exclude:
            continue
        size = (directory / rel).stat().st_size
        hint = (known or {}).get(name)
        digest = hint["sha256"] if hint and hint.get("size") == size else file_sha256(directory / rel)
        table[name] = {"size": size, "sha256": digest}
    return table


def read_json(path: str | os.PathLike, what: str) -> dict:
    """A JSON object from ``path``; a missing, unreadable or invalid file is one line."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BrokenArtifactError(f"{path} is missing ({what})") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not valid JSON"
        raise BrokenArtifactError(f"{path} cannot be read ({reason}); the {what} is damaged") from None
    if not isinstance(data, dict):
        raise BrokenArtifactError(f"{path} is not a JSON object; the {what} is damaged")
    return data


def check_files(directory: str | os.PathLike, files: dict, *, hashes: bool = False) -> None:
    """Raise :class:`BrokenArtifactError` naming the first file that differs from ``files``."""
    directory = Path(directory)
    if not isinstance(files, dict) or not files:
        raise BrokenArtifactError(f"{directory}: its manifest lists no files (made by an older "
                                  "qeff-graph or damaged)")
    for name, entry in sorted(files.items()):
        path = directory / name
        try:
            size = path.stat().st_size
        except OSError:
            raise BrokenArtifactError(f"{path} is missing") from None
        if size != entry.get("size"):
            raise BrokenArtifactError(f"{path} has {size} bytes, its manifest says {entry.get('size')} "
                                      "(truncated or replaced)")
        if (hashes or size <= CHEAP_HASH_BYTES) and file_sha256(path) != entry.get("sha256"):
            raise BrokenArtifactError(f"{path} does not match the SHA-256 in its manifest (changed or corrupted)")


def lists_file(path: str | os.PathLike) -> bool:
    """True when ``path`` is listed by the qeff-graph manifest of its own folder (a file the
    tool wrote itself, e.g. a weight file it hard-linked between cache entries)."""
    path = Path(path)
    for manifest in ("qeff_graph.json", "export.json"):
        try:
            files = json.loads((path.parent / manifest).read_text()).get("files") or {}
        except (OSError, ValueError, AttributeError):
            continue
        if path.name in files:
            return True
    return False
