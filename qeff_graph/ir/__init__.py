"""IR layer: load/save over onnx_ir, graph-building helpers and KV-cache analysis.

Nothing here reads weight bytes.
"""

from qeff_graph.ir.analysis import KVCache, KVLayer, ModelIO, find_io, find_kv_cache
from qeff_graph.ir.build import Builder
from qeff_graph.ir.io import (
    external_files,
    load,
    read_tensor,
    save,
    weight_bytes,
    write_model_files,
)

__all__ = [
    "Builder",
    "KVCache",
    "KVLayer",
    "ModelIO",
    "external_files",
    "find_io",
    "find_kv_cache",
    "load",
    "save",
    "weight_bytes",
    "write_model_files",
    "read_tensor",
]
