"""A residual ``Add`` and the RMSNorm that reads it as ONNX Runtime's ``SkipSimplifiedLayerNormalization``
(``ort-skip-norm``, ONNX Runtime lowering).

A pre-norm transformer block ends each half with ``h = x + f(x)`` and normalizes ``h`` for the
next half while ``h`` itself goes on as the residual. After ``custom-rmsnorm`` (target ``ort``)
that is::

    a ─┐
       Add ─▶ h ─[Cast to h's own type]─▶ SimplifiedLayerNormalization(·, gamma) ─▶ y
    b ─┘      └──────────────────────────▶ the next residual Add

and becomes one ``com.microsoft.SkipSimplifiedLayerNormalization(a, b, gamma)`` whose outputs are
``y`` and the sum ``h`` (its ``input_skip_bias_sum`` output) — one kernel instead of two, the sum
computed once. The kernel takes ``a`` and ``b`` of one shape ``[batch, seq, hidden]`` (hidden =
gamma's length); an Add whose operands are not provably that (broadcasting, other ranks,
unknown dims) is left as it is. Normalization over the last axis only, as the kernel does.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from qeff_graph.ir.attention import ShapeReader
from qeff_graph.ir.build import Builder, is_qeff_node
from qeff_graph.passes.registry import register

__all__ = ["OrtSkipNorm"]

logger = logging.getLogger(__name__)

_MS = "com.microsoft"


@register("ort-skip-norm")
class OrtSkipNorm(ir.passes.InPlacePass):
    """Fuse ``Add`` + ``SimplifiedLayerNormalization`` into ``SkipSimplifiedLayerNormalization``.

    Requires: nothing (a graph without the pattern is left unchanged).
    Ensures: no ``SimplifiedLayerNormalization`` written by qeff-graph reads a fusable residual
    ``Add`` any more; each fused node's ``input_skip_bias_sum`` replaces every use of the sum.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self._shapes = ShapeReader(model)
        b = Builder(model.graph, "ort-skip-norm")
        fused = 0
        for norm in list(model.graph):
            found = self._match(norm)
            if found is None:
                continue
            add, gamma, epsilon = found
            y, _mean, _inv, total = b.op_multi("SkipSimplifiedLayerNormalization", add.inputs[0], add.inputs[1],
                                               gamma, num_outputs=4, domain=_MS, epsilon=epsilon)
            y.dtype = norm.outputs[0].dtype or gamma.dtype
            total.dtype = add.outputs[0].dtype or add.inputs[0].dtype
            y.shape, total.shape = norm.outputs[0].shape, add.outputs[0].shape
            for old, new in ((norm.outputs[0], y), (add.outputs[0], total)):
                old.replace_all_uses_with(new, replace_graph_outputs=True)
                if new in model.graph.outputs:  # a graph output keeps its name
                    name, old.name = old.name, None
                    new.name = name
            fused += 1
        b.commit()
        if fused:
            model.opset_imports.setdefault(_MS, 1)
            ir.passes.common.RemoveUnusedNodesPass()(model)
            model.graph.sort()
        self.stats = {"fused": fused}
        return ir.passes.PassResult(model, modified=bool(fused))

    def ensures(self, model: ir.Model) -> None:
        self._shapes = ShapeReader(model)
        left = [n.name for n in model.graph if self._match(n) is not None]
        if left:
            raise ir.passes.PostconditionError(f"ort-skip-norm left {left[0]} unfused")

    def _match(self, norm: ir.Node) -> tuple[ir.Node, ir.Value, float] | None:
        """``(Add, gamma, epsilon)`` when ``norm`` is a fusable RMSNorm of a residual sum."""
        if norm.op_type != "SimplifiedLayerNormalization" or norm.domain not in ("", "ai.onnx") \
                or not is_qeff_node(norm) or len(norm.inputs) < 2 or len(norm.outputs) > 1:
            return None
        x, gamma = norm.inputs[0], norm.inputs[1]
        add = x.producer()
        cast = add if add is not None and add.op_type == "Cast" else None
        if cast is not None:
            add = cast.inputs[0].producer()
        if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
            return None
        if cast is not None and cast.attributes.get_int("to", 0) != (add.outputs[0].dtype or add.inputs[0].dtype):
            return None  # only a Cast to the sum's own type (a no-op) may sit between
        gamma_dims = self._shapes.dims(gamma)
        dims = [self._shapes.dims(v) for v in (*add.inputs, add.outputs[0])]
        if gamma_dims is None or len(gamma_dims) != 1 or not isinstance(gamma_dims[0], int):
            return None
        if any(d is None or len(d) != 3 or None in d for d in dims) or not dims[0] == dims[1] == dims[2]:
            return None
        if dims[0][2] != gamma_dims[0] or norm.attributes.get_int("axis", -1) not in (-1, 2):
            return None
        if add.inputs[0].dtype != add.inputs[1].dtype or add.inputs[0].dtype != gamma.dtype:
            return None
        return add, gamma, norm.attributes.get_float("epsilon", 1e-5)
