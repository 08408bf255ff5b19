import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from qeff_graph.backends.ort import RetainedStateSession
from qeff_graph.backends.ort.inplace import inplace_cache_inputs, rows_alone
from qeff_graph.errors import PreconditionError, QeffGraphError
from qeff_graph.passes import OrtGroupQueryAttention, PassManager
from qeff_graph.passes import ort_group_query_attention as gqa_module
from tests.passes.graphs import V, cache_model, run, to_ir

RETAINED = ["past-shape", "position-mask", "kv-retention", "last-token-logits"]
HEADS, HEAD_DIM, CTX = 2, 8, 16


def _lowered(proto=None, **options):
    manager = PassManager([*RETAINED, "ort-gqa", "ort-valid-attention", "cleanup"], verify="checker", **options)
    result = manager(to_ir(proto or cache_model(head_dim=HEAD_DIM)))
    stats = {e["pass"]: e["stats"] for e in manager.log}
    return result.model, stats


def _portable(proto=None, **options):
    return PassManager([*RETAINED, "cleanup"], **options)(to_ir(proto or cache_model(head_dim=HEAD_DIM))).model


def _session(model, tmp_path, rows, name="gqa.onnx"):
    path = tmp_path / name
    ir.save(model, path)
    return RetainedStateSession(path, batch_size=rows, ctx_len=CTX, threads=1)


def test_structure_one_kernel_per_layer_updating_the_cache_in_place():
    model, stats = _lowered()
    assert stats["ort-gqa"]["lowered"] == 1 and stats["ort-valid-attention"].get("gqa")
    kinds = [n.op_type for n in model.graph]
    assert kinds.count("GroupQueryAttention") == 1
    assert not {"ScatterND", "Softmax"} & set(kinds)  # the decomposed attention and its writes are gone
    assert inplace_cache_inputs(model) == {"past_key.0", "past_value.0"} and rows_alone(model)
    outputs = {v.name: v for v in model.graph.outputs}
    node = outputs["past_key.0_RetainedState"].producer()
    assert node.op_type == "GroupQueryAttention" and node.attributes["kv_num_heads"].value == HEADS


@pytest.mark.parametrize("first, split", [
    ([[0, 1, 2, 3], [0, 1, -1, -1], [0, 1, 2, -1]], False),  # right-padded: the whole batch in one run
    ([[0, 1, 2, 3], [-1, -1, 0, 1], [0, 1, 2, -1]], True),  # a left-padded row: row by row, pads dropped
    ([[0, 1, 2, 3], [0, 1, -1, -1], [-1, -1, -1, -1]], False),  # an idle row
])
def test_same_logits_as_the_portable_program(first, split, tmp_path):
    """Prefill, then decode steps (one row idle after the first): the runner over the
    GroupQueryAttention program gives the portable program's logits for every real row."""
    model, _ = _lowered()
    session = _session(model, tmp_path, rows=3)
    assert session._split({"position_ids": np.array(first)}) == split
    _compare_with_portable(session, _portable(), first)


def _compare_with_portable(session, portable, first):
    rng = np.random.default_rng(0)
    k = np.zeros((3, HEADS, CTX, HEAD_DIM), np.float32)
    v = k.copy()
    pos = np.array(first)
    steps = [(rng.integers(0, V, pos.shape), pos)]
    nxt = pos.max(axis=1, keepdims=True) + 1
    for _ in range(4):
        steps.append((rng.integers(0, V, (3, 1)), np.where(pos.max(axis=1, keepdims=True) >= 0, nxt, -1)))
        nxt += 1
    for ids, pos in steps:
        want = run(portable, {"input_ids": ids, "position_ids": pos, "past_key.0": k, "past_value.0": v})
        k, v = want["past_key.0_RetainedState"], want["past_value.0_RetainedState"]
        got = session.run(ids, pos, phase="decode" if pos.shape[1] == 1 else "prefill")
        rows = (pos >= 0).any(axis=1)
        np.testing.assert_allclose(got[rows], want["logits"][rows], atol=1e-5, rtol=0)


