import numpy as np
import onnx
import onnx_ir as ir
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
        helper.make_node("Attention", ["k", "present.0.key", "present.0.value", "mask"], ["y"]),
        # padding from attention_mask and a causal part from the past length, as exporters build it
        helper.make_node("Cast", ["attention_mask"], ["pad"], to=TensorProto.BOOL),
        helper.make_node("Shape", ["past_key_values.0.key"], ["past_len"], start=2, end=3),
        helper.make_node("Shape", ["attention_mask"], ["total_len"], start=1, end=2),
        helper.make_node("Squeeze", ["past_len"], ["p0"]),
        helper.make_node("Squeeze", ["total_len"], ["t0"]),
        helper.make_node("Range", ["zero", "t0", "one"], ["keys"]),
        helper.make_node("Range", ["p0", "t0", "one"], ["queries"]),
        helper.make_node("Unsqueeze", ["queries", "last"], ["query"]),
        helper.make_node("LessOrEqual", ["keys", "query"], ["causal"]),
        helper.make_node("And", ["pad", "causal"], ["mask"]),
    ]
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "g", [
        vi("input_ids", TensorProto.INT64, ["b", S]), vi("position_ids", TensorProto.INT64, ["b", S]),
        vi("attention_mask", TensorProto.INT64, ["b", T]), vi("k", TensorProto.FLOAT, ["b", H, S, D]),
        vi("past_key_values.0.key", TensorProto.FLOAT, ["b", H, "p", D]),
        vi("past_key_values.0.value", TensorProto.FLOAT, ["b", H, "p", D]),
    ], [vi("y", TensorProto.FLOAT, None), vi("present.0.key", TensorProto.FLOAT, None),
        vi("present.0.value", TensorProto.FLOAT, None)])
    graph.initializer.extend([numpy_helper.from_array(np.array(0, np.int64), "zero"),
                              numpy_helper.from_array(np.array(1, np.int64), "one"),
                              numpy_helper.from_array(np.array([-1], np.int64), "last")])
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


# --- graphs without position_ids that compute their positions (exports of GPT-2/Gemma-style models)

CTX = 8
BIG = np.iinfo(np.int64).max


