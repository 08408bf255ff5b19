"""fp16-clamp: initializers, Constant and ConstantOfShape values are clipped to ±65504."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import onnx_ir as ir
import onnxruntime as ort
import pytest

from qeff_graph.passes.fp16_clamp import FP16Clamp
from qeff_graph.passes.registry import create

F32_MIN = float(np.finfo(np.float32).min)


def _model(graph: onnx.GraphProto) -> ir.Model:
    return ir.serde.deserialize_model(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]))


def _run(model: ir.Model | onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _mask_model() -> onnx.ModelProto:
    """Softmax(Where(mask, scores, Constant fill)); Softmax(scores + Where(mask, 0, ConstantOfShape))."""
    bias = np.array([1e6, F32_MIN, np.inf, 0.5], dtype=np.float32)
    nodes = [
        oh.make_node("Constant", [], ["fill"], value=onh.from_array(np.array(F32_MIN, np.float32))),
        oh.make_node("Where", ["mask", "scores", "fill"], ["masked"]),
        oh.make_node("Softmax", ["masked"], ["probs"], axis=-1),
        oh.make_node("Add", ["scores", "bias"], ["biased"]),
        oh.make_node("Shape", ["scores"], ["shape"]),
        oh.make_node("ConstantOfShape", ["shape"], ["neg"],
                     value=onh.from_array(np.array([-3.4e38], np.float32))),
        oh.make_node("Constant", [], ["zero"], value=onh.from_array(np.array(0.0, np.float32))),
        oh.make_node("Where", ["mask", "zero", "neg"], ["additive"]),  # additive mask
        oh.make_node("Add", ["scores", "additive"], ["shifted"]),
        oh.make_node("Softmax", ["shifted"], ["probs2"], axis=-1),
    ]
    graph = oh.make_graph(
        nodes, "g",
        [oh.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, [1, 4]),
         oh.make_tensor_value_info("mask", onnx.TensorProto.BOOL, [1, 4])],
        [oh.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, 4])
         for n in ("probs", "biased", "neg", "probs2")],
        initializer=[onh.from_array(bias, "bias")],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


FEEDS = {"scores": np.array([[0.1, 2.0, -1.0, 3.0]], np.float32),
         "mask": np.array([[True, False, True, False]])}


def test_clips_initializers_constants_and_mask_fills():
    proto = _mask_model()
    model = ir.serde.deserialize_model(proto)
    before = _run(proto, FEEDS)
    p = FP16Clamp()
    result = p(model)
    assert result.modified
    # bias (1e6, f32 min), Constant fill, ConstantOfShape value
    assert p.stats == {"tensors_changed": 3, "values_clipped": 4}

    bias = model.graph.initializers["bias"].const_value.numpy()
    np.testing.assert_array_equal(bias, [65504, -65504, np.inf, 0.5])  # inf kept
    assert model.graph.initializers["bias"].const_value.name == "bias"
    nodes = {n.outputs[0].name: n for n in model.graph}
    assert nodes["fill"].attributes["value"].as_tensor().numpy() == -65504
    assert nodes["neg"].attributes["value"].as_tensor().numpy().tolist() == [-65504]

    after = _run(model, FEEDS)
    np.testing.assert_allclose(after[0], before[0], atol=1e-6)  # masked softmax unchanged
    np.testing.assert_allclose(after[3], before[3], atol=1e-6)
    np.testing.assert_array_equal(after[1], FEEDS["scores"] + bias)
    assert np.all(after[2] == -65504) and np.isfinite(after[0]).all()

    # idempotent: nothing left to clip
    again = FP16Clamp()
    assert not again(model).modified
    assert again.stats == {"tensors_changed": 0, "values_clipped": 0}


def test_keep_inf_false_clips_inf_but_not_nan():
    arr = np.array([np.inf, -np.inf, np.nan, 1.0, -7e4], np.float64)
    graph = oh.make_graph(
        [oh.make_node("Identity", ["w"], ["y"]),
         oh.make_node("Constant", [], ["c"], value_floats=[1e5, 2.0]),
         oh.make_node("Constant", [], ["d"], value_float=-1e9)],
        "g", [], [oh.make_tensor_value_info(n, onnx.TensorProto.DOUBLE if n == "y"
                                            else onnx.TensorProto.FLOAT, None)
                  for n in ("y", "c", "d")],
        initializer=[onh.from_array(arr, "w")])
    model = _model(graph)
    p = create("fp16-clamp", keep_inf=False)
    assert p(model).modified
    assert p.stats == {"tensors_changed": 3, "values_clipped": 5}
    w = model.graph.initializers["w"].const_value.numpy()
    assert w.dtype == np.float64
    np.testing.assert_array_equal(w[[0, 1, 3, 4]], [65504, -65504, 1.0, -65504])
    assert np.isnan(w[2])
    y, c, d = _run(model, {})
    np.testing.assert_array_equal(c, [65504, 2.0])
    assert d == -65504


def test_nothing_to_clip_is_unmodified():
    graph = oh.make_graph(
        [oh.make_node("Add", ["x", "w"], ["y"]),
         oh.make_node("Constant", [], ["c"], value=onh.from_array(np.array([-np.inf], np.float32))),
         oh.make_node("Constant", [], ["i"], value=onh.from_array(np.array([10**9], np.int64)))],
        "g", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [oh.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in ("y", "c")],
        initializer=[onh.from_array(np.array([65504, -65504], np.float32), "w")])
    model = _model(graph)
    p = FP16Clamp()
    assert not p(model).modified
    assert p.stats == {"tensors_changed": 0, "values_clipped": 0}


def test_subgraph_initializers_and_constants():
    then_graph = oh.make_graph(
        [oh.make_node("Constant", [], ["t"],
                      value=onh.from_array(np.array([F32_MIN], np.float32)))],
        "then", [], [oh.make_tensor_value_info("t", onnx.TensorProto.FLOAT, [1])])
    else_graph = oh.make_graph(
        [oh.make_node("Identity", ["e_w"], ["e"])],
        "else", [], [oh.make_tensor_value_info("e", onnx.TensorProto.FLOAT, [1])],
        initializer=[onh.from_array(np.array([1e7], np.float32), "e_w")])
    graph = oh.make_graph(
        [oh.make_node("If", ["cond"], ["out"], then_branch=then_graph, else_branch=else_graph)],
        "g", [oh.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])],
        [oh.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [1])])
    model = _model(graph)
    p = FP16Clamp()
    assert p(model).modified
    assert p.stats == {"tensors_changed": 2, "values_clipped": 2}
    assert _run(model, {"cond": np.array(True)})[0].tolist() == [-65504]
    assert _run(model, {"cond": np.array(False)})[0].tolist() == [65504]


@pytest.mark.parametrize("chunk_bytes", [64 << 20, 4096])
def test_external_data(tmp_path, chunk_bytes):
    rng = np.random.default_rng(0)
    big_ok = rng.standard_normal((256, 512)).astype(np.float32)  # 512 KiB, in range
    big_bad = rng.standard_normal((256, 512)).astype(np.float32)
    big_bad[200, 7] = 3e5
    big_bad[255, 511] = -np.inf
    graph = oh.make_graph(
        [oh.make_node("Add", ["ok", "bad"], ["y"])], "g", [],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [256, 512])],
        initializer=[onh.from_array(big_ok, "ok"), onh.from_array(big_bad, "bad")])
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    path = tmp_path / "model.onnx"
    onnx.save(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=1024)

    model = ir.load(path)
    assert all(isinstance(v.const_value, ir.ExternalTensor)
               for v in model.graph.initializers.values())
    p = FP16Clamp(chunk_bytes=chunk_bytes)
    assert p(model).modified
    assert p.stats == {"tensors_changed": 1, "values_clipped": 1}

    ok = model.graph.initializers["ok"].const_value
    assert isinstance(ok, ir.ExternalTensor) and ok.raw is None  # scanned, never loaded
    bad = model.graph.initializers["bad"]
    assert bad.name == "bad" and not isinstance(bad.const_value, ir.ExternalTensor)
    clipped = bad.const_value.numpy()
    assert clipped[200, 7] == 65504 and clipped[255, 511] == -np.inf
    expected = big_bad.copy()
    expected[200, 7] = 65504
    np.testing.assert_array_equal(clipped, expected)

    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    ir.save(model, out, external_data="model.onnx.data")
    (y,) = _run(onnx.load(out), {})
    np.testing.assert_array_equal(y, big_ok + expected)
