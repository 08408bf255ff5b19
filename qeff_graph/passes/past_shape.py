"""Keep the exporter's shape arithmetic valid once the cache has a fixed ``ctx_len``.

Exporters read the past length off the cache (``Shape(past_key_values.0.key)[2]``) and use it
for the causal mask, GQA ``Expand``/``Reshape`` targets, rotary slicing and ``total = past +
seq``. After :mod:`kv_retention` the cache is ``ctx_len`` long, so those reads would be wrong.
This pass replaces every such ``Shape(past)`` by a *virtual* shape

    [batch, kv_heads, ctx_len - seq_len, head_dim]

(``batch`` and ``seq_len`` from ``input_ids``), so ``past + seq == ctx_len`` wherever the
exporter computes a total length, and the batch is the input batch even when the cache has
``full_batch_size`` rows (continuous batching). ``start``/``end`` attributes of the Shape are
honoured.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from qeff_graph.errors import PreconditionError
from qeff_graph.ir.analysis import find_io, find_kv_cache
from qeff_graph.ir.build import Builder, is_qeff_node
from qeff_graph.passes.registry import register

__all__ = ["PastShape"]

logger = logging.getLogger(__name__)


@register("past-shape")
class PastShape(ir.passes.InPlacePass):
    """Replace Shape(past cache) with a virtual [batch, kv_heads, ctx_len - seq_len, head_dim].

    Requires: a graph with a KV cache (dynamic or retained) and an ``input_ids`` input; at run
    time the cache inputs are ``ctx_len`` long (i.e. run together with ``kv-retention``).
    Ensures: no node outside qeff-graph's own reads the shape of a cache input directly;
    every former read yields the virtual shape (same rank, same slice).
    """

    def requires(self, model: ir.Model) -> None:
        if find_io(model, find_kv_cache(model)).input_ids is None:
            raise PreconditionError("graph has no input_ids input; cannot derive seq_len")

    def ensures(self, model: ir.Model) -> None:
        pasts = set(find_kv_cache(model).past_inputs)
        left = [n.name for n in model.graph if n.op_type == "Shape" and not is_qeff_node(n) and n.inputs[0] in pasts]
        if left:
            raise ir.passes.PostconditionError(f"shape reads of the cache left: {left[:3]}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        kv = find_kv_cache(model)
        io = find_io(model, kv)
        pasts = set(kv.past_inputs)
        targets = [
            n for n in graph
            if n.op_type == "Shape" and not is_qeff_node(n) and n.inputs[0] in pasts
        ]
        self.stats = {"shape_reads_replaced": len(targets)}
        if not targets:
            return ir.passes.PassResult(model, modified=False)

        b = Builder(graph, "past-shape")
        batch = b.op("Shape", io.input_ids, start=0, end=1)
        seq = b.op("Shape", io.input_ids, start=1, end=2)
        dims_cache: dict[int, list[ir.Value]] = {}

        def virtual_dims(past: ir.Value) -> list[ir.Value]:
            if id(past) not in dims_cache:
                heads = b.op("Shape", past, start=1, end=2)
                ctx = b.op("Shape", past, start=2, end=3)
                head_dim = b.op("Shape", past, start=3, end=4)
                dims_cache[id(past)] = [batch, heads, b.op("Sub", ctx, seq), head_dim]
            return dims_cache[id(past)]

        for node in targets:
            rank = 4
            start = node.attributes.get_int("start", 0)
            end = node.attributes.get_int("end", rank)
            start = max(0, start + rank if start < 0 else start)
            end = min(rank, end + rank if end < 0 else end)
            dims = virtual_dims(node.inputs[0])[start:end]
            if not dims:
                out = b.const([], dtype="int64")
            elif len(dims) == 1:
                out = b.op("Identity", dims[0])
            else:
                out = b.op("Concat", *dims, axis=0)
            old = node.outputs[0]
            old.replace_all_uses_with(out, replace_graph_outputs=True)
            name, old.name = old.name, None
            out.name = name
        b.commit()
        graph.remove(targets, safe=True)
        graph.sort()
        logger.info("replaced %d shape reads of the cache", len(targets))
        return ir.passes.PassResult(model, modified=True)
