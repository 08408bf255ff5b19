"""The mask probe reads each layer's attention window off the exporter's own mask (causal, sliding,
mixed), refuses masks that are neither (bidirectional, a visible future key, chunked) and masks it
cannot run, on hand-built dynamic-KV graphs and on real tiny exports (both exporters)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qeff_graph.errors import UnsupportedGraphError
from qeff_graph.ir.attention import find_attention_sites
from qeff_graph.ir.mask_probe import (
    PROBE_LENGTHS,
    PROBE_QUERIES,
    probe_mask_windows,
    reconcile_windows,
)
from qeff_graph.passes.past_shape import PastShape
from tests.passes.graphs import D, H, V, to_ir

FILL = float(np.finfo(np.float32).min)
FIRST = PROBE_LENGTHS[0] - PROBE_QUERIES  # position of the first probed query


def _i64(name, values):
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def _mask_nodes(tag: str, window: int | None, kind: str) -> list:
    """``vis_{tag}`` [B, 1, S, T] as exporters build it: key/query indices from Range over the
    past and total lengths, ``k <= q`` (``k <= q + 1`` for "future", nothing for
    "bidirectional", same chunk for "chunked"), ``And(k > q - W)`` for a window, And padding."""
    n = helper.make_node
    nodes = [
        n("Unsqueeze", ["q_idx", "ax1"], [f"q2_{tag}"]),  # [S, 1]
        n("Unsqueeze", ["k_idx", "ax0"], [f"k2_{tag}"]),  # [1, T]
    ]
    if kind == "causal":
        nodes.append(n("LessOrEqual", [f"k2_{tag}", f"q2_{tag}"], [f"c_{tag}"]))
    elif kind == "future":
        nodes += [n("Add", [f"q2_{tag}", "one_i"], [f"q2n_{tag}"]),
                  n("LessOrEqual", [f"k2_{tag}", f"q2n_{tag}"], [f"c_{tag}"])]
    elif kind == "chunked":  # llama4-style chunks of 8 keys
        nodes += [n("LessOrEqual", [f"k2_{tag}", f"q2_{tag}"], [f"c0_{tag}"]),
                  n("Div", [f"k2_{tag}", "eight"], [f"kc_{tag}"]),
                  n("Div", [f"q2_{tag}", "eight"], [f"qc_{tag}"]),
                  n("Equal", [f"kc_{tag}", f"qc_{tag}"], [f"same_{tag}"]),
                  n("And", [f"c0_{tag}", f"same_{tag}"], [f"c_{tag}"])]
    else:  # bidirectional: padding only
        nodes.append(n("GreaterOrEqual", [f"k2_{tag}", "zero_i"], [f"c_{tag}"]))
    last = f"c_{tag}"
    if window is not None:
        nodes += [n("Sub", [f"q2_{tag}", f"w_{tag}"], [f"lo_{tag}"]),
                  n("Greater", [f"k2_{tag}", f"lo_{tag}"], [f"in_{tag}"]),
                  n("And", [last, f"in_{tag}"], [f"cw_{tag}"])]
        last = f"cw_{tag}"
    nodes += [n("Unsqueeze", [last, "ax01"], [f"c4_{tag}"]),  # [1, 1, S, T]
              n("And", [f"c4_{tag}", "pad4"], [f"vis_{tag}"])]
    return nodes


def layered_model(windows: list[int | None], kind: str | list[str] = "causal", form: str = "add",
                  shared: bool = False, extra_nodes=(), extra_inits=(), extra_inputs=(),
                  key_positions: str = "k_idx0") -> onnx.ModelProto:
    """A dynamic-KV graph with one attention per entry of ``windows`` (its sliding window, None:
    full). ``form``: the mask is added to the scores (``Where(vis, 0, fill)``) or selects them
    (``Where(vis, scores, fill)``); ``shared``: one mask value for every layer; ``kind``: see
    :func:`_mask_nodes`, one for every layer or one per layer."""
    kinds = [kind] * len(windows) if isinstance(kind, str) else kind
    n = helper.make_node
    rng = np.random.default_rng(0)
    nodes = [
        n("Gather", ["emb", "input_ids"], ["x"]),
        n("Shape", ["input_ids"], ["bs"]),
        n("Concat", ["bs", "hd_tail"], ["kshape"], axis=0),
        n("Reshape", ["x", "kshape"], ["x4"]),
        n("Transpose", ["x4"], ["k_new"], perm=[0, 2, 1, 3]),
        n("Neg", ["k_new"], ["v_new"]),
        # lengths and indices: past from the cache shape, total = past + seq
        n("Shape", ["past_key_values.0.key"], ["past_len"], start=2, end=3),
        n("Shape", ["input_ids"], ["seq_len"], start=1, end=2),
        n("Add", ["past_len", "seq_len"], ["total_len"]),
        n("Squeeze", ["past_len"], ["past_s"]),
        n("Squeeze", ["total_len"], ["total_s"]),
        n("Range", ["past_s", "total_s", "one_i"], ["q_idx"]),
        n("Range", ["zero_i", "total_s", "one_i"], ["k_idx0"]),
        *extra_nodes,
        n("Identity", [key_positions], ["k_idx"]),
        n("Cast", ["attention_mask"], ["pad"], to=TensorProto.BOOL),
        n("Unsqueeze", ["pad", "ax12"], ["pad4"]),  # [B, 1, 1, T]
    ]
    inits = [numpy_helper.from_array(rng.standard_normal((V, H * D)).astype(np.float32), "emb"),
             numpy_helper.from_array(rng.standard_normal((H * D, V)).astype(np.float32), "lm_head"),
             _i64("hd_tail", [H, D]), _i64("flat_shape", [0, 0, -1]), _i64("ax0", [0]), _i64("ax1", [1]),
             _i64("ax01", [0, 1]), _i64("ax12", [1, 2]), _i64("one_i", 1), _i64("zero_i", 0), _i64("eight", 8),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero_f"),
             numpy_helper.from_array(np.array(FILL, np.float32), "fill"), *extra_inits]
    cache_t = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", H, "past", D])
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]), *extra_inputs]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", V])]
    contexts = []
    for i, window in enumerate(windows):
        tag = "all" if shared else str(i)
        if not shared or i == 0:
            nodes += _mask_nodes(tag, window, kinds[i])
            if window is not None:
                inits.append(_i64(f"w_{tag}", window))
            nodes.append(n("Where", [f"vis_{tag}", "zero_f", "fill"], [f"add_{tag}"]))
        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        inputs += [cache_t(past_k), cache_t(past_v)]
        outputs += [helper.make_tensor_value_info(f"present.{i}.key", TensorProto.FLOAT, ["batch", H, "t", D]),
                    helper.make_tensor_value_info(f"present.{i}.value", TensorProto.FLOAT, ["batch", H, "t", D])]
        nodes += [n("Concat", [past_k, "k_new"], [f"present.{i}.key"], axis=2),
                  n("Concat", [past_v, "v_new"], [f"present.{i}.value"], axis=2),
                  n("Transpose", [f"present.{i}.key"], [f"kT{i}"], perm=[0, 1, 3, 2]),
                  n("MatMul", ["k_new", f"kT{i}"], [f"scores{i}"])]
        if form == "add":
            nodes.append(n("Add", [f"scores{i}", f"add_{tag}"], [f"masked{i}"]))
        else:
            nodes.append(n("Where", [f"vis_{tag}", f"scores{i}", "fill"], [f"masked{i}"]))
        nodes += [n("Softmax", [f"masked{i}"], [f"probs{i}"], axis=-1),
                  n("MatMul", [f"probs{i}", f"present.{i}.value"], [f"ctx{i}"])]
        contexts.append(f"ctx{i}")
    nodes += [n("Sum", contexts, ["ctx"]), n("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
              n("Reshape", ["ctx_t", "flat_shape"], ["hidden"]), n("MatMul", ["hidden", "lm_head"], ["logits"])]
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _probe(proto, **kwargs):
    model = to_ir(proto)
    return probe_mask_windows(model, find_attention_sites(model), **kwargs)


# -- hand-built graphs -------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["add", "where"])
def test_causal_mask_is_full_attention(form):
    assert _probe(layered_model([None], form=form)) == {0: None}


@pytest.mark.parametrize("form", ["add", "where"])
def test_sliding_window_is_read_off_the_mask(form):
    assert _probe(layered_model([3], form=form)) == {0: 3}


def test_mixed_layers():
    model = to_ir(layered_model([3, None]))
    before = [(n.op_type, [v.name for v in n.inputs]) for n in model.graph]
    assert probe_mask_windows(model) == {0: 3, 1: None}
    assert [(n.op_type, [v.name for v in n.inputs]) for n in model.graph] == before  # the graph is unchanged
    assert _probe(layered_model([None, 1, 6])) == {0: None, 1: 1, 2: 6}


def test_window_longer_than_1024_keys():
    assert _probe(layered_model([2000, 4096])) == {0: 2000, 1: 4096}
    assert _probe(layered_model([2000]), lengths=(1024,)) == {0: None}  # a window of L or more looks causal


def test_one_mask_shared_by_every_layer():
    assert _probe(layered_model([5, 5], shared=True)) == {0: 5, 1: 5}


def test_window_after_past_shape():
    """A graph whose past length is ``cache - seq`` (after the past-shape pass) reads the same."""
    model = to_ir(layered_model([3, None]))
    PastShape()(model)
    assert probe_mask_windows(model) == {0: 3, 1: None}


def test_bounded_position_table_probes_a_shorter_length():
    """Key positions looked up in a 300-row table: 8192 and 1024 keys cannot run, 256 can."""
    assert PROBE_LENGTHS[-2:] == (256, 64)
    table = [helper.make_node("Gather", ["pos_table", "k_idx0"], ["k_table"])]
    proto = layered_model([3], extra_nodes=table, extra_inits=[_i64("pos_table", np.arange(300))],
                          key_positions="k_table")
    assert _probe(proto) == {0: 3}
    with pytest.raises(UnsupportedGraphError, match="cannot run the attention mask") as err:
        _probe(proto, lengths=(1024,))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind,match", [
    ("bidirectional", f"lets the query at position {FIRST} see the later key at position {FIRST + 3}"),
    ("future", f"lets the query at position {FIRST} see the later key at position {FIRST + 1}"),
    ("chunked", "shows windows of 5 and 6 keys for different queries"),
])
def test_not_a_causal_mask_is_refused(kind, match):
    """One line naming the layer and the node that puts the mask on the scores."""
    proto = layered_model([3, None], kind=["causal", kind])
    for node in proto.graph.node:  # name the nodes, as exporters do
        node.name = f"{node.op_type}_{node.output[0]}"
    with pytest.raises(UnsupportedGraphError, match=match) as err:
        _probe(proto)
    message = str(err.value)
    assert "\n" not in message and "layer 1 (node 'Where_add_1' (Where))" in message, message


def test_large_weight_read_for_its_shape_is_not_copied():
    """Exporters take the sequence length off the token embeddings: the embedding (here counted
    as large) becomes two rows of zeros, and the window is read all the same."""
    extra = [helper.make_node("Gather", ["emb", "input_ids"], ["emb_x"]),
             helper.make_node("Shape", ["emb_x"], ["emb_seq"], start=1, end=2),
             helper.make_node("Add", ["past_len", "emb_seq"], ["total_len2"]),
             helper.make_node("Squeeze", ["total_len2"], ["total_s2"]),
             helper.make_node("Range", ["zero_i", "total_s2", "one_i"], ["k_emb"])]
    proto = layered_model([3], extra_nodes=extra, key_positions="k_emb")
    assert _probe(proto, max_constant_bytes=64) == {0: 3}


def test_large_weight_computed_with_is_refused():
    extra = [helper.make_node("Gather", ["emb", "input_ids"], ["emb_x"]),
             helper.make_node("MatMul", ["emb_x", "lm_head"], ["emb_y"]),
             helper.make_node("Shape", ["emb_y"], ["emb_seq"], start=1, end=2),
             helper.make_node("Add", ["past_len", "emb_seq"], ["total_len2"]),
             helper.make_node("Squeeze", ["total_len2"], ["total_s2"]),
             helper.make_node("Range", ["zero_i", "total_s2", "one_i"], ["k_emb"])]
    proto = layered_model([3], extra_nodes=extra, key_positions="k_emb")
    with pytest.raises(UnsupportedGraphError, match="reads the weight 'lm_head'"):
        _probe(proto, max_constant_bytes=64)


def test_input_it_cannot_feed_is_refused():
    extra = [helper.make_node("Shape", ["token_type_ids"], ["tt_len"], start=1, end=2),
             helper.make_node("Squeeze", ["tt_len"], ["tt_s"]),
             helper.make_node("Range", ["zero_i", "tt_s", "one_i"], ["k_tt"])]
    token_types = helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["batch", "total"])
    proto = layered_model([None], extra_nodes=extra, extra_inputs=[token_types], key_positions="k_tt")
    with pytest.raises(UnsupportedGraphError, match="input 'token_type_ids'"):
        _probe(proto)


def _attention_op_model(is_causal: int, window: int | None) -> onnx.ModelProto:
    """ONNX Attention (opset 23) taking the past cache; its attn_mask is padding, or a window."""
    n = helper.make_node
    vi = helper.make_tensor_value_info
    nodes = [n("Shape", ["past_key"], ["past_len"], start=2, end=3),
             n("Shape", ["input_ids"], ["seq_len"], start=1, end=2),
             n("Add", ["past_len", "seq_len"], ["total_len"]),
             n("Squeeze", ["past_len"], ["past_s"]), n("Squeeze", ["total_len"], ["total_s"]),
             n("Range", ["past_s", "total_s", "one_i"], ["q_idx"]),
             n("Range", ["zero_i", "total_s", "one_i"], ["k_idx"]),
             n("Cast", ["attention_mask"], ["pad"], to=TensorProto.BOOL),
             n("Unsqueeze", ["pad", "ax12"], ["pad4"])]
    if window is None:
        mask = "pad4"
    else:
        nodes += _mask_nodes("0", window, "causal")
        mask = "vis_0"
    nodes.append(n("Attention", ["q", "q", "q", mask, "past_key", "past_value"], ["y", "present.0.key",
                                                                                 "present.0.value"],
                   is_causal=is_causal))
    inits = [_i64("ax0", [0]), _i64("ax1", [1]), _i64("ax01", [0, 1]), _i64("ax12", [1, 2]), _i64("one_i", 1),
             _i64("zero_i", 0)] + ([_i64("w_0", window)] if window is not None else [])
    graph = helper.make_graph(nodes, "g", [
        vi("input_ids", TensorProto.INT64, ["b", "s"]), vi("position_ids", TensorProto.INT64, ["b", "s"]),
        vi("attention_mask", TensorProto.INT64, ["b", "t"]), vi("q", TensorProto.FLOAT, ["b", H, "s", D]),
        vi("past_key", TensorProto.FLOAT, ["b", H, "p", D]), vi("past_value", TensorProto.FLOAT, ["b", H, "p", D]),
    ], [vi("y", TensorProto.FLOAT, ["b", H, "s", D]), vi("present.0.key", TensorProto.FLOAT, ["b", H, "t", D]),
        vi("present.0.value", TensorProto.FLOAT, ["b", H, "t", D])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("is_causal,window,expected", [(1, None, None), (0, 3, 3), (1, 3, 3)])
def test_attention_op(is_causal, window, expected):
    model = to_ir(_attention_op_model(is_causal, window))
    sites = find_attention_sites(model)
    assert [s.kind for s in sites] == ["attention-op"]
    assert probe_mask_windows(model, sites) == {0: expected}


def test_attention_op_without_causal_mask_is_refused():
    model = to_ir(_attention_op_model(0, None))
    with pytest.raises(UnsupportedGraphError, match="later key"):
        probe_mask_windows(model)


# -- reconciling with the configured windows ---------------------------------------------------

def test_reconcile():
    assert reconcile_windows({0: 4, 1: None}, None) == {0: 4, 1: None}  # no config: the graph's
    assert reconcile_windows({0: 4, 1: None}, {0: 4, 1: None}) == {0: 4, 1: None}
    assert reconcile_windows({0: None, 1: None}, {0: 4, 1: None}) == {0: 4, 1: None}  # traced away: config
    assert reconcile_windows({0: 4}, {0: None}) == {0: 4}
    assert reconcile_windows({0: None}, {0: 4096}, ctx_len=1024) == {0: None}  # masks nothing
    assert reconcile_windows({0: 2000}, {0: 4096}, ctx_len=1024) == {0: None}
    with pytest.raises(UnsupportedGraphError, match="window of 4 keys but the configuration says 8") as err:
        reconcile_windows({0: None, 1: 4}, {1: 8})
    assert "layer 1" in str(err.value) and "\n" not in str(err.value)


# -- real exports ------------------------------------------------------------------------------

REAL = [("gemma2", {}, [4, None]), ("mistral", {"sliding_window": 4}, [4, 4]), ("llama", {}, [None, None])]
EXPORTERS = [("dynamo", 18), ("torchscript", 17)]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    made: dict = {}

    def get(arch, overrides, exporter, opset):
        key = (arch, exporter)
        if key not in made:
            torch = pytest.importorskip("torch")
            transformers = pytest.importorskip("transformers")
            from qeff_graph.export import export_causal_lm
            from tests.helpers import tiny_config

            config = tiny_config(arch)
            for name, value in overrides.items():
                setattr(config, name, value)
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
            out = tmp_path_factory.mktemp(f"{arch}_{exporter}")
            export_causal_lm(model, out, exporter=exporter, opset=opset, progress=False)
            made[key] = (out / "model.onnx", config)
        return made[key]

    return get


@pytest.mark.parametrize("exporter,opset", EXPORTERS, ids=[e for e, _ in EXPORTERS])
@pytest.mark.parametrize("arch,overrides,expected", REAL, ids=[a for a, _, _ in REAL])
def test_real_export(arch, overrides, expected, exporter, opset, exports):
    import onnx_ir as ir

    from qeff_graph.export.loader import attention_windows

    path, config = exports(arch, overrides, exporter, opset)
    model = ir.load(path)
    sites = find_attention_sites(model)
    windows = probe_mask_windows(model, sites)
    assert windows == dict(enumerate(expected))
    configured = dict(enumerate(attention_windows(config)))
    assert reconcile_windows(windows, configured) == dict(enumerate(expected))
    PastShape()(model)  # where the pipeline reads the windows: after past-shape
    assert probe_mask_windows(model) == dict(enumerate(expected))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("past_shape", [False, True])
def test_optimum_export_before_and_after_past_shape(arch, past_shape):
    """A third-party export (Optimum) probes as causal on its own and after past-shape, where its
    mask reads both the virtual past length and the concatenated cache (fed as the retained one)."""
    import onnx_ir as ir

    from tests.e2e.conftest import OPTIMUM

    path = OPTIMUM[arch] / "optimum" / "model.onnx"
    if not path.exists():
        pytest.skip(f"fixture {path} is missing")
    model = ir.load(path)
    if past_shape:
        PastShape()(model)
    windows = probe_mask_windows(model)
    assert windows and all(w is None for w in windows.values())