def _alibi_model(scale_after: float | None = None) -> onnx.ModelProto:
    """cache_model with an ALiBi bias, ``slope[h] * key position`` ``[1, H, 1, T]``, added to the
    masked scores (then, with ``scale_after``, the sum scaled — the bias scaled too)."""
    proto = cache_model(head_dim=HEAD_DIM)
    graph = proto.graph
    add = next(n for n in graph.node if n.output[0] == "masked")
    add.output[0] = "masked_nobias"
    slopes = (2.0 ** -np.arange(1, HEADS + 1)).astype(np.float32).reshape(1, HEADS, 1, 1)
    graph.initializer.extend([numpy_helper.from_array(slopes, "alibi_slopes"),
                              numpy_helper.from_array(np.array(scale_after or 1, np.float32), "after")])
    nodes = [onnx.helper.make_node("Cast", ["cm_keys"], ["keys_f"], to=onnx.TensorProto.FLOAT),  # [T]
             onnx.helper.make_node("Mul", ["alibi_slopes", "keys_f"], ["alibi"]),  # [1, H, 1, T]
             onnx.helper.make_node("Add", ["masked_nobias", "alibi"], ["biased" if scale_after else "masked"])]
    if scale_after:
        nodes.append(onnx.helper.make_node("Mul", ["biased", "after"], ["masked"]))
    at = list(graph.node).index(add) + 1
    for i, node in enumerate(nodes):
        graph.node.insert(at + i, node)
    return proto


def test_alibi_goes_in_as_the_attention_bias(tmp_path):
    """An ALiBi bias on the scores becomes the kernel's attention_bias (sliced to the valid length),
    proven by the check and giving the portable program's logits."""
    model, stats = _lowered(_alibi_model())
    assert stats["ort-gqa"]["lowered"] == 1
    node = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
    assert node.inputs[10] is not None  # attention_bias
    session = _session(model, tmp_path, rows=3)
    _compare_with_portable(session, _portable(_alibi_model()), [[0, 1, 2, 3], [0, 1, -1, -1], [0, 1, 2, -1]])


def test_a_bias_the_kernel_would_add_otherwise_keeps_the_valid_length_lowering():
    """Scaled after it is added, the bias is not what the kernel adds (after its scale): the numeric
    check refuses, and the valid-length lowering takes the layer."""
    model, stats = _lowered(_alibi_model(scale_after=0.5))
    assert stats["ort-gqa"]["lowered"] == 0 and "differs" in stats["ort-gqa"]["kept_reason"]
    assert stats["ort-valid-attention"]["lowered"] == 1
    assert "GroupQueryAttention" not in [n.op_type for n in model.graph]


def test_a_chunk_reaching_past_the_cache_runs_row_by_row(tmp_path):
    model, _ = _lowered()
    session = _session(model, tmp_path, rows=2)
    pos = np.array([[CTX - 3, CTX - 2, CTX - 1, -1], [0, 1, 2, 3]])  # row 0: 12 + 4 > 16 slots
    assert session._split({"position_ids": pos})
    assert not session._split({"position_ids": np.array([[CTX - 4, CTX - 3, CTX - 2, CTX - 1], [0, 1, 2, 3]])})


def test_continuous_batching_prefills_one_slot(tmp_path):
    model, stats = _lowered(continuous_batching=True)
    assert stats["ort-gqa"]["lowered"] == 1
    portable = _portable(continuous_batching=True)
    session = _session(model, tmp_path, rows=3)
    cache = {n: np.zeros((3, HEADS, CTX, HEAD_DIM), np.float32) for n in ("past_key.0", "past_value.0")}
    steps = [(np.array([[3, 4, 5]]), np.array([[0, 1, 2]]), np.array([[2]]), "prefill"),
             (np.array([[7, 1]]), np.array([[0, 1]]), np.array([[0]]), "prefill"),
             (np.array([[9], [0], [6]]), np.array([[2], [-1], [3]]), np.arange(3)[:, None], "decode")]
    for ids, pos, index, phase in steps:
        want = run(portable, {"input_ids": ids, "position_ids": pos, "batch_index": index, **cache})
        cache = {n: want[f"{n}_RetainedState"] for n in cache}
        got = session.run(ids, pos, batch_index=index, phase=phase)
        rows = (pos >= 0).any(axis=1)  # an idle slot's logits mean nothing
        np.testing.assert_allclose(got[rows], want["logits"][rows], atol=1e-5, rtol=0)


def test_float16_cache_under_float32_compute_is_not_lowered():
    _, stats = _lowered(kv_dtype="float16")
    assert stats["ort-gqa"]["lowered"] == 0 and "types" in stats["ort-gqa"]["kept_reason"]


def test_the_numeric_check_refuses_a_kernel_that_computes_otherwise(monkeypatch):
    """A GroupQueryAttention with another scale than the graph's is caught by running both."""
    real = gqa_module._Layer.attributes

    def wrong_scale(self):
        return {**real.fget(self), "scale": 0.5}

    monkeypatch.setattr(gqa_module._Layer, "attributes", property(wrong_scale))
    model, stats = _lowered()
    assert stats["ort-gqa"]["lowered"] == 0 and "differs from the attention" in stats["ort-gqa"]["kept_reason"]
    assert "GroupQueryAttention" not in [n.op_type for n in model.graph]


