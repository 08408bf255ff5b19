import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qeff_graph.errors import QeffGraphError
from qeff_graph.passes import KVRetention, PositionMask
from qeff_graph.passes.position_mask import MASKED_SCORE
from tests.passes.graphs import D, H, V, cache_model, run, to_ir


def _probs_graph():
    """cache_model with the attention probabilities and a position-table lookup as outputs."""
    model = cache_model()
    g = model.graph
    g.initializer.append(numpy_helper.from_array(np.arange(10, dtype=np.float32) * 10, "table"))
    g.node.append(helper.make_node("Gather", ["table", "position_ids"], ["pos_emb"]))
    g.output.append(helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["b", H, "s", "t"]))
    g.output.append(helper.make_tensor_value_info("pos_emb", TensorProto.FLOAT, ["b", "s"]))
    onnx.checker.check_model(model)
    return model


def test_mask_from_positions():
    model = to_ir(_probs_graph())
    KVRetention()(model)
    result = PositionMask()(model)
    assert result.modified
    assert "attention_mask" not in [v.name for v in model.graph.inputs]
    softmax = next(n for n in model.graph if n.op_type == "Softmax")
    assert softmax.inputs[0].producer().op_type == "Where"
    ctx = 6
    rng = np.random.default_rng(0)
    k = rng.standard_normal((2, H, ctx, D)).astype(np.float32)
    pos = np.array([[2, 3], [0, -1]])
    out = run(model, {"input_ids": rng.integers(0, V, (2, 2)), "position_ids": pos,
                      "past_key.0": k, "past_value.0": k})
    probs = out["probs"]  # [B, H, S, ctx]
    for b in range(2):
        for s in range(2):
            p = pos[b, s]
            if p < 0:  # a pad sees nothing: uniform, finite
                assert np.isfinite(probs[b, :, s]).all()
                continue
            assert np.all(probs[b, :, s, p + 1:] == 0.0)
            assert np.all(probs[b, :, s, : p + 1] > 0.0)
            np.testing.assert_allclose(probs[b, :, s].sum(-1), 1.0, rtol=1e-6)
    # other consumers read max(position_ids, 0): the pad looks up row 0, not row -1
    assert out["pos_emb"].tolist() == [[20.0, 30.0], [0.0, 0.0]]


def test_sliding_window_mask():
    model = to_ir(_probs_graph())
    KVRetention()(model)
    PositionMask(sliding_window=2)(model)
    ctx = 8
    rng = np.random.default_rng(0)
    k = rng.standard_normal((1, H, ctx, D)).astype(np.float32)
    pos = np.array([[4, 5]])
    probs = run(model, {"input_ids": rng.integers(0, V, (1, 2)), "position_ids": pos,
                        "past_key.0": k, "past_value.0": k})["probs"]
    for s, p in enumerate(pos[0]):  # sees exactly positions p-1 and p
        assert np.all(probs[0, :, s, p - 1: p + 1] > 0.0)
        assert np.all(probs[0, :, s, : p - 1] == 0.0) and np.all(probs[0, :, s, p + 1:] == 0.0)


def test_attention_op_gets_bool_mask():
    """ONNX Attention (opset 23): attn_mask replaced, is_causal cleared."""
    S, T = "seq", "total"
    nodes = [
        helper.make_node("Concat", ["past_key_values.0.key", "k"], ["present.0.key"], axis=2),
        helper.make_node("Concat", ["past_key_values.0.value", "k"], ["present.0.value"], axis=2),
        helper.make_node("Attention", ["k", "present.0.key", "present.0.value", "mask"], ["y"], is_causal=1),
        helper.make_node("Cast", ["attention_mask"], ["mask"], to=TensorProto.BOOL),
    ]
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "g", [
        vi("input_ids", TensorProto.INT64, ["b", S]), vi("position_ids", TensorProto.INT64, ["b", S]),
        vi("attention_mask", TensorProto.INT64, ["b", T]), vi("k", TensorProto.FLOAT, ["b", H, S, D]),
        vi("past_key_values.0.key", TensorProto.FLOAT, ["b", H, "p", D]),
        vi("past_key_values.0.value", TensorProto.FLOAT, ["b", H, "p", D]),
    ], [vi("y", TensorProto.FLOAT, None), vi("present.0.key", TensorProto.FLOAT, None),
        vi("present.0.value", TensorProto.FLOAT, None)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model = to_ir(proto)
    KVRetention()(model)
    PositionMask()(model)
    att = next(n for n in model.graph if n.op_type == "Attention")
    assert att.attributes["is_causal"].value == 0
    assert att.inputs[3].name == "qeff_visible_mask"
    rng = np.random.default_rng(0)
    k = rng.standard_normal((1, H, 2, D)).astype(np.float32)
    cache = np.zeros((1, H, 5, D), np.float32)
    out = run(model, {"input_ids": np.zeros((1, 2), np.int64), "position_ids": np.array([[0, 1]]),
                      "k": k, "past_key.0": cache, "past_value.0": cache})
    # query 0 sees only slot 0 (itself): output equals its own value row
    np.testing.assert_allclose(out["y"][0, :, 0], k[0, :, 0], atol=1e-6)


def test_masked_score_is_fp16_safe():
    assert np.isfinite(np.float16(MASKED_SCORE)) and np.exp(np.float32(MASKED_SCORE)) == 0.0


def test_position_ids_synthesized_when_the_graph_needs_none():
    """No position_ids input and no positions computed inside: the pass adds the input."""
    proto = cache_model()
    proto.graph.input.remove(next(i for i in proto.graph.input if i.name == "position_ids"))
    model = to_ir(proto)
    PositionMask()(model)
    assert "position_ids" in [v.name for v in model.graph.inputs]
    assert "attention_mask" not in [v.name for v in model.graph.inputs]


def test_positions_computed_inside_are_refused():
    """Range(past_len, past_len + seq) feeding a position table: wrong with a retained cache."""
    proto = cache_model()
    g = proto.graph
    g.input.remove(next(i for i in g.input if i.name == "position_ids"))
    g.initializer.append(numpy_helper.from_array(np.arange(10, dtype=np.float32), "table"))
    g.initializer.append(numpy_helper.from_array(np.array(1, np.int64), "step"))
    g.node.extend([
        helper.make_node("Squeeze", ["past_len"], ["p0"]),
        helper.make_node("Squeeze", ["total_len"], ["t0"]),
        helper.make_node("Range", ["p0", "t0", "step"], ["positions"], name="cache_position"),
        helper.make_node("Gather", ["table", "positions"], ["pos_emb"]),
    ])
    g.output.append(helper.make_tensor_value_info("pos_emb", TensorProto.FLOAT, ["s"]))
    with pytest.raises(QeffGraphError, match="'cache_position' \\(Range\\) computes token positions"):
        PositionMask()(to_ir(proto))


