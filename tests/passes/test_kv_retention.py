import numpy as np
import onnx_ir as ir
import pytest

from qeff_graph.errors import QeffGraphError
from qeff_graph.errors import PreconditionError
from qeff_graph.passes import KVRetention, LastTokenLogits, PastShape, PositionMask, PassManager
from tests.passes.graphs import D, H, V, cache_model, ops, reference_attention, run, to_ir

RETAINED = ["past-shape", "position-mask", "kv-retention", "last-token-logits", "cleanup"]


def _weights(proto):
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    return inits["emb"], inits["lm_head"]


def test_structure_and_io_contract():
    model = to_ir(cache_model())
    result = KVRetention()(model)
    assert result.modified
    inputs = {v.name: v for v in model.graph.inputs}
    outputs = {v.name: v for v in model.graph.outputs}
    for kind in ("key", "value"):
        past = inputs[f"past_{kind}.0"]
        assert [str(d) if not isinstance(d, int) else d for d in past.shape.dims] == ["batch_size", H, "ctx_len", D]
        out = outputs[f"past_{kind}.0_RetainedState"]
        assert out.producer().op_type == "ScatterND" and out.producer().inputs[0] is past
    assert ops(model).count("ScatterND") == 2
    assert not any(n.op_type == "Concat" and n.inputs[0] in model.graph.inputs for n in model.graph)
    # idempotent
    with pytest.raises(PreconditionError, match="already retained"):
        KVRetention()(model)  # its own output is refused, not silently passed through


@pytest.mark.parametrize("ctx_len", [8, 12])
def test_retained_numbers_ragged_batch(ctx_len):
    proto = cache_model()
    emb, head = _weights(proto)
    model = PassManager(RETAINED)(to_ir(proto)).model
    rng = np.random.default_rng(1)
    ids = rng.integers(0, V, (2, 3))
    pos = np.array([[0, 1, 2], [0, 1, -1]])  # row 1 padded
    k = rng.standard_normal((2, H, ctx_len, D)).astype(np.float32)
    v = rng.standard_normal((2, H, ctx_len, D)).astype(np.float32)
    out = run(model, {"input_ids": ids, "position_ids": pos, "past_key.0": k, "past_value.0": v})
    ref_logits, ref_k, ref_v = reference_attention(emb, head, ids, pos, k, v)
    assert out["logits"].shape == (2, 1, V)
    np.testing.assert_allclose(out["logits"][0, 0], ref_logits[0, 2], atol=1e-5)
    np.testing.assert_allclose(out["logits"][1, 0], ref_logits[1, 1], atol=1e-5)
    # the pad wrote zeros into slot ctx_len-1 of row 1 only; everything else matches the reference
    ref_k[1, :, -1] = 0.0
    ref_v[1, :, -1] = 0.0
    np.testing.assert_allclose(out["past_key.0_RetainedState"], ref_k, atol=0)
    np.testing.assert_allclose(out["past_value.0_RetainedState"], ref_v, atol=0)
    assert out["total_len"].tolist() == [ctx_len]  # past-shape: past + seq == ctx_len


def test_decode_step_sees_earlier_rows():
    proto = cache_model()
    emb, head = _weights(proto)
    model = PassManager(RETAINED)(to_ir(proto)).model
    ctx = 8
    k = np.zeros((1, H, ctx, D), np.float32)
    v = np.zeros((1, H, ctx, D), np.float32)
    ids = np.array([[3, 7, 9, 1]])
    full_logits, _, _ = reference_attention(emb, head, ids, np.arange(4)[None], k, v)
    out = run(model, {"input_ids": ids[:, :3], "position_ids": np.arange(3)[None], "past_key.0": k, "past_value.0": v})
    out = run(model, {"input_ids": ids[:, 3:], "position_ids": np.array([[3]]),
                      "past_key.0": out["past_key.0_RetainedState"], "past_value.0": out["past_value.0_RetainedState"]})
    np.testing.assert_allclose(out["logits"][0, 0], full_logits[0, 3], atol=1e-5)


def test_float16_cache():
    proto = cache_model()
    emb, head = _weights(proto)
    model = PassManager(RETAINED, kv_dtype="float16")(to_ir(proto)).model
    past = {v.name: v for v in model.graph.inputs}["past_key.0"]
    assert past.dtype == ir.DataType.FLOAT16
    ids, pos = np.array([[1, 2, 3]]), np.array([[0, 1, 2]])
    k = np.zeros((1, H, 6, D), np.float16)
    out = run(model, {"input_ids": ids, "position_ids": pos, "past_key.0": k, "past_value.0": k})
    assert out["past_key.0_RetainedState"].dtype == np.float16
    ref, _, _ = reference_attention(emb, head, ids, pos, k.astype(np.float32), k.astype(np.float32))
    np.testing.assert_allclose(out["logits"][0, 0], ref[0, 2], atol=2e-2, rtol=2e-2)


