import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qeff_graph.errors import QeffGraphError
from qeff_graph.passes import MatMulNBits, registry
from qeff_graph.passes.weight_blocks import quantize_float
from tests.passes.graphs import ops, run, to_ir
from tests.passes.nbits import (
    GGUF_LAYOUTS,
    effective_weight,
    effective_weights,
    random_gguf_rows,
)

N = 24
vi = helper.make_tensor_value_info


def _model(nodes, inputs, outputs, inits):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _linear(k: int, dtype=np.float32, w=None):
    w = np.random.default_rng(k).standard_normal((k, N)).astype(dtype) if w is None else w
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", elem, [2, 3, k])],
                  [vi("y", elem, [2, 3, w.shape[1]])], [numpy_helper.from_array(w, "w")])


def dequantize(qb: np.ndarray, scales: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Symmetric MatMulNBits B ``[N, k_blocks, blob]`` + scales ``[N * k_blocks]`` → W ``[K, N]``."""
    n, k_blocks, _ = qb.shape
    q = np.stack([qb & 15, qb >> 4], axis=-1).reshape(n, k_blocks, -1) if bits == 4 else qb
    w = (q.astype(np.float32) - 2 ** (bits - 1)) * scales.astype(np.float32).reshape(n, k_blocks, 1)
    return w.reshape(n, -1)[:, :k].T


def _the(model, op_type="MatMulNBits"):
    (node,) = [n for n in model.graph if n.op_type == op_type]
    return node


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _ops_without_correction(model):
    """Op types, the block-minimum correction (MatMul(A @ E, mins) + Add) left out."""
    return [o for o in ops(model) if o not in ("MatMul", "Add")]


@pytest.mark.parametrize("k", [64, 40])  # 40: K padded up to a multiple of block_size 32
@pytest.mark.parametrize("bits", [4, 8])
def test_quantizes_weight_min_max(bits, k):
    proto = _linear(k)
    w = numpy_helper.to_array(proto.graph.initializer[0])
    x = np.random.default_rng(1).standard_normal((2, 3, k)).astype(np.float32)
    model = to_ir(proto)
    level = None if bits == 4 else 4  # (8 bits at another level: two 4-bit halves, tested below)
    p = MatMulNBits(weight_bits=bits, accuracy_level=level)
    assert p(model).modified
    # MatMulNBits + the block minimum: (x summed per block) @ mins, added
    assert ops(model) == ["MatMulNBits", "MatMul", "MatMul", "Add"] and "w" not in model.graph.initializers
    node = _the(model)
    assert node.domain == "com.microsoft" and model.opset_imports["com.microsoft"] == 1
    assert {a: node.attributes[a].value for a in ("K", "N", "bits", "block_size")} == {
        "K": k, "N": N, "bits": bits, "block_size": 32}
    assert ("accuracy_level" in node.attributes) == (level is not None)
    assert model.graph.initializers[f"w_Q{bits}"].const_value.shape == (N, 2, 32 * bits // 8)
    assert len(node.inputs) == 3  # ORT's default zero point; the minimum is a float
    assert [o.name for o in model.graph.outputs] == ["y"]
    assert p.stats["quantized"] == p.stats["weights"] == 1 and p.stats["carried"] == 0
    assert p.stats["bytes_before"] == k * N * 4 > p.stats["bytes_after"]
    deq = effective_weight(node)
    after = run(model, {"x": x})["y"]
    assert _rel(after, x @ deq) < (1e-6 if level is None else 0.01)  # level 4: int8 activations
    # Gaussian weights: the rms error of round-to-nearest on each block's own [min, max]
    assert _rel(deq, w) < (0.085 if bits == 4 else 0.005)
    assert _rel(after, x @ w) < (0.1 if bits == 4 else 0.015)


def test_float_minimum_and_symmetric_grids():
    """A block keeps all 2^bits levels on its own [min, max] (here all positive, where an integer
    zero point would waste half the grid); blocks already on a GGUF grid come back exactly."""
    w = np.random.default_rng(3).uniform(0.5, 1.5, (N, 64)).astype(np.float32)
    blocks = quantize_float(w, 4, 32)
    assert blocks.mins is not None and blocks.zero_points is None
    assert np.abs(blocks.dequantize() - w).max() <= 1.0 / 15 / 2 * 1.0001
    rng = np.random.default_rng(4)
    d = rng.uniform(0.01, 0.02, (N, 2, 1)).astype(np.float16).astype(np.float32)  # GGUF scales: float16
    m = -rng.uniform(0.05, 0.1, (N, 2, 1)).astype(np.float16).astype(np.float32)
    q4 = rng.integers(0, 16, (N, 2, 32)).astype(np.float32)
    q4[..., 0], q4[..., 1] = 0, 15  # each block spans its 16 levels
    q8 = rng.integers(-127, 128, (N, 2, 32)).astype(np.float32)
    q8[..., 0] = 127
    for name, exact, bits, tol in (("Q4_0", (q4 - 8) * d, 4, 0), ("Q8_0", q8 * d, 8, 0),
                                   ("Q4_1", d * q4 + m, 4, 1e-6), ("Q4_1 at 8 bits", d * q4 + m, 8, 1e-6)):
        exact = exact.reshape(N, 64)
        got = quantize_float(exact, bits, 32).dequantize()
        assert np.abs(got - exact).max() <= tol * np.abs(exact).max(), name


def test_accuracy_level_auto_and_eight_bit_halves():
    """auto = accuracy_level 1 (float compute); 8-bit weights then run as two 4-bit halves, each
    a MatMulNBits over x, added — exactly the 8-bit weights — as ORT's CPU kernel has no
    float-compute 8-bit path."""
    proto = _linear(64)
    x = np.random.default_rng(1).standard_normal((2, 3, 64)).astype(np.float32)
    model = to_ir(proto)
    assert MatMulNBits(weight_bits=8)(model).modified
    hi, lo = [n for n in model.graph if n.op_type == "MatMulNBits"]
    assert hi.inputs[0] is lo.inputs[0] is model.graph.inputs[0]  # both read x itself
    halves_sum = hi.outputs[0].uses()[0].node
    assert halves_sum.op_type == "Add" and {v.producer() for v in halves_sum.inputs} == {hi, lo}
    for node in (hi, lo):
        assert {a: node.attributes[a].value for a in ("K", "bits", "accuracy_level")} == {
            "K": 64, "bits": 4, "accuracy_level": 1}
    w8 = quantize_float(numpy_helper.to_array(proto.graph.initializer[0]).T, 8, 32).dequantize()
    np.testing.assert_allclose(effective_weight(hi), w8.T, rtol=0, atol=1e-6)  # halves = 8-bit weights
    assert _rel(run(model, {"x": x})["y"], x @ w8.T) < 1e-6
    # accuracy_level 4 (int8 compute) keeps true 8-bit blocks
    model = to_ir(_linear(64))
    assert MatMulNBits(weight_bits=8, accuracy_level=4)(model).modified
    assert _ops_without_correction(model) == ["MatMulNBits"] and _the(model).attributes["bits"].value == 8
    assert _the(model).attributes["accuracy_level"].value == 4


def test_float16():
    proto = _linear(64, np.float16)
    x = np.random.default_rng(1).standard_normal((2, 3, 64)).astype(np.float16)
    before = run(proto, {"x": x})["y"].astype(np.float32)
    model = to_ir(proto)
    assert MatMulNBits(accuracy_level=4)(model).modified  # 8 bits
    assert model.graph.initializers["w_scales"].const_value.dtype.numpy() == np.float16
    after = run(model, {"x": x})["y"]
    assert after.dtype == np.float16 and _rel(after.astype(np.float32), before) < 0.03


def _tied():
    wt = np.random.default_rng(2).standard_normal((N, 64)).astype(np.float32)  # [vocab, hidden]
    nodes = [helper.make_node("Gather", ["wt", "ids"], ["h"]),
             helper.make_node("Transpose", ["wt"], ["wT"], perm=[1, 0]),
             helper.make_node("MatMul", ["h", "wT"], ["logits"])]
    model = _model(nodes, [vi("ids", TensorProto.INT64, [1, 5])],
                   [vi("logits", TensorProto.FLOAT, [1, 5, N]), vi("h", TensorProto.FLOAT, [1, 5, 64])],
                   [numpy_helper.from_array(wt, "wt")])
    return model, wt


@pytest.mark.parametrize("bits,level", [(8, 4), (8, 1), (4, 1)])
def test_tied_head_and_embedding_share_blocks(bits, level):
    """The tied embedding's Gather reads the head's blocks (GatherBlockQuantized): the float
    table is gone and both compute with the same quantized weights."""
    proto, wt = _tied()
    ids = np.array([[0, 3, 7, 11, 23]])
    model = to_ir(proto)
    p = MatMulNBits(weight_bits=bits, accuracy_level=level)
    assert p(model).modified and p.stats["gathers"] == 1
    assert "GatherBlockQuantized" in ops(model) and "wt" not in model.graph.initializers
    heads = [n for n in model.graph if n.op_type == "MatMulNBits"]  # 8 bits at level 1: two 4-bit halves
    gathers = [n for n in model.graph if n.op_type == "GatherBlockQuantized"]
    assert len(heads) == len(gathers) == (2 if (bits, level) == (8, 1) else 1)
    assert {g.inputs[0].name for g in gathers} == {h.inputs[1].name for h in heads}  # the same B bytes
    w = effective_weight(heads[0])  # [K, N]: the head's weight, B in Wt's row-major layout
    out = run(model, {"ids": ids})
    np.testing.assert_array_equal(out["h"], w.T[ids])  # the embedding rows: the same blocks, exactly
    assert _rel(out["logits"], out["h"] @ w) < (1e-6 if level == 1 else 0.01)
    assert _rel(w.T, wt) < (0.1 if bits == 4 else 0.005)


def test_shared_weight_quantized_once():
    proto = _linear(64)
    proto.graph.node.append(helper.make_node("MatMul", ["x", "w"], ["y2"]))
    proto.graph.output.append(vi("y2", TensorProto.FLOAT, [2, 3, N]))
    model = to_ir(proto)
    p = MatMulNBits(weight_bits=4)
    assert p(model).modified
    assert p.stats["quantized"] == 2 and p.stats["weights"] == 1
    assert _ops_without_correction(model) == ["MatMulNBits", "MatMulNBits"]
    assert len([n for n in model.graph.initializers if n.startswith("w_")]) == 3  # Q4, scales, mins
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
    with pytest.raises(QeffGraphError, match="accuracy_level"):
        MatMulNBits(accuracy_level=7)


def test_dynamic_and_small_matmuls_left_alone():
    proto = _model([helper.make_node("MatMul", ["a", "b"], ["y"])],
                   [vi("a", TensorProto.FLOAT, [2, 8]), vi("b", TensorProto.FLOAT, [8, 4])],
                   [vi("y", TensorProto.FLOAT, [2, 4])], [])
    model = to_ir(proto)
    assert not MatMulNBits()(model).modified and ops(model) == ["MatMul"]
    model = to_ir(_linear(64))
    assert not MatMulNBits(min_elements=64 * N + 1)(model).modified


def test_registry_create():
    p = registry.create("matmul-nbits", weight_bits=4, ctx_len=128, gguf="x.gguf")
    assert isinstance(p, MatMulNBits) and p.bits == 4 and p.block_size == 32 and p.gguf == "x.gguf"


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


# ---- GGUF blocks carried ---------------------------------------------------------------------

def _write_gguf(path, tensors: dict) -> dict[str, np.ndarray]:
    """Write ``{name: (float32 [N, K], GGML type)}``; return each tensor's ``gguf.dequantize``."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    out = {}
    for name, (array, qtype) in tensors.items():
        if qtype == gguf.GGMLQuantizationType.F16:
            data = array.astype(np.float16)
            writer.add_tensor(name, data)
        else:
            data = gguf.quantize(array, qtype)
            writer.add_tensor(name, data, raw_dtype=qtype)
        out[name] = np.asarray(gguf.dequantize(data, qtype), np.float32).reshape(array.shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    import gguf

    t = gguf.GGMLQuantizationType
    rng = np.random.default_rng(7)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    deq = _write_gguf(path, {
        "blk.0.attn_q.weight": (rng.standard_normal((48, 64)).astype(np.float32), t.Q4_1),
        "blk.0.ffn_up.weight": (rng.standard_normal((40, 64)).astype(np.float32), t.Q4_0),
        "token_embd.weight": (rng.standard_normal((N, 64)).astype(np.float32), t.Q8_0),
        "blk.0.ffn_down.weight": (rng.standard_normal((16, 64)).astype(np.float32), t.F16),
    })
    return path, deq


def _gguf_graph(deq, perm, extra=None):
    """x @ q (rows permuted as transformers permutes llama q/k), x @ up, x @ down (F16),
    Gather + tied head on the Q8_0 embedding."""
    inits = {"wq": deq["blk.0.attn_q.weight"][perm].T.copy(), "wup": deq["blk.0.ffn_up.weight"].T.copy(),
             "wdown": deq["blk.0.ffn_down.weight"].T.copy(), "emb": deq["token_embd.weight"], **(extra or {})}
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"]), helper.make_node("MatMul", ["x", "wup"], ["up"]),
             helper.make_node("MatMul", ["x", "wdown"], ["down"]), helper.make_node("Gather", ["emb", "ids"], ["h"]),
             helper.make_node("Transpose", ["emb"], ["embT"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "embT"], ["logits"])]
    outputs = [vi(n, TensorProto.FLOAT, None) for n in ("q", "up", "down", "h", "logits")]
    if extra:
        nodes.append(helper.make_node("MatMul", ["x", "extra"], ["e"]))
        outputs.append(vi("e", TensorProto.FLOAT, None))
    return _model(nodes, [vi("x", TensorProto.FLOAT, [2, 3, 64]), vi("ids", TensorProto.INT64, [1, 4])],
                  outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])


