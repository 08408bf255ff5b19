"""Substitute RMSNorm subgraphs by one op (``custom-rmsnorm``), as QEfficient's CustomRMSNorm.

Decomposed RMSNorm as torch.onnx emits it for Llama/Mistral/Qwen2/Phi3 (TorchScript opset 17,
dynamo opset 18+)::

    x ─[Cast f32]─┬─ Pow(·, 2) | Mul(·, ·) ─ ReduceMean(-1, keepdims=1) ─ Add(eps) ─ Sqrt ─┐
                  │                                                                       │
                  └─ Mul(·, Reciprocal(s)) | Mul(·, Div(1, s)) | Div(·, s) ◀──────────────┘
                       ─[Cast back]─ Mul(weight)  (either operand order) ─▶ y

and the ONNX ``RMSNormalization`` op (opset 23) become, by ``target``:

* ``"function"`` (default, QEfficient's form): ``CustomRMSNorm(x, weight, epsilon=eps)`` in
  domain ``com.qti.aisw.onnx`` plus a model-local function of that name whose body is
  ``ReduceMean(x²) → Add eps → Sqrt → Reciprocal → Mul x → Mul weight`` (ORT runs it by inlining);
* ``"onnx"``: ``RMSNormalization`` (model opset >= 23);
* ``"ort"``: ONNX Runtime's contrib ``SimplifiedLayerNormalization`` (axis=-1, epsilon). ORT
  registers it in the default ONNX domain, not ``com.microsoft``, so that is where it goes.

Mixed precision (Cast to a wider compute type and back) is kept: the function is called in the
compute type (inputs cast to it, result cast back); ``onnx``/``ort`` use ``stash_type``.
Gemma's ``x_norm * (1 + weight)`` is not special-cased: it matches with ``weight`` being the
``1 + weight`` value when that multiplication is the pattern's last Mul (Gemma casts back after
it, so the trailing Cast stays outside).
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import RULE_NAME_TAG, pattern

from qeff_graph.errors import QeffGraphError
from qeff_graph.ir.build import QEFF_PREFIX
from qeff_graph.passes.registry import register

__all__ = ["CustomRMSNorm", "QAIC_DOMAIN", "FUNCTION_NAME"]

logger = logging.getLogger(__name__)

QAIC_DOMAIN = "com.qti.aisw.onnx"
FUNCTION_NAME = "CustomRMSNorm"
TARGETS = ("function", "onnx", "ort")
_FLOATS = {ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}
_STASH = {ir.DataType.FLOAT, ir.DataType.DOUBLE}
_RULES = ("DecomposedRMSNorm", "RMSNormalization")
_counter = itertools.count()


def _scalar(value: ir.Value | None) -> float | None:
    """The value of a one-element constant, else None."""
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    if tensor is None or tensor.size != 1:
        return None
    return float(np.asarray(tensor.numpy()).reshape(()))


def _dtype(value: ir.Value) -> ir.DataType | None:
    """The element type of ``value``, looking through Identity/Cast when it is not recorded."""
    for _ in range(8):
        if value.dtype is not None:
            return value.dtype
        node = value.producer()
        if node is None or node.op_type not in ("Identity", "Cast"):
            return None
        if node.op_type == "Cast":
            return ir.DataType(node.attributes.get_int("to"))
        value = node.inputs[0]
    return None


def _shape(value: ir.Value) -> ir.Shape | None:
    """The shape of ``value``, looking through Identity (TorchScript's shared-weight copies)."""
    for _ in range(8):
        node = value.producer()
        if value.shape is not None or node is None or node.op_type != "Identity":
            return value.shape
        value = node.inputs[0]
    return None


def _rank(value: ir.Value) -> int | None:
    shape = _shape(value)
    return shape.rank() if shape is not None else None


class _Substitution(pattern.RewriteRuleClassBase):
    """Shared replacement: emit the ``target`` op in the ``work`` dtype, cast to ``out``."""

    def __init__(self, name: str, target: str, used_constants: list[ir.Value]):
        super().__init__(name)
        self.target = target
        self.used_constants = used_constants

    def _check_types(self, result: pattern.MatchResult, x, weight, work, out):
        if work is not None and work not in _FLOATS:
            return result.fail(f"compute type {work} is not a float type", x)
        if self.target != "function" and work is not None and work not in _STASH:
            return result.fail(f"{self.target} target needs float/double compute, got {work}")
        wrank = _rank(weight)
        if wrank is None and self.target != "function":
            return result.fail("weight rank unknown", weight)
        if wrank is not None and any(d != 1 for d in _shape(weight).dims[:-1]):
            return result.fail("weight is not a per-channel scale", weight)
        if wrank is not None and wrank > 1 and self.target != "function":
            return result.fail("weight is not 1-D", weight)
        self._plan = (work, out)
        return result

    def _emit(self, op, x, weight, epsilon: float):
        work, out = self._plan
        xdt, wdt = _dtype(x), _dtype(weight)
        direct = xdt == wdt == out  # RMSNormalization semantics hold as they are
        if not (direct and self.target != "function"):  # compute everything in `work`
            if None not in (work, xdt) and xdt != work:
                x = op.Cast(x, to=int(work))
            if None not in (work, wdt) and wdt != work:
                weight = op.Cast(weight, to=int(work))
        stash = {} if work is None else {"stash_type": int(work)}
        if self.target == "function":
            y = op.CustomRMSNorm(x, weight, epsilon=epsilon, _domain=QAIC_DOMAIN, _version=1)
        elif self.target == "onnx":
            y = op.RMSNormalization(x, weight, axis=-1, epsilon=epsilon, **stash)
        else:
            y = op.SimplifiedLayerNormalization(x, weight, axis=-1, epsilon=epsilon, **stash)
        if not direct and out is not None and work is not None and out != work:
            y = op.Cast(y, to=int(out))
        return y


class _DecomposedRMSNorm(_Substitution):
    def pattern(self, op, x, weight, two, one, epsilon, target_dtype):
        # x is the normalized input itself: an upcast Cast in front stays (torch.onnx's residual
        # reads it too). tag_vars name the alternative matched (and work around onnxscript's
        # BacktrackingOr.clone, which fails under commute=True without one).
        square = pattern.OrValue([op.Pow(x, two), op.Mul(x, x)], tag_var="square")
        mean = op.ReduceMean(square, _allow_other_inputs=True, _allow_other_attributes=True,
                             _outputs=["mean"])
        rms = op.Sqrt(op.Add(mean, epsilon))
        inv = pattern.OrValue([op.Reciprocal(rms), op.Div(one, rms)], tag_var="inverse")
        normalized = pattern.OrValue([op.Mul(x, inv), op.Div(x, rms)], tag_var="scaling")
        normalized = pattern.OrValue([op.Cast(normalized, to=target_dtype), normalized],
                                     tag_var="cast_out")
        return op.Mul(normalized, weight, _outputs=["y"])

    def check(self, context, x, weight, mean, y, epsilon, two=None, one=None, target_dtype=None,
              **_):
        result = pattern.MatchResult()
        if two is not None and _scalar(two) != 2.0:
            return result.fail("Pow exponent is not the constant 2", two)
        if one is not None and _scalar(one) != 1.0:
            return result.fail("Div numerator is not the constant 1", one)
        if _scalar(epsilon) is None:
            return result.fail("epsilon is not a constant scalar", epsilon)
        reduce = mean.producer()
        if reduce.attributes.get_int("keepdims", 1) != 1:
            return result.fail("ReduceMean has keepdims=0", reduce)
        if len(reduce.inputs) > 1 and reduce.inputs[1] is not None:
            axes_tensor = ir.convenience.get_const_tensor(reduce.inputs[1])
            axes = None if axes_tensor is None else axes_tensor.numpy().reshape(-1).tolist()
            self.used_constants.append(reduce.inputs[1])
        else:
            axes = reduce.attributes.get_ints("axes")
            axes = list(axes) if axes is not None else None
        rank = _rank(x)
        last = (-1,) if rank is None else (-1, rank - 1)
        if axes is None or len(axes) != 1 or axes[0] not in last:
            return result.fail(f"ReduceMean axes {axes} is not the last axis", reduce)
        compute = _dtype(x)
        target = ir.DataType(target_dtype.as_int()) if target_dtype is not None else compute
        self.used_constants.extend(v for v in (two, one, epsilon) if v is not None)
        return self._check_types(result, x, weight, compute, y.dtype or target)

    def rewrite(self, op, x, weight, epsilon, **_):
        return self._emit(op, x, weight, _scalar(epsilon))


class _OnnxRMSNormalization(_Substitution):
    def pattern(self, op, x, scale):
        return op.RMSNormalization(x, scale, _allow_other_attributes=True, _outputs=["y"])

    def check(self, context, x, scale, y, **_):
        result = pattern.MatchResult()
        node = y.producer()
        axis, rank = node.attributes.get_int("axis", -1), _rank(x)
        if axis != -1 and (rank is None or axis != rank - 1):
            return result.fail(f"RMSNormalization over axis {axis}, not only the last", node)
        stash = ir.DataType(node.attributes.get_int("stash_type", 1))
        self._epsilon = node.attributes.get_float("epsilon", 1e-5)
        return self._check_types(result, x, scale, stash, y.dtype or _dtype(scale))

    def rewrite(self, op, x, scale, **_):
        return self._emit(op, x, scale, self._epsilon)


def _custom_rmsnorm_function(opset: int) -> ir.Function:
    """``CustomRMSNorm(hidden_states, weight; epsilon)`` in domain ``com.qti.aisw.onnx``."""
    x, weight = ir.Value(name="hidden_states"), ir.Value(name="weight")
    tape = ir.tape.Tape()
    eps = tape.op("Constant", [], {"value_float": ir.Attr(
        "value_float", ir.AttributeType.FLOAT, None, ref_attr_name="epsilon")})
    square = tape.op("Pow", [x, tape.op("Constant", [], {"value_float": 2.0})])
    if opset >= 18:
        axes = tape.op("Constant", [], {"value_ints": [-1]})
        var = tape.op("ReduceMean", [square, axes], {"keepdims": 1})
    else:
        var = tape.op("ReduceMean", [square], {"axes": [-1], "keepdims": 1})
    rms = tape.op("Sqrt", [tape.op("Add", [var, tape.op("CastLike", [eps, var])])])
    normalized = tape.op("Mul", [x, tape.op("Reciprocal", [rms])])
    y = tape.op("Mul", [normalized, weight])
    y.name = "output"
    graph = ir.Graph([x, weight], [y], nodes=tape.nodes, opset_imports={"": opset},
                     name=FUNCTION_NAME)
    return ir.Function(QAIC_DOMAIN, FUNCTION_NAME, graph=graph,
                       attributes=[ir.Attr("epsilon", ir.AttributeType.FLOAT, None)])


def _remove_if_dead(values: list[ir.Value]) -> None:
    """Drop the Constant nodes / initializers that only fed substituted subgraphs."""
    for value in {id(v): v for v in values}.values():
        if value.uses() or value.is_graph_output():
            continue
        node = value.producer()
        if node is not None and node.op_type == "Constant" and node.graph is not None:
            node.graph.remove(node, safe=True)
        elif value.is_initializer() and value.graph is not None:
            value.graph.initializers.pop(value.name, None)


@register("custom-rmsnorm")
class CustomRMSNorm(ir.passes.InPlacePass):
    """Replace decomposed RMSNorm (and ONNX RMSNormalization) with one CustomRMSNorm/RMSNorm op.

    ``target``: ``"function"`` (QEfficient's ``com.qti.aisw.onnx::CustomRMSNorm`` with a
    model-local function body), ``"onnx"`` (``RMSNormalization``, opset >= 23) or ``"ort"``
    (ONNX Runtime's ``SimplifiedLayerNormalization``). See the module docstring for the forms
    matched.

    Expects:
        RMSNorm over the last axis with a constant scalar epsilon; for ``target="onnx"`` a model
        at opset >= 23 (else a QeffGraphError).
    Guarantees:
        Each matched RMSNorm is one node computing the same values (within float rounding);
        ``target="function"`` adds the ``CustomRMSNorm`` function and the ``com.qti.aisw.onnx``
        opset import. Constants left unused by the substitution are removed, nothing else.
        ``stats``: ``rmsnorm_substituted``.
    """

    def __init__(self, *, target: str = "function"):
        super().__init__()
        if target not in TARGETS:
            raise QeffGraphError(f"custom-rmsnorm: unknown target {target!r}; use one of {TARGETS}")
        self.target = target
        self.stats: dict[str, int] = {}

    def _rules(self, used: list[ir.Value]) -> pattern.RewriteRuleSet:
        rules = [_DecomposedRMSNorm.rule(_RULES[0], target=self.target, used_constants=used)]
        if self.target != "onnx":
            rules.append(_OnnxRMSNormalization.rule(_RULES[1], target=self.target,
                                                    used_constants=used))
        return pattern.RewriteRuleSet(rules, commute=True)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        if self.target == "onnx" and opset < 23:
            raise QeffGraphError(
                f"custom-rmsnorm target='onnx' emits RMSNormalization, which needs opset >= 23 "
                f"but the model is opset {opset}; use target='function' or 'ort', or export at "
                "opset 23")
        used: list[ir.Value] = []
        count = self._rules(used).apply_to_model(model)
        if count:
            _remove_if_dead(used)
            for node in ir.traversal.RecursiveGraphIterator(model.graph):
                if node.metadata_props.pop(RULE_NAME_TAG, None) in _RULES:
                    node.name = f"{QEFF_PREFIX}rmsnorm/{node.op_type}_{next(_counter)}"
            if self.target == "function":
                key = (QAIC_DOMAIN, FUNCTION_NAME, "")
                if key not in model.functions:
                    model.functions[key] = _custom_rmsnorm_function(opset)
                model.opset_imports.setdefault(QAIC_DOMAIN, 1)
        self.stats = {"rmsnorm_substituted": count}
        logger.info("custom-rmsnorm: %d RMSNorm substituted (target=%s)", count, self.target)
        return ir.passes.PassResult(model, modified=count > 0)