def _computed_positions(kind: str, position_ids: bool = False, extra=(), outputs=()):
    """cache_model whose token embeddings get a learned position embedding ``table[positions]``,
    the positions computed inside the graph:

    * ``range``: ``Unsqueeze(Range(past_len, past_len + seq), 0)`` ([1, S]), the Range also
      building the causal mask term all graphs have (a mask only: never a model read);
    * ``range-expand``: the same, then ``Expand`` to ``[batch, seq]``;
    * ``range-shifted``: ``Unsqueeze(Range(0, seq) + past_len, 0)`` (how transformers' traces read);
    * ``range-rotary``: ``sin(Unsqueeze(Range(past_len, past_len + seq), [0, 2]) * freqs)`` as the
      position embedding ([1, S, 1] positions, no table);
    * ``cumsum``: ``Slice(Where(mask == 0, 1, CumSum(mask, 1) - 1), -seq, end, axes=[1])`` ([B, S]).

    ``extra`` nodes and initializers (and ``outputs``, more graph outputs by name) change the
    graph for the negative tests; ``positions`` is the value the table reads."""
    proto = cache_model()
    g = proto.graph
    if not position_ids:
        g.input.remove(next(i for i in g.input if i.name == "position_ids"))
    g.node[0].output[0] = "x_tok"  # Gather(emb, input_ids)
    rng = np.random.default_rng(1)
    g.initializer.extend([
        numpy_helper.from_array(rng.standard_normal((16, H * D)).astype(np.float32), "table"),
        numpy_helper.from_array(np.array(1, np.int64), "one_i"),
        numpy_helper.from_array(np.array(0, np.int64), "zero_i"),
        numpy_helper.from_array(np.array(5, np.int64), "five"),
        numpy_helper.from_array(np.array([0], np.int64), "axes0"),
        numpy_helper.from_array(np.array([1], np.int64), "axes1"),
        numpy_helper.from_array(np.array([BIG], np.int64), "big"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero_f"),
        numpy_helper.from_array(np.array([0, 2], np.int64), "axes02"),
        numpy_helper.from_array(rng.uniform(0.1, 1.0, H * D).astype(np.float32), "freqs"),
    ])
    # HF-style causal mask from cache_position = Range(past_len, past_len + seq): key j > query
    # position -> -1e9 (a mask only, so never one of the model's position reads)
    g.node.extend([
        helper.make_node("Squeeze", ["past_len"], ["p0"]),
        helper.make_node("Squeeze", ["total_len"], ["t0"]),
        helper.make_node("Range", ["p0", "t0", "one_i"], ["cache_position"], name="cache_position"),
        helper.make_node("Range", ["zero_i", "t0", "one_i"], ["key_pos"], name="key_range"),
        helper.make_node("Unsqueeze", ["key_pos", "axes0"], ["kp"]),
        helper.make_node("Unsqueeze", ["cache_position", "axes1"], ["qp"]),
        helper.make_node("Greater", ["kp", "qp"], ["future"]),
        helper.make_node("Where", ["future", "neg_big", "zero_f"], ["causal"]),  # [S, T]
        helper.make_node("Add", ["add_mask", "causal"], ["full_mask"]),
    ])
    next(n for n in g.node if n.output[0] == "masked").input[1] = "full_mask"  # Add(scores, mask)
    if kind == "range":
        g.node.append(helper.make_node("Unsqueeze", ["cache_position", "axes0"], ["positions"]))
    elif kind == "range-expand":  # Expand([1, S], [batch, seq]): per row
        g.node.extend([helper.make_node("Unsqueeze", ["cache_position", "axes0"], ["pos1"]),
                       helper.make_node("Shape", ["input_ids"], ["batch"], start=0, end=1),
                       helper.make_node("Concat", ["batch", "seq_len"], ["batch_seq"], axis=0),
                       helper.make_node("Expand", ["pos1", "batch_seq"], ["positions"])])
    elif kind == "range-shifted":
        g.node.extend([helper.make_node("Squeeze", ["seq_len"], ["s0"]),
                       helper.make_node("Range", ["zero_i", "s0", "one_i"], ["arange"], name="arange"),
                       helper.make_node("Add", ["arange", "p0"], ["shifted"]),
                       helper.make_node("Unsqueeze", ["shifted", "axes0"], ["positions"])])
    elif kind == "range-rotary":
        g.node.extend([helper.make_node("Unsqueeze", ["cache_position", "axes02"], ["pos3"]),
                       helper.make_node("Cast", ["pos3"], ["pos3f"], to=TensorProto.FLOAT),
                       helper.make_node("Mul", ["pos3f", "freqs"], ["angles"]),
                       helper.make_node("Sin", ["angles"], ["pos_emb"])])
    else:
        g.node.extend([
            helper.make_node("CumSum", ["attention_mask", "one_i"], ["cs"], name="cumsum_positions"),
            helper.make_node("Sub", ["cs", "one_i"], ["cs1"]),
            helper.make_node("Equal", ["attention_mask", "zero_i"], ["is_pad"]),
            helper.make_node("Where", ["is_pad", "one_i", "cs1"], ["filled"]),
            helper.make_node("Neg", ["seq_len"], ["minus_seq"]),
            helper.make_node("Slice", ["filled", "minus_seq", "big", "axes1"], ["positions"]),
        ])
    if kind != "range-rotary":
        g.node.append(helper.make_node("Gather", ["table", "positions"], ["pos_emb"]))
    g.node.append(helper.make_node("Add", ["x_tok", "pos_emb"], ["x"]))
    g.node.extend(e for e in extra if isinstance(e, onnx.NodeProto))
    g.initializer.extend(e for e in extra if isinstance(e, onnx.TensorProto))
    g.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs)
    model = to_ir(onnx.shape_inference.infer_shapes(proto))  # ranks, as exporters record them
    model.graph.sort()
    return model