def test_gguf_blocks_carried_exactly(gguf_file):
    path, deq = gguf_file
    perm = np.random.default_rng(0).permutation(48)
    proto = _gguf_graph(deq, perm)
    x = np.random.default_rng(1).standard_normal((2, 3, 64)).astype(np.float32)
    ids = np.array([[0, 5, 23, 9]])
    model = to_ir(proto)
    p = MatMulNBits(weight_bits=4, gguf=str(path))
    assert p(model).modified
    assert {k: p.stats[k] for k in ("quantized", "carried", "requantized", "gathers")} == {
        "quantized": 4, "carried": 3, "requantized": 1, "gathers": 1}
    assert p.requantized == ["wdown (F16 blk.0.ffn_down.weight)"]
    weights = effective_weights(model)
    # bit for bit the GGUF's dequantization: Q4_1 (4-bit + block minimum), Q4_0 (4-bit), Q8_0 (as halves)
    np.testing.assert_array_equal(weights["q"].view(np.uint32), deq["blk.0.attn_q.weight"][perm].T.view(np.uint32))
    np.testing.assert_array_equal(weights["up"].view(np.uint32), deq["blk.0.ffn_up.weight"].T.view(np.uint32))
    np.testing.assert_array_equal(weights["logits"].view(np.uint32), deq["token_embd.weight"].T.view(np.uint32))
    assert _rel(weights["down"], deq["blk.0.ffn_down.weight"].T) < 0.1  # F16: re-quantized to 4 bits
    bits = {n.outputs[0].name: n.attributes["bits"].value for n in model.graph if n.op_type == "MatMulNBits"}
    assert set(bits.values()) == {4}  # Q8_0 runs as two 4-bit halves at accuracy_level 1
    assert ops(model).count("GatherBlockQuantized") == 2 and "emb" not in model.graph.initializers  # Q8_0 halves
    out = run(model, {"x": x, "ids": ids})
    np.testing.assert_array_equal(out["h"], deq["token_embd.weight"][ids])  # the embedding, exactly
    for name, w in (("q", weights["q"]), ("up", weights["up"]), ("logits", weights["logits"])):
        np.testing.assert_allclose(out[name], x @ w, rtol=1e-5, atol=1e-5)


