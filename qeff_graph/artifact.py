"""What an artifact folder (an export, a program) holds, and whether it still holds it.

An artifact's manifest (``export.json``, ``qeff_graph.json``) lists every file under
``"files"`` with its size and SHA-256. :func:`check_files` compares a folder with that table:
sizes always, hashes of files up to :data:`CHEAP_HASH_BYTES` always (graphs, tokenizers,
configs) and of every file with ``hashes=True`` (``--verify-cache``). A mismatch is reported as
one line naming the file, so a cache can rebuild the entry instead of reusing it.
"""

from __future__ import annotations

import errno
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


_BLOCK = 1 << 24
_ZEROS = bytes(_BLOCK)
_DIGESTS: dict[tuple, str] = {}  # (dev, inode, size, mtime) -> sha256, for this process


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file. Holes of sparse files are hashed as zeros without being read, and a
    file (same inode, size and mtime) is hashed once per process."""
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = _sha256(path, st.st_size)
    return _DIGESTS[key]


def _sha256(path: str | os.PathLike, size: int) -> str:
    h = hashlib.sha256()
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        fd, pos = f.fileno(), 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
                end = os.lseek(fd, start, os.SEEK_HOLE)
            except OSError as exc:  # ENXIO: only a hole is left; else no SEEK_DATA: read it all
                start = end = size if exc.errno == errno.ENXIO else pos
                end = size
            for n in _chunks(start - pos):  # a hole reads as zeros
                h.update(_ZEROS[:n] if n < _BLOCK else _ZEROS)
            os.lseek(fd, start, os.SEEK_SET)
            left = end - start
            while left > 0:
                n = f.readinto(view[: min(left, _BLOCK)])
                if not n:
                    break
                h.update(view[:n])
                left -= n
            pos = end
    return h.hexdigest()


def _chunks(n: int):
    while n > 0:
        yield min(n, _BLOCK)
        n -= _BLOCK


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
        raise BrokenArtifactError(f"{directory}: its manifest lists no files (made by an older qeff-graph or "
                                  "damaged); rebuild it from its export (`qeff-graph compile EXPORT -o DIR`)")
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