def _program(model, past_shape: bool):
    from qeff_graph.passes import PastShape

    model = to_ir(ir.to_proto(model))  # a copy
    if past_shape:  # as the retained-kv pipeline runs it: the past length is then a virtual shape
        PastShape()(model)
    mask = PositionMask()
    mask(model)
    assert mask.stats["position_ids_added"] == 1 and mask.stats["computed_positions_replaced"] == 1
    KVRetention()(model)
    # the position embedding now comes from position_ids, and from no Range or CumSum
    cone, stack = set(), [next(v for n in model.graph for v in n.outputs if v.name == "pos_emb")]
    while stack:
        node = stack.pop().producer()
        if node is not None and node not in cone:
            cone.add(node)
            stack.extend(v for v in node.inputs if v is not None)
    assert "qeff_position_ids_clamped" in {v.name for n in cone for v in n.outputs}
    assert not {n.op_type for n in cone} & {"Range", "CumSum"}
    return model


def _compare(program, original, feeds, rows, lengths, seq):
    """program rows vs the original graph run for each row with its true past: logits and new cache rows."""
    out = run(program, feeds)
    for r, (orig_feeds, orig_row, past) in enumerate(rows):
        ref = run(original, orig_feeds)
        np.testing.assert_allclose(out["logits"][r], ref["logits"][orig_row], atol=1e-5, rtol=0)
        for kind in ("key", "value"):
            np.testing.assert_allclose(out[f"past_{kind}.0_RetainedState"][r, :, lengths[r]: lengths[r] + seq],
                                       ref[f"present.0.{kind}"][orig_row, :, past: past + seq], atol=1e-5, rtol=0)


@pytest.mark.parametrize("past_shape", [False, True])
@pytest.mark.parametrize("kind", ["range", "range-expand", "range-shifted", "range-rotary"])
@pytest.mark.parametrize("seq,lengths", [(2, (3, 5)), (1, (7, 2)), (3, (1, 4))])
def test_range_positions_become_position_ids(seq, lengths, kind, past_shape):
    """Range(past_len, past_len + seq) -> Unsqueeze [-> Expand] -> position embedding: position_ids.

    The program (retained cache, past length always ctx_len) at per-row positions equals the
    original graph run row by row with a dynamic past of the row's true length."""
    original = _computed_positions(kind)
    program = _program(original, past_shape)
    rng = np.random.default_rng(seq)
    B = len(lengths)
    ids = rng.integers(0, V, (B, seq))
    cache = rng.standard_normal((B, H, CTX, D)).astype(np.float32)  # slots past the row's length: garbage
    pos = np.array([np.arange(n, n + seq) for n in lengths])
    rows = []
    for r, n in enumerate(lengths):
        rows.append(({"input_ids": ids[r: r + 1], "attention_mask": np.ones((1, n + seq), np.int64),
                      "past_key_values.0.key": cache[r: r + 1, :, :n],
                      "past_key_values.0.value": cache[r: r + 1, :, :n]}, 0, n))
    _compare(program, original, {"input_ids": ids, "position_ids": pos, "past_key.0": cache,
                                 "past_value.0": cache.copy()}, rows, lengths, seq)


@pytest.mark.parametrize("past_shape", [False, True])
def test_cumsum_positions_become_position_ids(past_shape):
    """CumSum(attention_mask) - 1, pads filled, last seq columns sliced: replaced by position_ids.

    The original runs one left-padded batch (row 1 has 2 pad slots in its past, so its tokens sit
    at 3, 4); the program keeps each row's real past in slots 0.. and gets the real positions."""
    original = _computed_positions("cumsum")
    program = _program(original, past_shape)
    rng = np.random.default_rng(3)
    seq, padded = 2, 5
    ids = rng.integers(0, V, (2, seq))
    past = rng.standard_normal((2, H, padded, D)).astype(np.float32)
    mask = np.ones((2, padded + seq), np.int64)
    mask[1, :2] = 0
    lengths = (5, 3)
    cache = rng.standard_normal((2, H, CTX, D)).astype(np.float32)
    cache[0, :, :5] = past[0]
    cache[1, :, :3] = past[1, :, 2:]
    orig = {"input_ids": ids, "attention_mask": mask, "past_key_values.0.key": past,
            "past_key_values.0.value": past}
    pos = np.array([[5, 6], [3, 4]])
    _compare(program, original, {"input_ids": ids, "position_ids": pos, "past_key.0": cache,
                                 "past_value.0": cache.copy()},
             [(orig, 0, padded), (orig, 1, padded)], lengths, seq)


