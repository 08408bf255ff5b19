"""Which cache tensors of a retained-state program ONNX Runtime may update in place.

A retained program writes each layer's cache with ``ScatterND(past_key.{i}, indices, new)``
whose output is the graph output ``past_key.{i}_RetainedState``. ONNX Runtime's ScatterND skips
its copy of the data input when the output buffer *is* the input buffer, so binding both to one
``OrtValue`` turns the per-step copy of the whole ``ctx_len`` cache into a write of the new rows
only (:class:`~qeff_graph.backends.ort.RetainedStateSession`).

That is exact only if nothing else reads the past input's *values*: a reader scheduled after the
scatter would see the new rows. So a cache input qualifies when its only readers are that
ScatterND (as data) and ``Shape`` nodes (which read no values), and the ScatterND output is the
matching ``_RetainedState`` graph output itself (not behind another node).
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx_ir as ir

__all__ = ["inplace_cache_inputs", "inplace_cache_inputs_of"]


def inplace_cache_inputs(model: ir.Model) -> set[str]:
    """Names of the cache inputs whose retained output may share the input's buffer."""
    graph = model.graph
    outputs = {v.name: v for v in graph.outputs}
    found = set()
    for value in graph.inputs:
        out = outputs.get(f"{value.name}_RetainedState")
        writer = out.producer() if out is not None else None
        if writer is None or writer.op_type != "ScatterND" or writer.inputs[0] is not value:
            continue
        readers = [(use.node, use.idx) for use in value.uses()]
        if all((node is writer and idx == 0) or node.op_type == "Shape" for node, idx in readers):
            found.add(value.name)
    return found


def inplace_cache_inputs_of(path: str | os.PathLike) -> set[str]:
    """:func:`inplace_cache_inputs` of an ``.onnx`` file (its graph only: no weight bytes are read)."""
    return inplace_cache_inputs(ir.load(Path(path)))
