import numpy as np
import onnx
import pytest
from onnx import helper

from qeff_graph.backends.ort.inplace import inplace_cache_inputs
from qeff_graph.errors import PreconditionError, QeffGraphError
from qeff_graph.passes import OrtValidAttention, PassManager
from qeff_graph.passes.ort_valid_attention import VALID_LENGTH
from tests.passes.graphs import H, D, V, cache_model, run, to_ir

RETAINED = ["past-shape", "position-mask", "kv-retention", "last-token-logits"]


def _programs(proto=None, **options):
    """(portable, lowered) programs of ``proto`` (default: the hand-built cache model)."""
    proto = proto or cache_model()
    portable = PassManager([*RETAINED, "cleanup"], **options)(to_ir(proto)).model
    lowered = PassManager([*RETAINED, "ort-valid-attention", "cleanup"], **options)(to_ir(proto)).model
    return portable, lowered


def _steps(rows, ctx, seed=1):
    """A ragged prefill (row 1 padded) then two decode steps: (ids, pos) per step."""
    rng = np.random.default_rng(seed)
    first = np.array([[0, 1, 2], [0, 1, -1]] + [[0, 1, 2]] * (rows - 2))
    steps = [(rng.integers(0, V, first.shape), first)]
    nxt = first.max(axis=1, keepdims=True) + 1
    for _ in range(2):
        steps.append((rng.integers(0, V, (rows, 1)), nxt.copy()))
        nxt += 1
    return steps


def _generate(model, steps, k, v):
    out = None
    for ids, pos in steps:
        out = run(model, {"input_ids": ids, "position_ids": pos, "past_key.0": k, "past_value.0": v})
        k, v = out["past_key.0_RetainedState"], out["past_value.0_RetainedState"]
        yield out


def test_structure_reads_through_the_valid_slice():
    _, model = _programs()
    for name in ("past_key.0_RetainedState", "past_value.0_RetainedState"):
        full = {v.name: v for v in model.graph.outputs}[name]
        assert full.producer().op_type == "ScatterND"  # the output is still the scatter (in place)
        uses = [u.node for u in full.uses()]
        assert uses and all(n.op_type == "Slice" and n.inputs[2].name == VALID_LENGTH for n in uses)
    assert inplace_cache_inputs(model) == {"past_key.0", "past_value.0"}
    softmax = next(n for n in model.graph if n.op_type == "Softmax")
    where = softmax.inputs[0].producer()
    assert where.inputs[0].producer().op_type == "Slice"  # the position mask is cut to the valid length


@pytest.mark.parametrize("ctx_len", [8, 40])
def test_same_numbers_as_the_portable_program(ctx_len):
    portable, lowered = _programs()
    rng = np.random.default_rng(0)
    k = rng.standard_normal((3, H, ctx_len, D)).astype(np.float32)  # stale rows beyond the text
    v = rng.standard_normal((3, H, ctx_len, D)).astype(np.float32)
    steps = _steps(3, ctx_len)
    for a, b in zip(_generate(portable, steps, k, v), _generate(lowered, steps, k, v)):
        np.testing.assert_allclose(b["logits"], a["logits"], atol=1e-6, rtol=0)
        for name in ("past_key.0_RetainedState", "past_value.0_RetainedState"):
            np.testing.assert_array_equal(b[name], a[name])  # the whole cache, written the same


def test_continuous_batching_and_float16_cache():
    for options in (dict(continuous_batching=True), dict(kv_dtype="float16")):
        portable, lowered = _programs(**options)
        dtype = np.float16 if options.get("kv_dtype") else np.float32
        rows = 3 if options.get("continuous_batching") else 2  # the cache has full_batch_size rows
        cache = np.random.default_rng(3).standard_normal((rows, H, 16, D)).astype(dtype)
        feeds = {"input_ids": np.array([[4, 5], [6, 7]]), "position_ids": np.array([[3, 4], [9, 10]]),
                 "past_key.0": cache, "past_value.0": cache}
        if options.get("continuous_batching"):
            feeds["batch_index"] = np.array([[2], [0]])
        a, b = run(portable, feeds), run(lowered, feeds)
        np.testing.assert_allclose(b["logits"], a["logits"], atol=1e-6 if dtype == np.float32 else 1e-3)
        np.testing.assert_array_equal(b["past_key.0_RetainedState"], a["past_key.0_RetainedState"])


def test_requires_a_retained_program_once():
    with pytest.raises(QeffGraphError, match="retained-state program"):
        PassManager(["ort-valid-attention"])(to_ir(cache_model()))
    _, lowered = _programs()
    with pytest.raises(PreconditionError, match="already lowered"):
        OrtValidAttention()(lowered)