def _refused(model, match: str):
    before = ir.to_proto(model).SerializeToString()
    with pytest.raises(QeffGraphError, match=match) as info:
        PositionMask()(model)
    assert "\n" not in str(info.value)
    assert ir.to_proto(model).SerializeToString() == before  # refused before any change


def test_computed_positions_with_a_position_ids_input_are_refused():
    _refused(_computed_positions("range", position_ids=True),
             "'cache_position' \\(Range\\) computes token positions .* position_ids input that the model uses")


@pytest.mark.parametrize("start", ["five", "size"])
def test_range_not_from_the_past_length_is_refused(start):
    extra = [helper.make_node("Size", ["past_key_values.0.key"], ["size"])]
    model = _computed_positions("range", extra=extra)
    values = {v.name: v for n in model.graph for v in n.outputs} | dict(model.graph.initializers)
    next(n for n in model.graph if n.name == "cache_position").replace_input_with(0, values[start])
    model.graph.sort()
    _refused(model, "'cache_position' \\(Range\\) computes token positions .* do not start at the past length")


def test_cumsum_over_another_axis_or_operand_is_refused():
    model = _computed_positions("cumsum")
    cumsum = next(n for n in model.graph if n.op_type == "CumSum")
    cumsum.replace_input_with(1, model.graph.initializers["zero_i"])
    _refused(model, "'cumsum_positions' \\(CumSum\\) .* not sum over the sequence axis")
    model = _computed_positions("cumsum", extra=[helper.make_node("Sub", ["one_i", "attention_mask"], ["pads"])])
    cumsum = next(n for n in model.graph if n.op_type == "CumSum")
    cumsum.replace_input_with(0, next(n for n in model.graph if n.outputs[0].name == "pads").outputs[0])
    model.graph.sort()
    _refused(model, "'cumsum_positions' \\(CumSum\\) .* what it sums is not attention_mask")


def test_positions_read_unexpectedly_are_refused():
    # [1, S] positions flattened: with [B, S] ones that would be B*S rows
    flat = [numpy_helper.from_array(np.array([-1], np.int64), "flat"),
            helper.make_node("Reshape", ["positions", "flat"], ["pos_flat"], name="flatten_positions"),
            helper.make_node("Gather", ["table", "pos_flat"], ["pos_rows"]),
            helper.make_node("ReduceSum", ["pos_rows"], ["pos_sum"], keepdims=0)]
    model = _computed_positions("range", extra=flat, outputs=["pos_sum"])
    _refused(model, "'cache_position' .* reach node 'flatten_positions' \\(Reshape\\), which may not broadcast")
    # further down: a Reshape that fixes the batch of the position embedding at 1
    model = _computed_positions("range", extra=[
        numpy_helper.from_array(np.array([1, -1], np.int64), "one_row"),
        helper.make_node("Reshape", ["pos_emb", "one_row"], ["pos_row"], name="bake_batch"),
        helper.make_node("ReduceSum", ["pos_row"], ["row_sum"], keepdims=0)], outputs=["row_sum"])
    _refused(model, "'cache_position' .* reach node 'bake_batch' \\(Reshape\\), which may not broadcast")
    # cumsum - 1 also read before it is sliced to the new tokens
    model = _computed_positions("cumsum", extra=[helper.make_node("ReduceMax", ["cs1"], ["cs_max"], keepdims=0,
                                                                  name="max_position")], outputs=["cs_max"])
    _refused(model, "'cumsum_positions' .* read by node 'max_position' \\(ReduceMax\\) before")
