"""Turn a dynamic KV cache (concat past + new) into a retained one (scatter into a fixed cache).

For every layer, ``present = Concat(past, new, axis=2)`` becomes

    past_key.{i}  [batch, kv_heads, ctx_len, head_dim]
          │
    ScatterND(past, indices, new) ──▶ past_key.{i}_RetainedState   (graph output)
          │
          └──▶ the attention (everything that read the concat)

with ``indices[b, h, s] = (b, h, position_ids[b, s])`` built once and shared by all layers.
A padding token (position ``-1``) writes zeros into slot ``ctx_len - 1`` (ScatterND counts
negative indices from the end): whatever the pad's hidden state (even NaN), the slot stays
neutral; no query at a position ``< ctx_len - 1`` sees it, and a real token overwrites it if
the sequence ever gets there.

``kv_dtype="float16"`` makes the cache IO float16: new rows are cast before the scatter and the
attention reads the scattered cache cast back to the compute type.

``continuous_batching=True`` adds ``batch_index`` ``[batch, 1]``: the cache has
``full_batch_size`` rows, row ``b`` of the input writes and reads cache row ``batch_index[b]``.
An ONNX ``Attention`` op with ``past_key``/``past_value`` inputs is handled the same way (its
4-D key/value are scattered, the op then attends over the whole cache).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qeff_graph.errors import PreconditionError, QeffGraphError, UnsupportedGraphError
from qeff_graph.ir.analysis import KVEntry, find_io, find_kv_cache
from qeff_graph.ir.build import Builder
from qeff_graph.passes.registry import register

__all__ = ["KVRetention", "KV_DTYPES"]

logger = logging.getLogger(__name__)

KV_DTYPES = {"float32": ir.DataType.FLOAT, "float16": ir.DataType.FLOAT16}


@register("kv-retention")
class KVRetention(ir.passes.InPlacePass):
    """Retain the KV cache in fixed ctx_len buffers written with ScatterND at position_ids.

    Requires: a dynamic-KV graph (past inputs concatenated along axis 2 into present outputs,
    or ONNX Attention with past/present) with ``input_ids`` and ``position_ids`` inputs.
    Ensures: inputs ``past_key.{i}``/``past_value.{i}`` ``[batch_size|full_batch_size,
    kv_heads, ctx_len, head_dim]`` in ``kv_dtype``, outputs ``past_key.{i}_RetainedState``/
    ``past_value.{i}_RetainedState`` of the same shape/dtype; no Concat grows the cache.
    """

    def __init__(self, kv_dtype: str = "float32", continuous_batching: bool = False):
        super().__init__()
        if kv_dtype not in KV_DTYPES:
            raise QeffGraphError(f"--kv-dtype {kv_dtype!r} is not supported; use float32 or float16")
        self.kv_dtype = kv_dtype
        self.continuous_batching = continuous_batching

    def requires(self, model: ir.Model) -> None:
        kv = find_kv_cache(model)
        if kv.retained:
            raise PreconditionError("the KV cache is already retained (this is a retained-state program); "
                                    "pass the original export")
        if find_io(model, kv).position_ids is None:
            raise PreconditionError("graph has no position_ids input; re-export the model with position_ids")

    def ensures(self, model: ir.Model) -> None:
        kv = find_kv_cache(model)
        names = {v.name for v in model.graph.outputs}
        for layer in kv.layers:
            for kind, entry in (("key", layer.key), ("value", layer.value)):
                if entry.writer.op_type != "ScatterND" or f"past_{kind}.{layer.index}_RetainedState" not in names:
                    raise ir.passes.PostconditionError(f"layer {layer.index} {kind} cache is not retained")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        kv = find_kv_cache(model)
        io = find_io(model, kv)
        kv_type = KV_DTYPES[self.kv_dtype]
        batch_dim = "full_batch_size" if self.continuous_batching else "batch_size"

        b = Builder(graph, "kv-retention")
        batch_index = None
        if self.continuous_batching:
            batch_index = io.batch_index or ir.Value(
                name="batch_index", type=ir.TensorType(ir.DataType.INT64),
                shape=ir.Shape(["batch_size", 1]),
            )
            if io.batch_index is None:
                graph.inputs.append(batch_index)
        indices_cache: dict[int, ir.Value] = {}

        def indices_for(past: ir.Value) -> ir.Value:
            """[B, H, S, 3] scatter indices (b, h, position_ids[b, s]) for cache ``past``."""
            heads_dim = past.shape[1] if past.shape is not None else None
            key = heads_dim if isinstance(heads_dim, int) else id(past)
            if key not in indices_cache:
                pos_shape = b.op("Shape", io.position_ids)  # [B, S]
                if isinstance(heads_dim, int):
                    nh = b.const(heads_dim, "int64")
                else:
                    nh = b.op("Squeeze", b.op("Shape", past, start=1, end=2), b.i64(0))
                shape4 = b.op("Concat", b.op("Slice", pos_shape, b.i64(0), b.i64(1)),
                              b.op("Unsqueeze", nh, b.i64(0)),
                              b.op("Slice", pos_shape, b.i64(1), b.i64(2)), b.i64(1), axis=0)
                if batch_index is not None:
                    batch = b.op("Reshape", batch_index, b.i64(-1, 1, 1, 1))
                else:
                    nb = b.op("Squeeze", b.op("Slice", pos_shape, b.i64(0), b.i64(1)), b.i64(0))
                    batch = b.op("Reshape", b.op("Range", b.const(0, "int64"), nb, b.const(1, "int64")),
                                 b.i64(-1, 1, 1, 1))
                heads = b.op("Reshape", b.op("Range", b.const(0, "int64"), nh, b.const(1, "int64")),
                             b.i64(1, -1, 1, 1))
                pos = b.op("Unsqueeze", io.position_ids, b.i64(1, 3))
                parts = [b.op("Expand", t, shape4) for t in (batch, heads, pos)]
                indices_cache[key] = b.op("Concat", *parts, axis=-1)
            return indices_cache[key]

        real: list[ir.Value] = []

        def real_rows() -> ir.Value:
            """[B, 1, S, 1] bool: the token is real (position_ids >= 0), not a pad."""
            if not real:
                keep = b.op("GreaterOrEqual", io.position_ids, b.const(np.array(0, np.int64)))
                real.append(b.op("Unsqueeze", keep, b.i64(1, 3)))
            return real[0]

        def retain(entry: KVEntry, new: ir.Value, kind: str, layer: int) -> ir.Value:
            """Scatter ``new`` into the cache; return what the attention should read."""
            compute_type = new.dtype or entry.past.dtype or ir.DataType.FLOAT
            past = entry.past
            past.name = f"past_{kind}.{layer}"
            past.dtype = kv_type
            dims = list(past.shape.dims) if past.shape is not None else [None] * 4
            past.shape = ir.Shape([batch_dim, dims[1], "ctx_len", dims[3]])
            # a pad (position -1) writes zeros: whatever its hidden state (NaN, Inf), the slot it
            # lands in stays neutral for every query that may later see it
            rows = b.op("Where", real_rows(), new, b.op("CastLike", b.const(np.array(0, np.float32)), new))
            rows = rows if compute_type == kv_type else b.op("Cast", rows, to=kv_type)
            full = b.op("ScatterND", past, indices_for(past), rows,
                        name=f"past_{kind}.{layer}_RetainedState")
            full.dtype, full.shape = kv_type, ir.Shape(past.shape.dims)
            index = list(graph.outputs).index(entry.present)
            graph.outputs[index] = full
            read = full
            if batch_index is not None:
                read = b.op("Gather", read, b.op("Reshape", batch_index, b.i64(-1)), axis=0)
            if compute_type != kv_type:
                read = b.op("Cast", read, to=compute_type)
            return read

        concat_like: list[ir.Node] = []
        for layer in kv.layers:
            for kind, entry in (("key", layer.key), ("value", layer.value)):
                writer = entry.writer
                if writer.op_type == "Concat":
                    read = retain(entry, entry.new, kind, layer.index)
                    ir.convenience.replace_all_uses_with(writer.outputs[0], read)
                    concat_like.append(writer)
                elif writer.op_type == "Attention":
                    self._retain_attention(b, entry, kind, layer.index, retain)
                else:
                    raise UnsupportedGraphError(f"cannot retain cache written by {writer.op_type}")
        b.commit()
        graph.remove([n for n in concat_like if not any(o.uses() for o in n.outputs)], safe=True)
        for value in (io.input_ids, io.position_ids):
            if value is not None:
                value.shape = ir.Shape(["batch_size", "seq_len"])
        graph.sort()
        self.stats = {"layers": len(kv.layers), "scatters": 2 * len(kv.layers)}
        return ir.passes.PassResult(model, modified=True)

    @staticmethod
    def _retain_attention(b: Builder, entry: KVEntry, kind: str, layer: int, retain) -> None:
        node = entry.writer
        slot = 1 if kind == "key" else 2
        new = node.inputs[slot]
        if new is None or new.shape is None or new.shape.rank() != 4:
            raise UnsupportedGraphError(
                "ONNX Attention with past inputs needs 4-D key/value [batch, heads, seq, dim] "
                "to retain the cache; re-export with opset 23 4-D attention"
            )
        read = retain(entry, new, kind, layer)
        node.replace_input_with(slot, read)
        node.replace_input_with(slot + 3, None)
