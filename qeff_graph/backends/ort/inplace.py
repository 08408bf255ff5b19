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

After the ``ort-gqa`` lowering the writer is ``com.microsoft.GroupQueryAttention`` instead: past
key/value are its inputs 3/4 and present key/value (outputs 1/2) the ``_RetainedState`` outputs;
its CPU kernel writes only the new rows when the two share a buffer. The same rule holds: no
other node may read the past's values.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx_ir as ir

__all__ = ["inplace_cache_inputs", "inplace_cache_inputs_of", "rows_alone"]


def inplace_cache_inputs(model: ir.Model) -> set[str]:
    """Names of the cache inputs whose retained output may share the input's buffer."""
    graph = model.graph
    outputs = {v.name: v for v in graph.outputs}
    found = set()
    for value in graph.inputs:
        out = outputs.get(f"{value.name}_RetainedState")
        writer = out.producer() if out is not None else None
        if writer is None or _written_input(writer, out) is None \
                or writer.inputs[_written_input(writer, out)] is not value:
            continue
        readers = [(use.node, use.idx) for use in value.uses()]
        if all((node is writer and idx == _written_input(writer, out)) or node.op_type == "Shape"
               for node, idx in readers):
            found.add(value.name)
    return found


def _written_input(writer: ir.Node, out: ir.Value) -> int | None:
    """The input of ``writer`` that ``out`` (one of its outputs) updates in place, if it is a cache writer."""
    if writer.op_type == "ScatterND" and writer.domain in ("", "ai.onnx"):
        return 0
    if writer.op_type == "GroupQueryAttention" and writer.domain == "com.microsoft":
        return {1: 3, 2: 4}.get(list(writer.outputs).index(out))
    return None


def rows_alone(model: ir.Model) -> bool:
    """True when a step of more than one token must run one row at a time, its tokens at
    contiguous positions without pads: the ``ort-gqa`` lowering (GroupQueryAttention places a
    step's tokens at its row's ``seqlens_k - S + 1 ..`` and takes ``S > 1`` only for batch 1)."""
    return any(n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft" for n in model.graph)


def inplace_cache_inputs_of(path: str | os.PathLike) -> tuple[set[str], bool]:
    """``(inplace_cache_inputs, rows_alone)`` of an ``.onnx`` file (its graph only: no weight bytes are read)."""
    model = ir.load(Path(path))
    return inplace_cache_inputs(model), rows_alone(model)