def _with_node_on_key_path(make):
    """cache_model with ``make(graph)`` nodes inserted between the key cache and the scores."""
    proto = cache_model()
    graph = proto.graph
    at = next(i for i, n in enumerate(graph.node) if n.output[0] == "kT")
    graph.node[at].input[0] = "k_read"
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes[:at] + make() + nodes[at:])
    return proto


def test_shape_from_the_cache_length_keeps_the_layer_whole():
    # an Expand whose target is [B, H, past + seq, D] computed from the past input's length: sliced,
    # the cache would be broadcast back to ctx_len: the layer is left whole (and says why)
    def make():
        return [
            helper.make_node("Shape", ["past_key_values.0.key"], ["pk_head"], end=2),
            helper.make_node("Concat", ["pk_head", "total_len", "d_tail"], ["k_target"], axis=0),
            helper.make_node("Expand", ["present.0.key", "k_target"], ["k_read"]),
        ]

    proto = _with_node_on_key_path(make)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array([D], np.int64), "d_tail"))
    onnx.checker.check_model(proto)
    model = to_ir(proto)
    manager = PassManager([*RETAINED, "ort-valid-attention"])
    result = manager(model)
    stats = next(e["stats"] for e in manager.log if e["pass"] == "ort-valid-attention")
    full = {v.name: v for v in result.model.graph.outputs}["past_key.0_RetainedState"]
    assert not any(u.node.op_type == "Slice" for u in full.uses())
    assert stats["lowered"] == 0 and "takes its target shape from the cache length" in stats["kept_reason"]
    # and the program still computes what the portable one does
    portable = PassManager([*RETAINED])(to_ir(proto)).model
    cache = np.zeros((1, H, 8, D), np.float32)
    feeds = {"input_ids": np.array([[1, 2]]), "position_ids": np.array([[0, 1]]), "past_key.0": cache,
             "past_value.0": cache}
    np.testing.assert_allclose(run(result.model, feeds)["logits"], run(portable, feeds)["logits"], atol=1e-6)


def test_shape_from_the_read_itself_is_followed():
    # the same Expand with its target taken from the read value's own shape follows the slice
    def make():
        return [
            helper.make_node("Shape", ["present.0.key"], ["k_target"]),
            helper.make_node("Expand", ["present.0.key", "k_target"], ["k_read"]),
        ]

    portable, lowered = _programs(_with_node_on_key_path(make))
    full = {v.name: v for v in lowered.graph.outputs}["past_key.0_RetainedState"]
    assert all(u.node.op_type == "Slice" for u in full.uses())
    cache = np.random.default_rng(5).standard_normal((2, H, 12, D)).astype(np.float32)
    for ids, pos in _steps(2, 12)[:2]:
        feeds = {"input_ids": ids, "position_ids": pos, "past_key.0": cache, "past_value.0": cache}
        np.testing.assert_allclose(run(lowered, feeds)["logits"], run(portable, feeds)["logits"], atol=1e-6)


@pytest.mark.parametrize("op", ["Expand", "Reshape"])
def test_concat_target_with_the_cache_length_is_retargeted(op):
    # exporters' grouped-query Expand/Reshape: target Concat(batch, heads, past + seq, dim); the
    # length piece becomes 1 (Expand) or -1 (Reshape), so the layer is lowered and stays exact
    def make():
        return [
            helper.make_node("Shape", ["input_ids"], ["b_dim"], end=1),
            helper.make_node("Concat", ["b_dim", "h_dim", "total_len", "d_tail"], ["k_target"], axis=0),
            helper.make_node(op, ["present.0.key", "k_target"], ["k_read"]),
        ]

    proto = _with_node_on_key_path(make)
    proto.graph.initializer.extend([onnx.numpy_helper.from_array(np.array([D], np.int64), "d_tail"),
                                    onnx.numpy_helper.from_array(np.array([H], np.int64), "h_dim")])
    proto = onnx.shape_inference.infer_shapes(proto)
    portable, lowered = _programs(proto)
    full = {v.name: v for v in lowered.graph.outputs}["past_key.0_RetainedState"]
    assert all(u.node.op_type == "Slice" for u in full.uses())
    cache = np.random.default_rng(6).standard_normal((2, H, 12, D)).astype(np.float32)
    for ids, pos in _steps(2, 12):
        feeds = {"input_ids": ids, "position_ids": pos, "past_key.0": cache, "past_value.0": cache}
        np.testing.assert_allclose(run(lowered, feeds)["logits"], run(portable, feeds)["logits"], atol=1e-6)