def test_gguf_refuses_a_weight_it_does_not_hold(gguf_file):
    path, deq = gguf_file
    perm = np.arange(48)
    stranger = np.random.default_rng(9).standard_normal((64, 8)).astype(np.float32)
    with pytest.raises(QeffGraphError, match=r"weight 'extra' \[8, 64\] is not the exact dequantization") as e:
        MatMulNBits(weight_bits=4, gguf=str(path))(to_ir(_gguf_graph(deq, perm, {"extra": stranger})))
    assert "\n" not in str(e.value) and "re-export" in str(e.value)
    # one ulp off in one element: not the GGUF's weight either
    nudged = deq["blk.0.ffn_up.weight"].T.copy()
    nudged[3, 5] = np.nextafter(nudged[3, 5], np.float32(np.inf))
    with pytest.raises(QeffGraphError, match="'extra'"):
        MatMulNBits(weight_bits=4, gguf=str(path))(to_ir(_gguf_graph(deq, perm, {"extra": nudged})))


def test_gguf_bad_inputs(gguf_file, tmp_path):
    path, deq = gguf_file
    with pytest.raises(QeffGraphError, match="does not exist"):
        MatMulNBits(weight_bits=4, gguf=str(tmp_path / "gone.gguf"))(to_ir(_linear(64)))
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(QeffGraphError, match="cannot read GGUF"):
        MatMulNBits(weight_bits=4, gguf=str(tmp_path / "bad.gguf"))(to_ir(_linear(64)))
    w16 = deq["blk.0.ffn_up.weight"].T.astype(np.float16)
    with pytest.raises(QeffGraphError, match="float32 graphs only"):
        MatMulNBits(weight_bits=4, gguf=str(path))(to_ir(_linear(64, np.float16, w16)))


