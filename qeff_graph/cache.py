"""Cache root and artifact paths.

Root: ``$QEFF_HOME``, else ``$XDG_CACHE_HOME/qeff_cache``, else ``~/.cache/qeff_cache``.
Exports live in ``<root>/<model-slug>/onnx/<hash>/`` and compiled programs in
``<root>/<model-slug>/qpc/<backend>-<hash>/``; each hash (16 hex digits of SHA-256) covers
every option that changes the artifact. Programs made from one export hard-link its weight
file (one copy on disk for every ctx_len / batch / prompt_len variant). An entry is reused
only after :func:`qeff_graph.artifact.check_files` agrees with its manifest; the temp folders
of killed builds are swept by :func:`sweep` at the start of every cached build.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from qeff_graph.errors import QeffGraphError

__all__ = ["cache_root", "model_slug", "options_hash", "export_dir", "program_dir", "sweep"]


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root; one-line error when it names something that is not a usable folder."""
    if cache_dir:
        root, origin = Path(cache_dir), "--cache-dir"
    elif os.environ.get("QEFF_HOME"):
        root, origin = Path(os.environ["QEFF_HOME"]), "$QEFF_HOME"
    elif os.environ.get("XDG_CACHE_HOME"):
        root, origin = Path(os.environ["XDG_CACHE_HOME"]) / "qeff_cache", "$XDG_CACHE_HOME/qeff_cache"
    else:
        root, origin = Path.home() / ".cache" / "qeff_cache", "~/.cache/qeff_cache"
    root = root.expanduser()
    existing = next((p for p in (root, *root.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise QeffGraphError(f"the cache {origin} = {root}: {existing} is a file, not a folder; point "
                             f"{origin} at a folder")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise QeffGraphError(f"the cache {origin} = {root} is not writable; point {origin} at a writable folder")
    return root


def model_slug(name: str) -> str:
    """A filesystem-safe name for a model reference (hub id, path or gguf file)."""
    base = name.rstrip("/")
    if os.path.sep in base and os.path.exists(base):
        base = os.path.basename(base)
    return re.sub(r"[^A-Za-z0-9_.-]+", "--", base).strip("-.") or "model"


def options_hash(**options) -> str:
    text = json.dumps(options, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def export_dir(slug: str, digest: str, cache_dir=None) -> Path:
    return cache_root(cache_dir) / slug / "onnx" / digest


def program_dir(slug: str, backend: str, digest: str, cache_dir=None) -> Path:
    return cache_root(cache_dir) / slug / "qpc" / f"{backend}-{digest}"


def sweep(cache_dir=None) -> list[Path]:
    """Remove the temp folders of killed builds anywhere in the cache (running builds stay)."""
    from qeff_graph.fs import sweep_stale

    root = cache_root(cache_dir)
    removed = []
    for kind in root.glob("*/*"):
        if kind.name in ("onnx", "qpc") and kind.is_dir():
            removed += sweep_stale(kind)
    return removed
