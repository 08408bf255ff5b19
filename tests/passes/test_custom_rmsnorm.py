"""custom-rmsnorm: decomposed RMSNorm variants and RMSNormalization → one op, same numbers."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import onnx_ir as ir
import onnxruntime as ort
import pytest

from qeff_graph.errors import QeffGraphError
from qeff_graph.passes.custom_rmsnorm import FUNCTION_NAME, QAIC_DOMAIN, CustomRMSNorm
from qeff_graph.passes.registry import create

F, F16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
SHAPE = [2, 3, 16]
RNG = np.random.default_rng(0)
X = (RNG.standard_normal(SHAPE) * 3).astype(np.float32)
WEIGHT = (1 + 0.5 * RNG.standard_normal(SHAPE[-1])).astype(np.float32)
EXPECTED_OP = {"function": (QAIC_DOMAIN, FUNCTION_NAME), "onnx": ("", "RMSNormalization"),
               "ort": ("", "SimplifiedLayerNormalization")}
# name: (square, inverse, cast around, weight first, eps first, axes, natural opset)
VARIANTS = {
    "torchscript": ("pow", "div_one", True, True, False, -1, 17),  # Pow, Div(1, Sqrt), Casts
    "dynamo": ("pow", "reciprocal", False, True, False, -1, 18),  # axes input, Reciprocal
    "mul_div": ("mul", "div_x", False, False, True, -1, 17),  # x*x, Div(x, Sqrt), Add(eps, m)
    "swapped": ("pow", "reciprocal_swapped", False, False, False, 2, 17),  # Mul(r, x), axes=[2]
    "fp16": ("mul", "reciprocal", True, False, False, -1, 18),  # f16 → Cast f32 → … → Cast f16
}


def _rmsnorm_model(variant: str, opset: int | None = None, *, axes=None, keepdims=1,
                   eps_input=False, exponent=2.0) -> onnx.ModelProto:
    square, inverse, cast, weight_first, eps_first, var_axes, natural = VARIANTS[variant]
    opset = opset or natural
    axes = var_axes if axes is None else axes
    fp16 = variant == "fp16"
    nodes, inits = [], [onh.from_array(WEIGHT.astype(np.float16 if fp16 else np.float32), "w")]

    def const(name, value):
        nodes.append(oh.make_node("Constant", [], [name],
                                  value=onh.from_array(np.array(value, np.float32))))

    xin = "x"
    if cast:
        nodes.append(oh.make_node("Cast", ["x"], ["xc"], to=F))
        xin = "xc"
    if square == "pow":
        inits.append(onh.from_array(np.array(exponent, np.float32), "two"))
        nodes.append(oh.make_node("Pow", [xin, "two"], ["sq"]))
    else:
        nodes.append(oh.make_node("Mul", [xin, xin], ["sq"]))
    if opset >= 18:
        inits.append(onh.from_array(np.array([axes], np.int64), "axes"))
        nodes.append(oh.make_node("ReduceMean", ["sq", "axes"], ["mean"], keepdims=keepdims))
    else:
        nodes.append(oh.make_node("ReduceMean", ["sq"], ["mean"], axes=[axes], keepdims=keepdims))
    if not eps_input:
        const("eps", 1e-6)
    nodes.append(oh.make_node("Add", ["eps", "mean"] if eps_first else ["mean", "eps"], ["var"]))
    nodes.append(oh.make_node("Sqrt", ["var"], ["rms"]))
    if inverse == "div_x":
        nodes.append(oh.make_node("Div", [xin, "rms"], ["norm"]))
    else:
        if inverse == "div_one":
            const("one", 1.0)
            nodes.append(oh.make_node("Div", ["one", "rms"], ["inv"]))
        else:
            nodes.append(oh.make_node("Reciprocal", ["rms"], ["inv"]))
        order = ["inv", xin] if inverse == "reciprocal_swapped" else [xin, "inv"]
        nodes.append(oh.make_node("Mul", order, ["norm"]))
    if cast:
        nodes.append(oh.make_node("Cast", ["norm"], ["normc"], to=F16 if fp16 else F))
    normed = "normc" if cast else "norm"
    nodes.append(oh.make_node("Mul", ["w", normed] if weight_first else [normed, "w"], ["y"]))
    nodes.append(oh.make_node("Add", [xin if not fp16 else "x", "y"], ["residual"]))
    dtype = F16 if fp16 else F
    inputs = [oh.make_tensor_value_info("x", dtype, SHAPE)]
    if eps_input:
        inputs.append(oh.make_tensor_value_info("eps", F, []))
    graph = oh.make_graph(nodes, variant, inputs,
                          [oh.make_tensor_value_info(n, dtype, SHAPE) for n in ("y", "residual")],
                          initializer=inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def _feeds(model) -> dict:
    fp16 = model.graph.input[0].type.tensor_type.elem_type == F16
    return {"x": X.astype(np.float16) if fp16 else X}


def _run(model, feeds) -> list[np.ndarray]:
    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _ops(model: ir.Model) -> list[tuple[str, str]]:
    return [(n.domain, n.op_type) for n in model.graph]


@pytest.mark.parametrize("target", ["function", "onnx", "ort"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decomposed_variants(variant, target):
    proto = _rmsnorm_model(variant, 23 if target == "onnx" else None)
    before = _run(proto, _feeds(proto))
    model = ir.serde.deserialize_model(proto)
    p = CustomRMSNorm(target=target)
    assert p(model).modified
    assert p.stats == {"rmsnorm_substituted": 1}

    ops = _ops(model)
    assert ops.count(EXPECTED_OP[target]) == 1
    assert not {"Pow", "ReduceMean", "Sqrt", "Reciprocal", "Div", "Constant"} & {o for _, o in ops}
    assert "two" not in model.graph.initializers and "axes" not in model.graph.initializers
    assert [v.name for v in model.graph.outputs] == ["y", "residual"]
    if target == "function":
        assert (QAIC_DOMAIN, FUNCTION_NAME, "") in model.functions
        assert model.opset_imports[QAIC_DOMAIN] == 1
        node = next(n for n in model.graph if n.op_type == FUNCTION_NAME)
        assert node.attributes["epsilon"].value == pytest.approx(1e-6)
    else:
        assert not model.functions
    if target != "ort":  # the checker does not know ORT's contrib ops
        onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)

    after = _run(model, _feeds(proto))
    tol = 2e-3 if variant == "fp16" else 1e-5  # fp16 output: a rounding step of ~1e-3
    for a, b in zip(after, before):
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=tol, rtol=tol)

    again = CustomRMSNorm(target=target)
    assert not again(model).modified and again.stats == {"rmsnorm_substituted": 0}


@pytest.mark.parametrize("change", [dict(axes=0), dict(axes=1), dict(keepdims=0),
                                    dict(eps_input=True), dict(exponent=3.0)])
def test_not_rmsnorm_is_left_alone(change):
    model = ir.serde.deserialize_model(_rmsnorm_model("dynamo", **change))
    n = len(model.graph)
    p = CustomRMSNorm()
    assert not p(model).modified
    assert p.stats == {"rmsnorm_substituted": 0} and len(model.graph) == n and not model.functions


def _rmsnormalization_model() -> onnx.ModelProto:
    graph = oh.make_graph(
        [oh.make_node("RMSNormalization", ["x", "w"], ["y"], axis=-1, epsilon=1e-5)], "g",
        [oh.make_tensor_value_info("x", F, SHAPE)], [oh.make_tensor_value_info("y", F, SHAPE)],
        initializer=[onh.from_array(WEIGHT, "w")])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 23)])


@pytest.mark.parametrize("target", ["function", "ort"])
def test_onnx_rmsnormalization(target):
    proto = _rmsnormalization_model()
    before = _run(proto, {"x": X})
    model = ir.serde.deserialize_model(proto)
    p = create("custom-rmsnorm", target=target)
    assert p(model).modified and p.stats == {"rmsnorm_substituted": 1}
    assert _ops(model) == [EXPECTED_OP[target]]
    assert list(model.graph)[0].attributes["epsilon"].value == pytest.approx(1e-5)
    np.testing.assert_allclose(_run(model, {"x": X})[0], before[0], atol=1e-5, rtol=1e-5)


def test_onnx_target_is_a_noop_on_rmsnormalization():
    model = ir.serde.deserialize_model(_rmsnormalization_model())
    p = CustomRMSNorm(target="onnx")
    assert not p(model).modified and p.stats == {"rmsnorm_substituted": 0}


def test_onnx_target_needs_opset_23():
    model = ir.serde.deserialize_model(_rmsnorm_model("torchscript"))
    with pytest.raises(QeffGraphError, match="opset >= 23"):
        CustomRMSNorm(target="onnx")(model)
    with pytest.raises(QeffGraphError, match="unknown target"):
        CustomRMSNorm(target="qnn")


# -- end to end: a tiny random Llama exported by torch.onnx ------------------------------------
@pytest.fixture(scope="module")
def tiny_llama():
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    config = tf.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=128, vocab_size=512,
                            initializer_range=0.3)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            # an explicit mask keeps transformers off its packed-sequence path (aten::diff)
            return self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                              use_cache=False).logits

    return torch, Logits().eval()


@pytest.mark.parametrize("dynamo,opset,target", [(False, 17, "function"), (False, 17, "ort"),
                                                 (True, 18, "function"), (True, 23, "function")])
def test_tiny_llama(tiny_llama, tmp_path, dynamo, opset, target):
    torch, module = tiny_llama
    ids = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(1))
    path = tmp_path / "model.onnx"
    kwargs = dict(external_data=False, optimize=True) if dynamo else {}
    torch.onnx.export(module, (ids,), path, dynamo=dynamo, opset_version=opset,
                      input_names=["input_ids"], output_names=["logits"], **kwargs)
    model = ir.load(path)
    feeds = {"input_ids": ids.numpy()}
    before = _run(model, feeds)[0]

    p = CustomRMSNorm(target=target)
    assert p(model).modified
    assert p.stats == {"rmsnorm_substituted": 2 * 2 + 1}
    assert _ops(model).count(EXPECTED_OP[target]) == 5
    assert not any(n.op_type in ("Pow", "Sqrt", "RMSNormalization") for n in model.graph)
    after = _run(model, feeds)[0]
    np.testing.assert_allclose(after, before, atol=1e-5, rtol=1e-5)
