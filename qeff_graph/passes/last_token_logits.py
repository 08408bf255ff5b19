"""Compute logits only for each row's last valid position.

The hidden state entering the LM head is gathered at ``argmax(position_ids[b])`` (the last
real token of the row: pads are ``-1``) *before* the projection, so the head runs on one
position per row instead of ``seq_len`` — ``logits`` becomes ``[batch, 1, vocab]``.

The LM head is found by walking back from the ``logits`` output through scaling/soft-capping
(``Mul``/``Div``/``Add`` with a constant, ``Tanh``, ``Cast``) to a ``MatMul``/``Gemm`` whose
other operand is a weight.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from qeff_graph.errors import UnsupportedGraphError
from qeff_graph.ir.analysis import find_io, find_kv_cache, is_weight
from qeff_graph.ir.build import Builder, is_qeff_node
from qeff_graph.passes.registry import register

__all__ = ["LastTokenLogits"]

logger = logging.getLogger(__name__)

_ELEMENTWISE = {"Mul", "Div", "Add", "Sub", "Tanh", "Cast", "Identity"}


def find_lm_head(logits: ir.Value) -> tuple[ir.Node, int]:
    """Return (MatMul node, index of its hidden-state input) that produces ``logits``."""
    value = logits
    for _ in range(12):
        node = value.producer()
        if node is None:
            break
        if node.op_type in ("MatMul", "Gemm") and len(node.inputs) >= 2:
            a, w = node.inputs[0], node.inputs[1]
            if is_weight(w) and not is_weight(a):
                return node, 0
            if is_weight(a) and not is_weight(w):
                return node, 1
            break
        if node.op_type not in _ELEMENTWISE:
            break
        dynamic = [v for v in node.inputs if v is not None and not is_weight(v)]
        if len(dynamic) != 1:
            break
        value = dynamic[0]
    raise UnsupportedGraphError(
        f"cannot find the LM head (a MatMul with a weight) producing {logits.name!r}; "
        "run without last-token-logits or report the graph layout"
    )


@register("last-token-logits")
class LastTokenLogits(ir.passes.InPlacePass):
    """Project only each row's last valid position: logits become [batch, 1, vocab].

    Expects: a causal-LM graph with a ``position_ids`` input and ``logits`` ``[batch, seq,
    vocab]`` produced by a MatMul/Gemm LM head on ``[batch, seq, hidden]``.
    Guarantees: ``logits[b, 0]`` equals the original ``logits[b, argmax(position_ids[b])]``.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        try:
            kv = find_kv_cache(model)
        except UnsupportedGraphError:
            kv = None  # a graph without cache (e.g. an encoder-style LM head) works too
        io = find_io(model, kv)
        if io.logits is None or io.position_ids is None:
            raise UnsupportedGraphError("last-token-logits needs a logits output and position_ids")
        head, hidden_index = find_lm_head(io.logits)
        hidden = head.inputs[hidden_index]
        producer = hidden.producer()
        if producer is not None and is_qeff_node(producer):
            self.stats = {"gathered": 0}
            return ir.passes.PassResult(model, modified=False)
        b = Builder(graph, "last-token-logits")
        last = b.op("ArgMax", io.position_ids, axis=1, keepdims=1)  # [B, 1]
        picked = b.op("GatherND", hidden, last, batch_dims=1)  # [B, hidden]
        head.replace_input_with(hidden_index, b.op("Unsqueeze", picked, b.i64(1)))
        b.commit()
        if io.logits.shape is not None and io.logits.shape.rank() == 3:
            io.logits.shape = ir.Shape([io.logits.shape[0], 1, io.logits.shape[2]])
        graph.sort()
        self.stats = {"gathered": 1}
        return ir.passes.PassResult(model, modified=True)
