import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qeff_graph.errors import QeffGraphError
from qeff_graph.passes import MatMulNBits, registry
from tests.passes.graphs import ops, run, to_ir

N = 24
vi = helper.make_tensor_value_info


def _model(nodes, inputs, outputs, inits):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _linear(k: int, dtype=np.float32):
    w = np.random.default_rng(k).standard_normal((k, N)).astype(dtype)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", elem, [2, 3, k])],
                  [vi("y", elem, [2, 3, N])], [numpy_helper.from_array(w, "w")])


def dequantize(qb: np.ndarray, scales: np.ndarray, bits: int, k: int) -> np.ndarray:
    """MatMulNBits B ``[N, k_blocks, blob]`` + scales ``[N * k_blocks]`` → float W ``[K, N]``."""
    n, k_blocks, _ = qb.shape
    q = np.stack([qb & 15, qb >> 4], axis=-1).reshape(n, k_blocks, -1) if bits == 4 else qb
    w = (q.astype(np.float32) - 2 ** (bits - 1)) * scales.astype(np.float32).reshape(n, k_blocks, 1)
    return w.reshape(n, -1)[:, :k].T


def _quantized_weight(model, bits: int, k: int, name: str = "w") -> np.ndarray:
    inits = model.graph.initializers
    return dequantize(inits[f"{name}_Q{bits}"].const_value.numpy(),
                      inits[f"{name}_scales"].const_value.numpy(), bits, k)


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("k", [64, 40])  # 40: K padded up to a multiple of block_size 32
@pytest.mark.parametrize("bits", [4, 8])
def test_quantizes_weight(bits, k):
    proto = _linear(k)
    x = np.random.default_rng(1).standard_normal((2, 3, k)).astype(np.float32)
    before = run(proto, {"x": x})["y"]
    model = to_ir(proto)
    p = MatMulNBits(weight_bits=bits, accuracy_level=None)
    assert p(model).modified
    assert ops(model) == ["MatMulNBits"] and "w" not in model.graph.initializers
    node = next(iter(model.graph))
    assert node.domain == "com.microsoft" and model.opset_imports["com.microsoft"] == 1
    assert {a: node.attributes[a].value for a in ("K", "N", "bits", "block_size")} == {
        "K": k, "N": N, "bits": bits, "block_size": 32}
    assert "accuracy_level" not in node.attributes
    assert model.graph.initializers[f"w_Q{bits}"].const_value.shape == (N, 2, 32 * bits // 8)
    assert [o.name for o in model.graph.outputs] == ["y"]
    assert p.stats["quantized"] == p.stats["weights"] == 1
    assert p.stats["bytes_before"] == k * N * 4 > p.stats["bytes_after"]
    after = run(model, {"x": x})["y"]
    np.testing.assert_allclose(after, x @ _quantized_weight(model, bits, k), rtol=1e-4, atol=1e-4)
    assert _rel(after, before) < (0.15 if bits == 4 else 0.02)


def test_accuracy_level_and_float16():
    proto = _linear(64, np.float16)
    x = np.random.default_rng(1).standard_normal((2, 3, 64)).astype(np.float16)
    before = run(proto, {"x": x})["y"].astype(np.float32)
    model = to_ir(proto)
    assert MatMulNBits()(model).modified  # 8 bits, accuracy_level 4
    assert next(iter(model.graph)).attributes["accuracy_level"].value == 4
    assert model.graph.initializers["w_scales"].const_value.dtype.numpy() == np.float16
    after = run(model, {"x": x})["y"]
    assert after.dtype == np.float16 and _rel(after.astype(np.float32), before) < 0.03


def _tied():
    wt = np.random.default_rng(2).standard_normal((N, 64)).astype(np.float32)  # [vocab, hidden]
    nodes = [helper.make_node("Gather", ["wt", "ids"], ["h"]),
             helper.make_node("Transpose", ["wt"], ["wT"], perm=[1, 0]),
             helper.make_node("MatMul", ["h", "wT"], ["logits"])]
    model = _model(nodes, [vi("ids", TensorProto.INT64, [1, 5])],
                   [vi("logits", TensorProto.FLOAT, [1, 5, N])], [numpy_helper.from_array(wt, "wt")])
    return model, wt


def test_tied_head():
    proto, wt = _tied()
    ids = np.array([[0, 3, 7, 11, 23]])
    before = run(proto, {"ids": ids})["logits"]
    model = to_ir(proto)
    assert MatMulNBits(weight_bits=8, accuracy_level=None)(model).modified
    assert ops(model) == ["Gather", "MatMulNBits"] and "wt" in model.graph.initializers
    w = _quantized_weight(model, 8, 64, "wt")  # B is Wt's row-major layout
    after = run(model, {"ids": ids})["logits"]
    np.testing.assert_allclose(after, wt[ids] @ w, rtol=1e-4, atol=1e-4)
    assert _rel(after, before) < 0.02


def test_shared_weight_quantized_once():
    proto = _linear(64)
    proto.graph.node.append(helper.make_node("MatMul", ["x", "w"], ["y2"]))
    proto.graph.output.append(vi("y2", TensorProto.FLOAT, [2, 3, N]))
    model = to_ir(proto)
    p = MatMulNBits(weight_bits=4)
    assert p(model).modified
    assert p.stats["quantized"] == 2 and p.stats["weights"] == 1
    assert ops(model) == ["MatMulNBits", "MatMulNBits"] and len(model.graph.initializers) == 2
    x = np.ones((2, 3, 64), np.float32)
    out = run(model, {"x": x})
    np.testing.assert_array_equal(out["y"], out["y2"])


def test_idempotent_and_bad_options():
    model = to_ir(_linear(64))
    assert MatMulNBits()(model).modified
    second = MatMulNBits()
    assert not second(model).modified and second.stats["quantized"] == 0
    with pytest.raises(QeffGraphError, match="4 or 8"):
        MatMulNBits(weight_bits=3)
    with pytest.raises(QeffGraphError, match="power of two"):
        MatMulNBits(block_size=24)


def test_dynamic_and_small_matmuls_left_alone():
    proto = _model([helper.make_node("MatMul", ["a", "b"], ["y"])],
                   [vi("a", TensorProto.FLOAT, [2, 8]), vi("b", TensorProto.FLOAT, [8, 4])],
                   [vi("y", TensorProto.FLOAT, [2, 4])], [])
    model = to_ir(proto)
    assert not MatMulNBits()(model).modified and ops(model) == ["MatMul"]
    model = to_ir(_linear(64))
    assert not MatMulNBits(min_elements=64 * N + 1)(model).modified


def test_registry_create():
    p = registry.create("matmul-nbits", weight_bits=4, ctx_len=128)
    assert isinstance(p, MatMulNBits) and p.bits == 4 and p.block_size == 32


def test_layout_matches_ort_quantizer():
    """Our decoding of ORT's own MatMulNBitsQuantizer output recovers W: same B/scales layout."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    proto = _linear(40)
    w = numpy_helper.to_array(proto.graph.initializer[0])
    for bits in (4, 8):
        quantizer = MatMulNBitsQuantizer(onnx.ModelProto.FromString(proto.SerializeToString()),
                                         bits=bits, block_size=32, is_symmetric=True)
        quantizer.process()
        inits = {i.name: numpy_helper.to_array(i) for i in quantizer.model.model.graph.initializer}
        assert inits[f"w_Q{bits}"].shape == (N, 2, 32 * bits // 8)
        deq = dequantize(inits[f"w_Q{bits}"], inits["w_scales"], bits, 40)
        assert np.abs(deq - w).max() < (0.5 if bits == 4 else 0.03)


def test_external_weights_copied_data_and_hard_link_error(tmp_path):
    """Weights in external data are read; a hard-linked data file gets a one-line fix."""
    import os

    from qeff_graph import ir as qir

    proto = _linear(64)
    onnx.save(proto, tmp_path / "m.onnx", save_as_external_data=True, location="m.data",
              size_threshold=0)
    model = qir.load(tmp_path / "m.onnx")
    assert MatMulNBits(weight_bits=8)(model).modified
    out = qir.save(model, tmp_path / "q")  # the float weight is gone: its file is not copied
    assert not (tmp_path / "q" / "m.data").exists()
    x = np.random.default_rng(1).standard_normal((2, 3, 64)).astype(np.float32)
    ref = run(_linear(64), {"x": x})["y"]  # (onnx.save externalized proto in place)
    got = run(onnx.load(str(out)), {"x": x})["y"]
    assert _rel(got, ref) < 0.02

    os.link(tmp_path / "m.data", tmp_path / "m.data.link")
    with pytest.raises(QeffGraphError, match="hard links, which onnx/onnx_ir refuse"):
        MatMulNBits()(qir.load(tmp_path / "m.onnx"))
