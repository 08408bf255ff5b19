"""Memory the KV cache will need, checked before any long work.

``bytes = rows × layers × 2 (key, value) × kv_heads × ctx_len × head_dim × bytes per element``,
times the buffers the runtime keeps (two with IO binding: it reads one and writes the other).
"""

from __future__ import annotations

import os

from qeff_graph.errors import QeffGraphError

__all__ = ["kv_cache_bytes", "available_memory", "check_kv_cache_fits"]

_ITEMSIZE = {"float32": 4, "float16": 2}


def kv_cache_bytes(*, rows: int, layers: int, kv_heads: int, ctx_len: int, head_dim: int,
                   kv_dtype: str = "float32", buffers: int = 2) -> int:
    return rows * layers * 2 * kv_heads * ctx_len * head_dim * _ITEMSIZE[kv_dtype] * buffers


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (bytes), else physical pages × page size, else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def check_kv_cache_fits(*, rows: int, layers: int, kv_heads: int, ctx_len: int, head_dim: int,
                        kv_dtype: str = "float32", buffers: int = 2) -> int:
    """The cache's bytes; raises a one-line error when they exceed the available memory."""
    need = kv_cache_bytes(rows=rows, layers=layers, kv_heads=kv_heads, ctx_len=ctx_len,
                          head_dim=head_dim, kv_dtype=kv_dtype, buffers=buffers)
    have = available_memory()
    if have is not None and need > have:
        raise QeffGraphError(
            f"the KV cache needs {_gib(need)} ({rows} rows × {layers} layers × 2 × {kv_heads} kv heads × "
            f"ctx_len {ctx_len} × head_dim {head_dim} × {kv_dtype}, {buffers} buffers) but only "
            f"{_gib(have)} of memory is available; lower --ctx-len or --batch-size, or use --kv-dtype float16")
    return need