def test_requires_a_retained_program_once():
    with pytest.raises(QeffGraphError, match="retained-state program"):
        PassManager(["ort-gqa"])(to_ir(cache_model(head_dim=HEAD_DIM)))
    model, _ = _lowered()
    with pytest.raises(PreconditionError, match="already lowered"):
        OrtGroupQueryAttention()(model)


def test_reset_leaves_stale_rows_the_kernel_never_reads(tmp_path):
    """After a long prompt, reset() keeps the bound cache as it is (no zeroing) and a shorter prompt
    then decodes to the very logits of a fresh session: rows past the valid length are never read."""
    model, _ = _lowered()
    used = _session(model, tmp_path, rows=2)
    fresh = _session(model, tmp_path, rows=2, name="fresh.onnx")
    rng = np.random.default_rng(3)
    long_pos = np.tile(np.arange(12), (2, 1))
    used.run(rng.integers(0, V, long_pos.shape), long_pos, phase="prefill")
    used.reset()
    stale = used._arrays["past_key.0"]
    assert np.abs(stale[:, :, 4:12]).sum() > 0  # what the long prompt left is still there
    pos = np.array([[0, 1, 2, 3], [0, 1, -1, -1]])
    steps = [(rng.integers(0, V, pos.shape), pos)]
    steps += [(rng.integers(0, V, (2, 1)), np.array([[4 + i], [2 + i]])) for i in range(3)]
    for ids, pos in steps:
        phase = "decode" if pos.shape[1] == 1 else "prefill"
        np.testing.assert_array_equal(used.run(ids, pos, phase=phase), fresh.run(ids, pos, phase=phase))


def test_runner_refuses_gaps_in_a_rows_positions(tmp_path):
    model, _ = _lowered()
    session = _session(model, tmp_path, rows=1)
    with pytest.raises(QeffGraphError, match="consecutive positions"):
        session.run(np.array([[1, 2, 3]]), np.array([[0, 2, 3]]), phase="prefill")


def _llama_programs(tmp_path):
    """(portable, lowered, ort-gqa stats) of the Optimum tiny llama export (a third-party exporter)."""
    from tests.e2e.conftest import OPTIMUM

    source = OPTIMUM["llama"] / "optimum" / "model.onnx"
    names = ["past-shape", "position-mask", "kv-retention", "last-token-logits", "custom-rmsnorm"]
    portable = PassManager([*names, "cleanup"])(ir.load(source)).model
    manager = PassManager([*names, "ort-skip-norm", "ort-gqa", "ort-valid-attention", "cleanup"], target="ort")
    lowered = manager(ir.load(source)).model
    return portable, lowered, next(e["stats"] for e in manager.log if e["pass"] == "ort-gqa")


def _compare_llama(portable, lowered, tmp_path):
    """A right-padded prefill of 2 rows and 3 decode steps: same logits as the portable program."""
    heads = {v.name: v.shape for v in portable.graph.inputs if v.name.startswith("past_key.")}
    (kv_heads, head_dim) = next((s[1], s[3]) for s in heads.values())
    ir.save(lowered, tmp_path / "gqa.onnx")
    session = RetainedStateSession(tmp_path / "gqa.onnx", batch_size=2, ctx_len=32, threads=1)
    cache = {f"past_{kind}.{i}": np.zeros((2, kv_heads, 32, head_dim), np.float32)
             for i in range(len(heads)) for kind in ("key", "value")}
    rng = np.random.default_rng(5)
    pos = np.array([[0, 1, 2, 3, 4], [0, 1, 2, -1, -1]])
    steps = [(rng.integers(1, 100, pos.shape), pos)]
    for step in range(3):
        steps.append((rng.integers(1, 100, (2, 1)), np.array([[5 + step], [3 + step]])))
    for ids, pos in steps:
        want = run(portable, {"input_ids": ids, "position_ids": pos, **cache})
        cache = {n: want[f"{n}_RetainedState"] for n in cache}
        got = session.run(ids, pos, phase="decode" if pos.shape[1] == 1 else "prefill")
        np.testing.assert_allclose(got, want["logits"], atol=1e-4, rtol=0)


