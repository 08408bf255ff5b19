"""Compute logits only for each row's last valid position (or, for speculative decoding, for
every position of a short verify step).

The hidden state entering the LM head is gathered at ``argmax(position_ids[b])`` (the last
real token of the row: pads are ``-1``) *before* the projection, so the head runs on one
position per row instead of ``seq_len`` — ``logits`` becomes ``[batch, 1, vocab]``.

With ``num_speculative_tokens=K`` the gather keeps ``n`` positions, computed in the graph from
the step's ``seq_len`` S::

    keep = S <= K + 1                      one verify (or decode) step: every position
    n    = keep ? S : 1                    a longer (prefill) step: the last valid one only
    idx  = (keep ? 0 : argmax(position_ids)) + arange(n)          [batch, n]

so ``logits`` is ``[batch, n, vocab]``: ``[batch, K+1, vocab]`` for the verify step (position j's
logits at index j), ``[batch, 1, vocab]`` for decode and for prefill chunks longer than K+1.

The LM head is found by walking back from the ``logits`` output through scaling/soft-capping
(``Mul``/``Div``/``Add`` with a constant, ``Tanh``, ``Cast``) to a ``MatMul``/``Gemm`` whose
other operand is a weight.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from qeff_graph.errors import PreconditionError, QeffGraphError, UnsupportedGraphError
from qeff_graph.ir.analysis import find_io, find_kv_cache, is_weight
from qeff_graph.ir.build import Builder, is_qeff_node
from qeff_graph.passes.registry import register

__all__ = ["LastTokenLogits", "VERIFY_POSITIONS_KEY"]

VERIFY_POSITIONS_KEY = "qeff_graph.verify_positions"  # model metadata: K+1 when all positions are kept

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


def _io(model: ir.Model):
    try:
        kv = find_kv_cache(model)
    except UnsupportedGraphError:
        kv = None  # a graph without cache (e.g. an encoder-style LM head) works too
    return find_io(model, kv)


@register("last-token-logits")
class LastTokenLogits(ir.passes.InPlacePass):
    """Project only each row's last valid position: logits become [batch, 1, vocab] (speculative: all of a <= K+1 step).

    Expects: a causal-LM graph with a ``position_ids`` input and ``logits`` ``[batch, seq,
    vocab]`` produced by a MatMul/Gemm LM head on ``[batch, seq, hidden]``.
    Guarantees: ``logits[b, 0]`` equals the original ``logits[b, argmax(position_ids[b])]``;
    with ``num_speculative_tokens=K``, a step of ``seq_len <= K+1`` keeps every position
    (``logits[b, j]`` is the original ``logits[b, j]``) and a longer one only the last valid.
    """

    def __init__(self, num_speculative_tokens: int | None = None):
        super().__init__()
        k = num_speculative_tokens
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise QeffGraphError(f"--num-speculative-tokens must be an integer >= 1, got {k!r}")
        self.num_speculative_tokens = k
        self.stats: dict = {}

    def requires(self, model: ir.Model) -> None:
        io = _io(model)
        if io.logits is None or io.position_ids is None:
            raise PreconditionError("last-token-logits needs a logits output and a position_ids input")
        if io.logits.shape is not None and io.logits.shape.rank() != 3:
            raise PreconditionError(f"logits has rank {io.logits.shape.rank()}, expected 3 "
                                              "([batch, seq_len, vocab])")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        io = _io(model)
        head, hidden_index = find_lm_head(io.logits)
        hidden = head.inputs[hidden_index]
        producer = hidden.producer()
        if producer is not None and is_qeff_node(producer):
            if (producer.op_type == "GatherND") != (self.num_speculative_tokens is not None):
                raise PreconditionError("the logits were already gathered for another --num-speculative-tokens; "
                                        "start from the original export")
            self.stats = {"gathered": 0}
            return ir.passes.PassResult(model, modified=False)
        b = Builder(graph, "last-token-logits")
        last = b.op("ArgMax", io.position_ids, axis=1, keepdims=1)  # [B, 1]
        k = self.num_speculative_tokens
        if k is None:
            picked = b.op("GatherND", hidden, last, batch_dims=1)  # [B, hidden]
            head.replace_input_with(hidden_index, b.op("Unsqueeze", picked, b.i64(1)))
            kept: int | str = 1
        else:
            seq = b.op("Shape", io.position_ids, start=1, end=2)  # [1]: S
            keep = b.op("LessOrEqual", seq, b.i64(k + 1))  # [1]
            n = b.op("Where", keep, seq, b.i64(1))  # [1]
            start = b.op("Where", keep, b.i64(0), last)  # [B, 1]
            steps = b.op("Range", b.const(0, "int64"), b.op("Squeeze", n, b.i64(0)), b.const(1, "int64"))
            index = b.op("Add", start, b.op("Unsqueeze", steps, b.i64(0)))  # [B, n]
            picked = b.op("GatherND", hidden, b.op("Unsqueeze", index, b.i64(2)), batch_dims=1)  # [B, n, hidden]
            head.replace_input_with(hidden_index, picked)
            kept = "num_logits"
            # for runtimes that split a step (ort-gqa programs run steps of S > 1 row by row)
            model.metadata_props[VERIFY_POSITIONS_KEY] = str(k + 1)
        b.commit()
        if io.logits.shape is not None and io.logits.shape.rank() == 3:
            io.logits.shape = ir.Shape([io.logits.shape[0], kept, io.logits.shape[2]])
        graph.sort()
        self.stats = {"gathered": 1} if k is None else {"gathered": 1, "verify_positions": k + 1}
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        io = _io(model)
        head, hidden_index = find_lm_head(io.logits)
        producer = head.inputs[hidden_index].producer()
        if producer is None or not is_qeff_node(producer):
            raise ir.passes.PostconditionError("the LM head does not read the gathered hidden state")
