"""Cache root and artifact paths.

Root: ``$QEFF_HOME``, else ``$XDG_CACHE_HOME/qeff_cache``, else ``~/.cache/qeff_cache``.
Exports live in ``<root>/<model-slug>/onnx/<hash>/`` and compiled programs in
``<root>/<model-slug>/qpc/<backend>-<hash>/``; each hash (16 hex digits of SHA-256) covers
every option that changes the artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

__all__ = ["cache_root", "model_slug", "options_hash", "export_dir", "program_dir"]


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir:
        return Path(cache_dir)
    if os.environ.get("QEFF_HOME"):
        return Path(os.environ["QEFF_HOME"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "qeff_cache"
    return Path.home() / ".cache" / "qeff_cache"


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
