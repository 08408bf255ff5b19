"""Attention-site analysis and the position-mask rewrite on small hand-built graphs: biases kept,
routers untouched, anything not understood refused with the node named, pads neutral."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from qeff_graph.errors import PreconditionError, UnsupportedGraphError
from qeff_graph.ir.attention import find_attention_sites
from qeff_graph.passes import KVRetention, PassManager, PastShape, PositionMask
from tests.passes.graphs import D, H, V, cache_model, reference_attention, run, to_ir

SLOPES = np.array([0.5, 0.25], np.float32)  # one per head


def _with(proto, nodes, inits=(), replace=None, outputs=()):
    """cache_model plus ``nodes``; ``replace`` = (node output, input index, new input name)."""
    g = proto.graph
    if replace:
        out, index, name = replace
        node = next(n for n in g.node if out in n.output)
        node.input[index] = name
    g.node.extend(nodes)
    g.initializer.extend(inits)
    g.output.extend(outputs)
    return proto


def _alibi(masked_where: bool):
    """scores + alibi (slopes × key position from cumsum(attention_mask) - 1) + mask."""
    nodes = [
        helper.make_node("CumSum", ["attention_mask", "axis1"], ["cum"]),
        helper.make_node("Sub", ["cum", "one_i"], ["kpos_i"]),
        helper.make_node("Cast", ["kpos_i"], ["kpos"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["kpos", "axes12"], ["kpos4"]),  # [B,1,1,T]
        helper.make_node("Mul", ["slopes", "kpos4"], ["alibi"]),  # [B,H,1,T]
    ]
    if masked_where:  # falcon: alibi.masked_fill(~mask, min)
        nodes += [helper.make_node("Cast", ["attention_mask"], ["keep"], to=TensorProto.BOOL),
                  helper.make_node("Unsqueeze", ["keep", "axes12"], ["keep4"]),
                  helper.make_node("Where", ["keep4", "alibi", "neg_big"], ["masked_alibi"]),
                  helper.make_node("Add", ["masked_alibi", "cm_fill"], ["term"])]  # and the causal part
    else:
        nodes += [helper.make_node("Add", ["alibi", "add_mask"], ["term"])]
    inits = [numpy_helper.from_array(SLOPES.reshape(1, H, 1, 1), "slopes"),
             numpy_helper.from_array(np.array([1], np.int64), "axis1"),
             numpy_helper.from_array(np.array(1, np.int64), "one_i")]
    return _with(cache_model(), nodes, inits, replace=("masked", 1, "term"))


def _feeds(pos, ctx=6, seed=0):
    rng = np.random.default_rng(seed)
    B, S = pos.shape
    return {"input_ids": rng.integers(0, V, (B, S)), "position_ids": pos,
            "past_key.0": rng.standard_normal((B, H, ctx, D)).astype(np.float32),
            "past_value.0": rng.standard_normal((B, H, ctx, D)).astype(np.float32)}


def _weights(proto):
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    return inits["emb"], inits["lm_head"]


@pytest.mark.parametrize("masked_where", [False, True])
def test_alibi_bias_is_kept(masked_where):
    proto = _alibi(masked_where)
    emb, head = _weights(proto)
    model = to_ir(proto)
    sites = find_attention_sites(model)
    assert len(sites) == 1 and len(sites[0].terms[0].biases) == 1
    PassManager([PastShape(), PositionMask(), KVRetention()])(model)
    pos = np.array([[2, 3], [0, -1]])
    feeds = _feeds(pos)
    out = run(model, feeds)
    # reference: the same attention with slopes[h] * j added for key slot j
    B, S = pos.shape
    ids, K, Vc = feeds["input_ids"], feeds["past_key.0"].copy(), feeds["past_value.0"].copy()
    k_new = emb[ids].reshape(B, S, H, D).transpose(0, 2, 1, 3)
    for b in range(B):
        for s in range(S):
            if pos[b, s] >= 0:
                K[b, :, pos[b, s]], Vc[b, :, pos[b, s]] = k_new[b, :, s], -k_new[b, :, s]
    scores = k_new @ K.transpose(0, 1, 3, 2) + SLOPES[None, :, None, None] * np.arange(6)
    scores = np.where(np.arange(6) <= pos[:, None, :, None], scores, -10000.0)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    hidden = (p @ Vc).transpose(0, 2, 1, 3).reshape(B, S, H * D)
    np.testing.assert_allclose(out["logits"][:, 0], (hidden @ head)[:, 0], atol=1e-5)
    # without the bias the numbers differ: the test can fail
    assert not np.allclose(out["logits"][:, 0], reference_attention(
        emb, head, ids, pos, feeds["past_key.0"], feeds["past_value.0"])[0][:, 0], atol=1e-3)


def test_router_softmax_is_not_touched():
    """A mixture-of-experts router: Softmax(MatMul(hidden, W)) keeps its input."""
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.standard_normal((H * D, 4)).astype(np.float32), "router_w")
    nodes = [helper.make_node("MatMul", ["hidden", "router_w"], ["router_logits"]),
             helper.make_node("Softmax", ["router_logits"], ["router_probs"], axis=-1, name="router")]
    out = [helper.make_tensor_value_info("router_probs", TensorProto.FLOAT, None)]
    model = to_ir(_with(cache_model(), nodes, [w], outputs=out))
    assert len(find_attention_sites(model)) == 1
    PassManager([KVRetention(), PositionMask()])(model)
    router = next(n for n in model.graph if n.name == "router")
    assert router.inputs[0].producer().op_type == "MatMul"
    result = run(model, _feeds(np.array([[0, 1]])))
    np.testing.assert_allclose(result["router_probs"].sum(-1), 1.0, rtol=1e-6)


def test_unknown_op_on_scores_is_refused():
    nodes = [helper.make_node("Abs", ["scores"], ["scores_abs"], name="odd_abs")]
    model = to_ir(_with(cache_model(), nodes, replace=("masked", 0, "scores_abs")))
    before = len(list(model.graph))
    with pytest.raises(UnsupportedGraphError, match="'odd_abs' \\(Abs\\) on the attention scores of layer 0"):
        PositionMask()(model)
    assert len(list(model.graph)) == before  # refused before any change


def test_mask_built_another_way_is_refused():
    """(mask < 1) * 1e9 subtracted-like: looks like a mask, is not a known form: refused."""
    nodes = [helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
             helper.make_node("Less", ["mf", "one"], ["hidden_mask"], name="odd_less"),
             helper.make_node("Cast", ["hidden_mask"], ["hm"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["hm", "big"], ["pen"]),
             helper.make_node("Neg", ["pen"], ["neg_pen"]),
             helper.make_node("Unsqueeze", ["neg_pen", "axes12"], ["pen4"])]
    inits = [numpy_helper.from_array(np.array(1e9, np.float32), "big")]
    model = to_ir(_with(cache_model(), nodes, inits, replace=("masked", 1, "pen4")))
    with pytest.raises(UnsupportedGraphError, match="'odd_less' \\(Less\\), like a mask"):
        PositionMask()(model)


def test_scores_read_twice_are_refused():
    nodes = [helper.make_node("ReduceMax", ["scores"], ["smax"], name="stable_max", keepdims=1)]
    out = [helper.make_tensor_value_info("smax", TensorProto.FLOAT, None)]
    model = to_ir(_with(cache_model(), nodes, outputs=out))
    with pytest.raises(UnsupportedGraphError, match="read by 2 nodes"):
        PositionMask()(model)


def test_position_mask_refuses_its_own_output():
    model = to_ir(cache_model())
    PassManager([KVRetention(), PositionMask()])(model)
    with pytest.raises(PreconditionError, match="already applied"):
        PositionMask()(model)


def test_per_layer_windows_need_one_entry_per_layer():
    model = to_ir(cache_model())
    before = len(list(model.graph))
    with pytest.raises(UnsupportedGraphError, match="lists 2 layers but the graph has 1"):
        PositionMask(sliding_window=[4, None])(model)
    assert len(list(model.graph)) == before  # refused before any change
    model = to_ir(cache_model())
    result = PositionMask(sliding_window=[None])(model)
    assert result.modified and "windows" not in PositionMask(sliding_window=[None]).__dict__.get("stats", {})


def test_nan_pad_does_not_poison_other_rows():
    """A pad token whose key/value rows are NaN writes zeros: real rows stay exact."""
    proto = cache_model()
    emb, head = _weights(proto)
    nan_emb = emb.copy()
    nan_emb[0] = np.nan  # token 0 is the pad: a degenerate hidden state
    for t in proto.graph.initializer:
        if t.name == "emb":
            t.CopyFrom(numpy_helper.from_array(nan_emb, "emb"))
    model = to_ir(proto)
    PassManager([KVRetention(), PositionMask()])(model)
    ids = np.array([[3, 5, 0], [7, 0, 0]])
    pos = np.array([[0, 1, -1], [0, -1, -1]])
    ctx = 4
    zeros = np.zeros((2, H, ctx, D), np.float32)
    out = run(model, {"input_ids": ids, "position_ids": pos, "past_key.0": zeros, "past_value.0": zeros})
    assert np.isfinite(out["past_key.0_RetainedState"]).all()
    assert np.isfinite(out["past_value.0_RetainedState"]).all()
    ref = reference_attention(emb, head, np.array([[3, 5, 1], [7, 1, 1]]), pos, zeros, zeros)[0]
    np.testing.assert_allclose(out["logits"][0, 1], ref[0, 1], atol=1e-5)
    np.testing.assert_allclose(out["logits"][1, 0], ref[1, 0], atol=1e-5)


def test_scores_transposed_off_the_key_axis_are_refused():
    nodes = [helper.make_node("Transpose", ["scores"], ["scores_t"], perm=[0, 1, 3, 2], name="odd_transpose")]
    model = to_ir(_with(cache_model(), nodes, replace=("masked", 0, "scores_t")))
    with pytest.raises(UnsupportedGraphError, match="'odd_transpose' \\(Transpose\\) reshapes the attention scores"):
        find_attention_sites(model)


def test_scores_reshaped_keeping_the_key_axis_are_understood():
    """Bloom-style: scores viewed as [B, H, S, T] through a Reshape whose shapes keep T last."""
    nodes = [helper.make_node("Shape", ["scores"], ["scores_shape"]),
             helper.make_node("Reshape", ["scores", "scores_shape"], ["scores_r"], name="view")]
    model = to_ir(_with(cache_model(), nodes, replace=("masked", 0, "scores_r")))
    sites = find_attention_sites(model)
    assert len(sites) == 1 and [n.op_type for n in sites[0].chain] == ["Reshape", "Add", "Softmax"]