def test_rotary_goes_into_the_kernel_with_the_same_logits(tmp_path):
    portable, lowered, stats = _llama_programs(tmp_path)
    assert stats["lowered"] == stats["layers"] == stats["rotary"] == 2
    kinds = [n.op_type for n in lowered.graph]
    assert "Neg" not in kinds and kinds.count("GroupQueryAttention") == 2  # rotate_half went into the kernel
    node = next(n for n in lowered.graph if n.op_type == "GroupQueryAttention")
    assert node.attributes["do_rotary"].value == 1 and node.inputs[7] is not None
    _compare_llama(portable, lowered, tmp_path)


def test_rotary_tables_the_kernel_would_misread_keep_the_graphs_rotary(tmp_path, monkeypatch):
    """If the tables the kernel got were not the graph's (here: shifted by one position), the
    numeric check refuses the rotary reading and the layer keeps the graph's rotary."""
    real = gqa_module._rotary_caches

    def shifted(cos, sin, batch, seq, form, total):
        caches = real(cos, sin, batch, seq, form, total)
        return {**caches, "cos_cache": np.roll(caches["cos_cache"], 1, axis=0)}

    monkeypatch.setattr(gqa_module, "_rotary_caches", shifted)
    portable, lowered, stats = _llama_programs(tmp_path)
    assert stats["lowered"] == 2 and stats["rotary"] == 0
    assert "Neg" in [n.op_type for n in lowered.graph]  # the graph's own rotate_half stays
    monkeypatch.undo()
    _compare_llama(portable, lowered, tmp_path)


def test_a_rotary_in_pairs_narrower_than_the_kernels_is_widened_with_identity_pairs():
    """The kernel wants rotary_dim a multiple of 16: a rotary of 8 in interleaved pairs gets cos 1 /
    sin 0 for the pairs it lacks (dims 8..15 stay exactly as they are); a rotate-half one cannot be
    widened (its halves would pair other dims)."""
    rng = np.random.default_rng(0)
    batch, seq, width, total = 2, 3, 8, 7
    cos, sin = rng.standard_normal((batch, seq, width)), rng.standard_normal((batch, seq, width))
    form = gqa_module._Form(None, None, None, [], cos=cos, sin=sin, rotary_dim=width, interleaved=True, kernel_dim=16)
    caches = gqa_module._rotary_caches(cos, sin, batch, seq, form, total)
    assert caches["cos_cache"].shape == caches["sin_cache"].shape == (total, 8)
    np.testing.assert_array_equal(caches["cos_cache"][:batch * seq, :4], cos.reshape(-1, width)[:, 0::2])
    np.testing.assert_array_equal(caches["sin_cache"][:batch * seq, :4], sin.reshape(-1, width)[:, 0::2])
    np.testing.assert_array_equal(caches["cos_cache"][:batch * seq, 4:], 1)  # identity pairs
    np.testing.assert_array_equal(caches["sin_cache"][:batch * seq, 4:], 0)
    with pytest.raises(ValueError, match="interleaved"):
        gqa_module._Form(None, None, None, [], cos=cos, sin=sin, rotary_dim=width, interleaved=False, kernel_dim=16)


def test_same_heads_views():
    """Views the rotary walk passes through: heads and seq swapped by a Transpose, a Cast to the
    value's own type; not a Reshape that scrambles [B, S, N, H] into [B, N, S, H], nor a real Cast."""
    x = ir.Value(name="x", shape=ir.Shape(["b", "s", 4, 16]), type=ir.TensorType(ir.DataType.FLOAT))
    layouts = (["b", 4, "s", 16], ["b", "s", 4, 16])

    class Dims(gqa_module._Finder):
        def __init__(self):  # dims and types from the values themselves
            self._inferred, self._types = {}, {}

    finder = Dims()
    swap = ir.Node("", "Transpose", [x], attributes=[ir.AttrInt64s("perm", [0, 2, 1, 3])])
    swap.outputs[0].shape = ir.Shape(["b", 4, "s", 16])
    assert gqa_module._same_heads(finder, swap, layouts)
    scramble = ir.Node("", "Reshape", [x, ir.Value(name="shape")])
    scramble.outputs[0].shape = ir.Shape(["b", 4, "s", 16])
    assert not gqa_module._same_heads(finder, scramble, layouts)
    for to, same in ((ir.DataType.FLOAT, True), (ir.DataType.FLOAT16, False)):
        cast = ir.Node("", "Cast", [x], attributes=[ir.AttrInt64("to", to)])
        cast.outputs[0].shape = ir.Shape(["b", "s", 4, 16])
        assert gqa_module._same_heads(finder, cast, layouts) is same