def _qkv_graph():
    """x @ wq, x @ wk, x @ wv (one input) and h @ wo (another): Q/K/V are packed, o stays alone."""
    rng = np.random.default_rng(11)
    shapes = {"wq": (64, 64), "wk": (64, 16), "wv": (64, 16), "wo": (64, 64)}
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in shapes.items()]
    nodes = [helper.make_node("MatMul", ["x", w], [w[1:]]) for w in ("wq", "wk", "wv")]
    nodes.append(helper.make_node("MatMul", ["h", "wo"], ["o"]))
    return _model(nodes, [vi("x", TensorProto.FLOAT, [2, 3, 64]), vi("h", TensorProto.FLOAT, [2, 3, 64])],
                  [vi(n, TensorProto.FLOAT, None) for n in ("q", "k", "v", "o")], inits)


def test_matmuls_of_one_input_are_packed_with_the_same_numbers():
    rng = np.random.default_rng(3)
    feeds = {"x": rng.standard_normal((2, 3, 64)).astype(np.float32),
             "h": rng.standard_normal((2, 3, 64)).astype(np.float32)}
    packed, apart = to_ir(_qkv_graph()), to_ir(_qkv_graph())
    p = MatMulNBits(weight_bits=4)
    p(packed)
    MatMulNBits(weight_bits=4, pack=False)(apart)
    assert p.stats["packed"] == 3 and p.stats["quantized"] == 4 and p.stats["weights"] == 4
    kernels = [n for n in packed.graph if n.op_type == "MatMulNBits"]
    assert sorted(n.attributes["N"].value for n in kernels) == [64, 96]  # q+k+v stacked, o alone
    assert ops(packed).count("Split") == 1 and ops(apart).count("Split") == 0
    # each part computes with exactly the blocks it has alone
    mine, theirs = effective_weights(packed), effective_weights(apart)
    assert set(mine) == set(theirs) == {"q", "k", "v", "o"}
    for name in mine:
        np.testing.assert_array_equal(mine[name], theirs[name])
    a, b = run(packed, feeds), run(apart, feeds)
    for name in ("q", "k", "v", "o"):
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-5)


