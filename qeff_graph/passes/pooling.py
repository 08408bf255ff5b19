"""Append sentence-embedding pooling to an encoder graph, as graph nodes.

sentence-transformers' ``Pooling`` (and ``Normalize``) modules, computed inside the program so
the device returns the embedding directly::

    mask  = Cast(attention_mask, float)[:, :, None]                       [B, S, 1]
    mean  = ReduceSum(h * mask, axis 1) / Max(ReduceSum(mask, axis 1), 1e-9)
    cls   = h[:, 0]
    max   = ReduceMax(Where(mask > 0, h, -1e9), axis 1)
    L2    = x / Max(ReduceL2(x, axis 1), 1e-12)                            (normalize=True)

``h`` is the ``last_hidden_state`` output ``[batch, sequence, hidden]``; the result is a new
output ``pooled`` ``[batch, hidden]``; ``last_hidden_state`` stays an output.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qeff_graph.errors import UnsupportedGraphError
from qeff_graph.ir.build import Builder
from qeff_graph.passes.registry import register

__all__ = ["Pooling", "POOLING_MODES"]

POOLING_MODES = ("mean", "cls", "max")
HIDDEN = "last_hidden_state"
POOLED = "pooled"


@register("pooling")
class Pooling(ir.passes.InPlacePass):
    """Append sentence-embedding pooling (mean | cls | max, optional L2 normalize) as an output.

    Expects: an encoder graph with inputs ``input_ids`` and ``attention_mask`` ``[batch,
    sequence]`` and a float output ``last_hidden_state`` ``[batch, sequence, hidden]``, and no
    ``pooled`` output yet. Guarantees: a new output ``pooled`` ``[batch, hidden]`` equal to
    sentence-transformers' Pooling (+ Normalize) of ``last_hidden_state`` over the positions
    where ``attention_mask`` is 1.
    """

    def __init__(self, pooling: str = "mean", normalize: bool = False):
        super().__init__()
        if pooling not in POOLING_MODES:
            raise UnsupportedGraphError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLING_MODES)}")
        self.pooling = pooling
        self.normalize = bool(normalize)
        self.stats: dict = {}

    def requires(self, model: ir.Model) -> None:
        graph = model.graph
        inputs = {v.name: v for v in graph.inputs}
        outputs = {v.name: v for v in graph.outputs}
        if POOLED in outputs:
            raise ir.passes.PreconditionError(f"the graph already has a {POOLED!r} output (pooled before)")
        missing = [n for n in ("input_ids", "attention_mask") if n not in inputs]
        if missing or HIDDEN not in outputs:
            raise ir.passes.PreconditionError(
                f"not an encoder graph: needs inputs input_ids, attention_mask and output {HIDDEN} "
                f"(missing: {', '.join(missing + ([HIDDEN] if HIDDEN not in outputs else []))})")
        hidden = outputs[HIDDEN]
        if hidden.shape is not None and hidden.shape.rank() != 3:
            raise ir.passes.PreconditionError(f"{HIDDEN} has rank {hidden.shape.rank()}, expected 3")
        if hidden.dtype not in (None, ir.DataType.FLOAT, ir.DataType.FLOAT16):
            raise ir.passes.PreconditionError(f"{HIDDEN} is {hidden.dtype}, expected a float tensor")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        hidden = next(v for v in graph.outputs if v.name == HIDDEN)
        mask_in = next(v for v in graph.inputs if v.name == "attention_mask")
        dtype = hidden.dtype or ir.DataType.FLOAT
        np_dtype = dtype.numpy()
        opset = model.opset_imports.get("", 18)
        b = Builder(graph, "pooling")

        def reduce(op: str, x: ir.Value, keepdims: int) -> ir.Value:
            # axes became an input of ReduceSum at opset 13, of the other reductions at 18
            if opset >= (13 if op == "ReduceSum" else 18):
                return b.op(op, x, b.i64(1), keepdims=keepdims)
            return b.op(op, x, axes=[1], keepdims=keepdims)

        unsqueezed = b.op("Unsqueeze", b.op("Cast", mask_in, to=dtype), b.i64(2)) if opset >= 13 else \
            b.op("Unsqueeze", b.op("Cast", mask_in, to=dtype), axes=[2])
        mask = unsqueezed  # [B, S, 1]
        if self.pooling == "mean":
            total = reduce("ReduceSum", b.op("Mul", hidden, mask), 0)
            count = b.op("Max", reduce("ReduceSum", mask, 0), b.const(np.array(1e-9, np_dtype)))
            pooled = b.op("Div", total, count)
        elif self.pooling == "cls":
            pooled = b.op("Gather", hidden, b.const(np.array(0, np.int64)), axis=1)
        else:
            keep = b.op("Greater", mask, b.const(np.array(0, np_dtype)))
            masked = b.op("Where", keep, hidden, b.const(np.array(-1e9, np_dtype)))
            pooled = reduce("ReduceMax", masked, 0)
        if self.normalize:
            norm = reduce("ReduceL2", pooled, 1)
            pooled = b.op("Div", pooled, b.op("Max", norm, b.const(np.array(1e-12, np_dtype))))
        pooled = b.op("Identity", pooled, name=POOLED)
        b.commit()
        pooled.dtype = dtype
        dims = hidden.shape.dims if hidden.shape is not None else ("batch_size", "sequence_length", None)
        pooled.shape = ir.Shape([dims[0], dims[2]])
        graph.outputs.append(pooled)
        graph.sort()
        self.stats = {"pooling": self.pooling, "normalize": self.normalize}
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        if not any(v.name == POOLED for v in model.graph.outputs):
            raise ir.passes.PostconditionError(f"no {POOLED!r} output after pooling")
