import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from qeff_graph.passes import MatMulInt8, registry
from qeff_graph.passes.matmul_int8 import quantize_columns
from tests.passes.graphs import ops, run, to_ir

K, N = 64, 24
vi = helper.make_tensor_value_info


def _model(nodes, inputs, outputs, inits):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _weights(seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((K, N)).astype(np.float32), rng.standard_normal(N).astype(np.float32)


def _ffn():
    """y = (x @ w1 + b1) @ w2 (a bias Add, then a MatMul without one; y is a graph output)."""
    w1, b1 = _weights(0)
    w2 = np.random.default_rng(1).standard_normal((N, K)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h"]),
             helper.make_node("MatMul", ["h", "w2"], ["y"])]
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"))]
    return _model(nodes, [vi("x", TensorProto.FLOAT, [2, 5, K])], [vi("y", TensorProto.FLOAT, [2, 5, K])], inits)


def test_quantize_columns_symmetric_per_column():
    w, _ = _weights()
    w[:, 3] = 0  # an all-zero column keeps scale 1
    q, scales = quantize_columns(w)
    assert q.dtype == np.int8 and scales.shape == (N,) and scales[3] == 1 and not q[:, 3].any()
    assert np.abs(q).max() == 127 and (np.abs(q).max(axis=0)[np.arange(N) != 3] == 127).all()
    assert np.abs(q * scales - w).max() <= scales.max() / 2 + 1e-7  # round to nearest


def test_matmuls_and_their_bias_become_dynamic_quantize_matmul():
    proto = _ffn()
    x = np.random.default_rng(2).standard_normal((2, 5, K)).astype(np.float32)
    want = run(to_ir(proto), {"x": x})["y"]
    model = to_ir(proto)
    p = registry.create("matmul-int8")
    assert p(model).modified
    assert ops(model) == ["Scan", "Scan"]  # over the batch: each row's activations quantized on their own
    bodies = [n.attributes["body"].value for n in model.graph]
    assert [[m.op_type for m in body] for body in bodies] == [["DynamicQuantizeMatMul"]] * 2
    assert p.stats["quantized"] == 2 and p.stats["with_bias"] == 1
    assert set(model.graph.initializers) == {"w1_int8", "w1_int8_scales", "b1", "w2_int8", "w2_int8_scales"}
    assert next(iter(bodies[0])).inputs[4].name == "b1"  # the bias went into the op
    assert model.graph.outputs[0].name == "y" and model.opset_imports["com.microsoft"] == 1
    got = run(model, {"x": x})["y"]
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert 0 < rel < 0.02, rel  # int8 weights and activations: close, not equal


def test_each_row_is_quantized_on_its_own():
    """A row's result does not depend on the other rows of the batch (per-tensor over the whole
    batch would let a row with large activations coarsen every other row's); a rank-2 A (no
    batch axis) gets the op without a Scan."""
    model = to_ir(_ffn())
    MatMulInt8()(model)
    x = np.random.default_rng(3).standard_normal((2, 5, K)).astype(np.float32)
    loud = x.copy()
    loud[1] *= 50
    np.testing.assert_array_equal(run(model, {"x": x})["y"][0], run(model, {"x": loud})["y"][0])
    w, _ = _weights()
    flat = to_ir(_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", TensorProto.FLOAT, [3, K])],
                        [vi("y", TensorProto.FLOAT, [3, N])], [numpy_helper.from_array(w, "w")]))
    MatMulInt8()(flat)
    assert ops(flat) == ["DynamicQuantizeMatMul"]


def test_left_alone_and_idempotent():
    """Two activations, a float16 weight, a weight given as a graph input: not this pass's."""
    w16 = np.random.default_rng(0).standard_normal((K, N)).astype(np.float16)
    proto = _model([helper.make_node("MatMul", ["x", "x2"], ["a"]), helper.make_node("MatMul", ["h", "w16"], ["b"]),
                    helper.make_node("MatMul", ["x", "wi"], ["c"])],
                   [vi("x", TensorProto.FLOAT, [2, 5, K]), vi("x2", TensorProto.FLOAT, [2, K, 5]),
                    vi("h", TensorProto.FLOAT16, [2, 5, K]), vi("wi", TensorProto.FLOAT, [K, N])],
                   [vi("a", TensorProto.FLOAT, None), vi("b", TensorProto.FLOAT16, None),
                    vi("c", TensorProto.FLOAT, None)], [numpy_helper.from_array(w16, "w16")])
    model = to_ir(proto)
    assert not MatMulInt8()(model).modified and ops(model) == ["MatMul"] * 3
    model = to_ir(_ffn())
    assert MatMulInt8()(model).modified
    assert not MatMulInt8()(model).modified


def test_a_shared_weight_is_quantized_once():
    w, _ = _weights()
    proto = _model([helper.make_node("MatMul", ["x", "w"], ["y1"]), helper.make_node("MatMul", ["x2", "w"], ["y2"])],
                   [vi("x", TensorProto.FLOAT, [2, K]), vi("x2", TensorProto.FLOAT, [3, K])],
                   [vi("y1", TensorProto.FLOAT, [2, N]), vi("y2", TensorProto.FLOAT, [3, N])],
                   [numpy_helper.from_array(w, "w")])
    model = to_ir(proto)
    p = MatMulInt8()
    assert p(model).modified and p.stats["quantized"] == 2
    assert set(model.graph.initializers) == {"w_int8", "w_int8_scales"}


def test_ensures_names_a_malformed_result():
    import onnx_ir as ir

    model = to_ir(_ffn())
    p = MatMulInt8()
    p(model)
    scales = model.graph.initializers["w1_int8_scales"]
    scales.shape = ir.Shape([N + 1])
    with pytest.raises(ir.passes.PostconditionError, match="scales"):
        p.ensures(model)