def test_a_weight_read_elsewhere_is_not_packed():
    proto = _qkv_graph()
    proto.graph.node.append(helper.make_node("Identity", ["wk"], ["wk_copy"]))
    proto.graph.output.append(vi("wk_copy", TensorProto.FLOAT, None))
    model = to_ir(proto)
    p = MatMulNBits(weight_bits=4)
    p(model)
    assert p.stats["packed"] == 2  # q and v; k's float weight is still needed
    assert sorted(n.attributes["N"].value for n in model.graph if n.op_type == "MatMulNBits") == [16, 64, 80]


# ---- other GGUF block types: 5-bit, K-quants --------------------------------------------------
@pytest.mark.parametrize("type_name", list(GGUF_LAYOUTS))
def test_gguf_block_types_dequantize_bit_for_bit(type_name):
    """Each carried type's blocks give gguf's own dequantization exactly (8-bit ones as halves too)."""
    import gguf

    from qeff_graph.passes.weight_blocks import _carry

    raw = random_gguf_rows(np.random.default_rng(5), type_name, 6, 512)
    want = np.asarray(gguf.dequantize(raw, gguf.GGMLQuantizationType[type_name]), np.float32).reshape(6, 512)
    blocks = _carry(type_name, raw, 512)
    assert blocks.zero_points is None  # ORT's default zero point: the kernels' symmetric path
    want_form = (4, 32) if type_name == "Q4_K" else (8, 16) if type_name == "Q6_K" else (8, 32)
    assert (blocks.bits, blocks.block_size) == want_form
    np.testing.assert_array_equal(blocks.dequantize().view(np.uint32), want.view(np.uint32))
    if blocks.bits == 8:  # the same numbers (Q6_K's negative scales: -0.0 there may come out as 0.0)
        np.testing.assert_array_equal(blocks.as_halves().dequantize(), want)