def test_continuous_batching_rows():
    proto = cache_model()
    emb, head = _weights(proto)
    model = PassManager(RETAINED, continuous_batching=True)(to_ir(proto)).model
    names = [v.name for v in model.graph.inputs]
    assert "batch_index" in names
    rng = np.random.default_rng(2)
    full = rng.standard_normal((3, H, 8, D)).astype(np.float32)
    ids, pos = rng.integers(0, V, (2, 2)), np.array([[0, 1], [4, 5]])
    out = run(model, {"input_ids": ids, "position_ids": pos, "batch_index": np.array([[2], [0]]),
                      "past_key.0": full, "past_value.0": full})
    ref, ref_k, _ = reference_attention(emb, head, ids, pos, full[[2, 0]], full[[2, 0]])
    np.testing.assert_allclose(out["logits"][:, 0], ref[:, 1], atol=1e-5)
    np.testing.assert_allclose(out["past_key.0_RetainedState"][[2, 0]], ref_k, atol=0)
    np.testing.assert_array_equal(out["past_key.0_RetainedState"][1], full[1])  # untouched row


def test_requires_position_ids():
    proto = cache_model()
    proto.graph.input.remove(next(i for i in proto.graph.input if i.name == "position_ids"))
    with pytest.raises(QeffGraphError, match="position_ids"):
        KVRetention()(to_ir(proto))


def test_bad_kv_dtype():
    with pytest.raises(QeffGraphError, match="kv-dtype"):
        KVRetention(kv_dtype="int8")


def test_passes_compose_individually():
    model = to_ir(cache_model())
    for p in (PastShape(), PositionMask(), KVRetention(), LastTokenLogits()):
        assert p(model).modified


def test_attention_op_with_past_inputs():
    """ONNX Attention (opset 23) taking past_key/past_value: scatter, then attend over the cache."""
    from onnx import TensorProto, helper

    vi = helper.make_tensor_value_info
    nodes = [helper.make_node("Attention", ["q", "k", "v", "mask", "past_key_values.0.key", "past_key_values.0.value"],
                              ["y", "present.0.key", "present.0.value"]),
             # the causal mask over past + new keys, from the past length, as exporters build it
             helper.make_node("Shape", ["past_key_values.0.key"], ["past_len"], start=2, end=3),
             helper.make_node("Shape", ["input_ids"], ["seq_len"], start=1, end=2),
             helper.make_node("Add", ["past_len", "seq_len"], ["total_len"]),
             helper.make_node("Squeeze", ["past_len"], ["p0"]),
             helper.make_node("Squeeze", ["total_len"], ["t0"]),
             helper.make_node("Range", ["zero", "t0", "one"], ["keys"]),
             helper.make_node("Range", ["p0", "t0", "one"], ["queries"]),
             helper.make_node("Unsqueeze", ["queries", "last"], ["query"]),
             helper.make_node("LessOrEqual", ["keys", "query"], ["mask"])]
    inits = [helper.make_tensor("zero", TensorProto.INT64, [], [0]), helper.make_tensor("one", TensorProto.INT64, [], [1]),
             helper.make_tensor("last", TensorProto.INT64, [1], [-1])]
    graph = helper.make_graph(nodes, "g", [
        vi("input_ids", TensorProto.INT64, ["b", "s"]), vi("position_ids", TensorProto.INT64, ["b", "s"]),
        vi("q", TensorProto.FLOAT, ["b", H, "s", D]), vi("k", TensorProto.FLOAT, ["b", H, "s", D]),
        vi("v", TensorProto.FLOAT, ["b", H, "s", D]),
        vi("past_key_values.0.key", TensorProto.FLOAT, ["b", H, "p", D]),
        vi("past_key_values.0.value", TensorProto.FLOAT, ["b", H, "p", D])],
        [vi("y", TensorProto.FLOAT, ["b", H, "s", D]), vi("present.0.key", TensorProto.FLOAT, ["b", H, "t", D]),
         vi("present.0.value", TensorProto.FLOAT, ["b", H, "t", D])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model = PassManager(["kv-retention", "position-mask", "cleanup"])(to_ir(proto)).model
    att = next(n for n in model.graph if n.op_type == "Attention")
    assert att.inputs[1].producer().op_type == "ScatterND" and len([i for i in att.inputs[4:] if i]) == 0
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, H, 2, D)).astype(np.float32) for _ in range(3))
    cache = np.zeros((1, H, 6, D), np.float32)
    cache[:, :, 0] = rng.standard_normal((H, D))  # an earlier token at position 0
    out = run(model, {"input_ids": np.zeros((1, 2), np.int64), "position_ids": np.array([[1, 2]]),
                      "q": q, "k": k, "v": v, "past_key.0": cache, "past_value.0": cache})
    keys = np.concatenate([cache[:, :, :1], k], axis=2)
    vals = np.concatenate([cache[:, :, :1], v], axis=2)
    scores = q @ keys.transpose(0, 1, 3, 2) / np.sqrt(D)
    scores = np.where(np.arange(3)[None, None, None] <= np.array([1, 2])[None, None, :, None], scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(out["y"], p @ vals, atol=1e-5)
    np.testing.assert_allclose(out["past_key.0_RetainedState"][:, :, 1:3], k, atol=0)