def test_gguf_k_quants_carried_exactly(tmp_path):
    """A Q4_K_M-style file (Q4_K, Q6_K, Q5_K, Q5_0, Q5_1 tensors): every weight carried, bit for bit,
    and ONNX Runtime computes x @ W with them (4-bit blocks of 32, 8-bit halves, blocks of 16)."""
    import gguf

    rng = np.random.default_rng(2)
    shapes = {"Q4_K": 48, "Q6_K": 40, "Q5_K": 16, "Q5_0": 8, "Q5_1": 24}
    path = tmp_path / "k.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    deq = {}
    for type_name, n in shapes.items():
        raw = random_gguf_rows(rng, type_name, n, 256)
        qtype = gguf.GGMLQuantizationType[type_name]
        writer.add_tensor(f"blk.0.{type_name.lower()}.weight", raw, raw_dtype=qtype)
        deq[type_name] = np.asarray(gguf.dequantize(raw, qtype), np.float32).reshape(n, 256)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    perm = rng.permutation(48)
    inits = {f"w{t}": (deq[t][perm] if t == "Q4_K" else deq[t]).T.copy() for t in shapes}
    nodes = [helper.make_node("MatMul", ["x", w], [w[1:]]) for w in inits]
    outputs = [vi(w[1:], TensorProto.FLOAT, None) for w in inits]
    proto = _model(nodes, [vi("x", TensorProto.FLOAT, [2, 3, 256])], outputs,
                   [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = to_ir(proto)
    p = MatMulNBits(weight_bits=4, gguf=str(path), pack=False)
    assert p(model).modified
    assert p.stats["carried"] == 5 and p.requantized == []
    weights = effective_weights(model)
    for t in shapes:  # 4-bit: bit for bit; 8-bit halves: the same numbers (a -0.0 may read 0.0)
        np.testing.assert_array_equal(weights[t], inits[f"w{t}"], err_msg=t)
    np.testing.assert_array_equal(weights["Q4_K"].view(np.uint32), inits["wQ4_K"].view(np.uint32))
    blocks = {n.outputs[0].name: n.attributes["block_size"].value for n in model.graph if n.op_type == "MatMulNBits"}
    assert sorted(set(blocks.values())) == [16, 32]
    x = rng.standard_normal((2, 3, 256)).astype(np.float32)
    out = run(model, {"x": x})
    for t in shapes:  # float accumulation in another order: relative error ~1e-7
        assert _rel(out[t], x @ inits[f"w{t}"]) < 1e-5, t
