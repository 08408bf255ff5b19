"""ort-fuse-encoder on hand-built BERT-style encoders: fused self-attention gives the same
last_hidden_state in ONNX Runtime (padded rows, left padding, every scaling form); masks that are
not key padding (causal, sliding window, a learned bias) and graphs that are not encoders are
left alone or refused; real tiny TorchScript/dynamo BERT exports fuse every layer."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from qeff_graph.errors import QeffGraphError
from qeff_graph.passes import Cleanup, ORTFuseEncoder, PassManager
from tests.passes.graphs import run, to_ir

N, HD, V = 4, 8, 50  # heads, head size, vocab
D = N * HD


def encoder(mask: str = "padding", scaling: str = "split", layers: int = 2, key: str = "torchscript",
            bias: bool = True, seed: int = 0) -> onnx.ModelProto:
    """``layers`` x (self-attention + residual) over ``emb[input_ids]``, scores + ``mask``:

    * ``padding``: ``(1 - attention_mask) * -1e4`` as [B, 1, 1, S] (what attention_mask asks for);
    * ``sdpa``: transformers' boolean mask through ``Where(·, 0, -inf)`` and the IsNaN guard;
    * ``causal`` / ``window``: padding plus ``-1e4`` where key > query / |query - key| > 9;
    * ``weight``: padding plus a slice of a learned [80, 80] bias (relative position bias).
    """
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((V, D)).astype(np.float32), "emb")]

    def const(name, value, dtype=np.float32):
        inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    one, fill = const("one", 1.0), const("fill", -1e4)
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["h0"]),
             helper.make_node("Unsqueeze", ["attention_mask", const("axes12", [1, 2], np.int64)], ["m4"]),
             helper.make_node("Cast", ["m4"], ["m4f"], to=TensorProto.FLOAT),
             helper.make_node("Sub", [one, "m4f"], ["inv"]),
             helper.make_node("Mul", ["inv", fill], ["padding"])]  # [B,1,1,S]
    if mask in ("causal", "window"):
        nodes += [helper.make_node("Shape", ["input_ids"], ["len"], start=1, end=2),
                  helper.make_node("Squeeze", ["len"], ["len0"]),
                  helper.make_node("Range", [const("zero", 0, np.int64), "len0", const("step", 1, np.int64)], ["pos"]),
                  helper.make_node("Unsqueeze", ["pos", const("ax1", [1], np.int64)], ["qi"]),
                  helper.make_node("Unsqueeze", ["pos", const("ax0", [0], np.int64)], ["kj"])]
        if mask == "causal":
            nodes.append(helper.make_node("Greater", ["kj", "qi"], ["far"]))
        else:
            nodes += [helper.make_node("Sub", ["qi", "kj"], ["dist"]), helper.make_node("Abs", ["dist"], ["adist"]),
                      helper.make_node("Greater", ["adist", const("window", 9, np.int64)], ["far"])]
        nodes += [helper.make_node("Where", ["far", fill, const("zerof", 0.0)], ["block"]),
                  helper.make_node("Add", ["padding", "block"], ["mask"])]
    elif mask == "weight":
        const("rel", rng.standard_normal((80, 80)).astype(np.float32))
        nodes += [helper.make_node("Shape", ["input_ids"], ["len"], start=1, end=2),
                  helper.make_node("Concat", ["len", "len"], ["ends"], axis=0),
                  helper.make_node("Slice", ["rel", const("starts", [0, 0], np.int64), "ends"], ["relb"]),
                  helper.make_node("Add", ["padding", "relb"], ["mask"])]
    elif mask == "sdpa":
        nodes += [helper.make_node("Cast", ["m4"], ["keep"], to=TensorProto.BOOL),
                  helper.make_node("Where", ["keep", const("zerof", 0.0), const("ninf", -np.inf)], ["mask"])]
    else:
        nodes.append(helper.make_node("Identity", ["padding"], ["mask"]))
    heads = const("heads", [0, 0, N, HD], np.int64)
    merged = const("merged", [0, 0, D], np.int64)
    quarter = const("quarter", HD ** -0.25)
    for i in range(layers):
        x, p = f"h{i}", f"l{i}_"
        for name in ("q", "k", "v", "o"):
            const(p + "W" + name, rng.standard_normal((D, D)).astype(np.float32) * 0.3)
            const(p + "b" + name, rng.standard_normal(D).astype(np.float32) * 0.1)
        for name in ("q", "k", "v"):
            if bias:
                nodes += [helper.make_node("MatMul", [x, p + "W" + name], [p + name + "mm"]),
                          helper.make_node("Add", [p + "b" + name, p + name + "mm"], [p + name])]
            else:
                nodes.append(helper.make_node("MatMul", [x, p + "W" + name], [p + name]))
            nodes.append(helper.make_node("Reshape", [p + name, heads], [p + name + "4"]))
        nodes += [helper.make_node("Transpose", [p + "q4"], [p + "qt"], perm=[0, 2, 1, 3]),
                  helper.make_node("Transpose", [p + "v4"], [p + "vt"], perm=[0, 2, 1, 3])]
        if key == "torchscript":
            nodes.append(helper.make_node("Transpose", [p + "k4"], [p + "kT"], perm=[0, 2, 3, 1]))
        else:  # Transpose to [B,N,S,H], then swap the last two
            nodes += [helper.make_node("Transpose", [p + "k4"], [p + "kt"], perm=[0, 2, 1, 3]),
                      helper.make_node("Transpose", [p + "kt"], [p + "kT"], perm=[0, 1, 3, 2])]
        if scaling == "split":  # TorchScript/dynamo SDPA: q and k each times H^-1/4
            nodes += [helper.make_node("Mul", [p + "qt", quarter], [p + "qs"]),
                      helper.make_node("Mul", [p + "kT", quarter], [p + "ks"]),
                      helper.make_node("MatMul", [p + "qs", p + "ks"], [p + "scores"])]
        else:
            nodes.append(helper.make_node("MatMul", [p + "qt", p + "kT"], [p + "raw"]))
            divisor = const(p + "div", np.sqrt(HD) if scaling == "div" else 1.0)
            nodes.append(helper.make_node("Div", [p + "raw", divisor], [p + "scores"]))
        nodes += [helper.make_node("Add", [p + "scores", "mask"], [p + "masked"]),
                  helper.make_node("Softmax", [p + "masked"], [p + "probs"], axis=-1)]
        probs = p + "probs"
        if mask == "sdpa":
            nodes += [helper.make_node("IsNaN", [probs], [p + "nan"]),
                      helper.make_node("Where", [p + "nan", "zerof", probs], [p + "guarded"])]
            probs = p + "guarded"
        nodes += [helper.make_node("MatMul", [probs, p + "vt"], [p + "ctx"]),
                  helper.make_node("Transpose", [p + "ctx"], [p + "ctxt"], perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", [p + "ctxt", merged], [p + "attn"]),
                  helper.make_node("MatMul", [p + "attn", p + "Wo"], [p + "om"]),
                  helper.make_node("Add", [p + "om", p + "bo"], [p + "out"]),
                  helper.make_node("Add", [p + "out", x], ["last_hidden_state" if i == layers - 1 else f"h{i + 1}"])]
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "encoder", [vi("input_ids", TensorProto.INT64, ["b", "s"]),
                                                 vi("attention_mask", TensorProto.INT64, ["b", "s"])],
                              [vi("last_hidden_state", TensorProto.FLOAT, ["b", "s", D])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


FEEDS = {"input_ids": np.random.default_rng(1).integers(0, V, (4, 13)).astype(np.int64),
         "attention_mask": np.array([[1] * 13, [1] * 6 + [0] * 7, [0] * 4 + [1] * 9, [1] + [0] * 12], np.int64)}


def _fuse(proto):
    model = to_ir(proto)
    fuse = ORTFuseEncoder()
    result = fuse(model)
    Cleanup()(result.model)
    return result, fuse.stats


@pytest.mark.parametrize("mask, scaling, key, bias", [
    ("padding", "split", "torchscript", True),
    ("sdpa", "split", "dynamo", True),
    ("padding", "div", "dynamo", False),
    ("sdpa", "none", "torchscript", True),
])
def test_fused_attention_gives_the_same_hidden_states(mask, scaling, key, bias):
    proto = encoder(mask, scaling, key=key, bias=bias)
    before = run(proto, FEEDS)["last_hidden_state"]
    result, stats = _fuse(proto)
    assert result.modified and stats == {"attention_fused": 2, "attention_left": 0}
    graph = result.model.graph
    fused = [n for n in graph if n.op_type == "Attention"]
    assert len(fused) == 2 and all(n.domain == "com.microsoft" and n.attributes.get_int("num_heads") == N
                                   for n in fused)
    assert not any(n.op_type in ("Softmax", "Transpose", "IsNaN") for n in graph)  # the replaced nodes are gone
    # a scale only where the product of the factors is not 1/sqrt(head size)
    assert all(("scale" in n.attributes) == (scaling == "none") for n in fused)
    after = run(result.model, FEEDS)["last_hidden_state"]
    keep = FEEDS["attention_mask"].astype(bool)
    np.testing.assert_allclose(after[keep], before[keep], rtol=1e-5, atol=1e-5)
    assert np.abs(before[keep]).max() > 1  # real numbers, not zeros


@pytest.mark.parametrize("mask, reason", [
    ("causal", "not a key padding mask"),
    ("window", "not a key padding mask"),  # |i - j| > 9: the probe runs over 11 positions, not 7
    ("weight", "reads the weight rel"),
])
def test_masks_that_are_not_key_padding_are_left_alone(mask, reason):
    proto = encoder(mask)
    model = to_ir(proto)
    before = ir.to_onnx_text(model, exclude_initializers=True)
    fuse = ORTFuseEncoder()
    result = fuse(model)
    assert not result.modified
    assert fuse.stats["attention_fused"] == 0 and fuse.stats["attention_left"] == 2
    assert all(reason in why for why in fuse.stats["left_because"]), fuse.stats
    assert ir.to_onnx_text(result.model, exclude_initializers=True) == before  # unchanged


def test_cross_attention_and_non_encoders():
    proto = encoder()
    for node in proto.graph.node:  # the first layer's key reads the embeddings: not self-attention
        if node.op_type == "MatMul" and node.output[0] == "l0_kmm":
            node.input[0] = "emb_other"
    proto.graph.node.insert(0, helper.make_node("Neg", ["h0"], ["emb_other"]))
    result, stats = _fuse(proto)
    assert stats["attention_fused"] == 1 and "different inputs" in next(iter(stats["left_because"]))
    before = run(proto, FEEDS)["last_hidden_state"]
    keep = FEEDS["attention_mask"].astype(bool)
    np.testing.assert_allclose(run(result.model, FEEDS)["last_hidden_state"][keep], before[keep], rtol=1e-5, atol=1e-5)

    proto = encoder()
    proto.graph.input[1].name = "input_mask"  # no attention_mask input: not an encoder graph
    for node in proto.graph.node:
        node.input[:] = ["input_mask" if i == "attention_mask" else i for i in node.input]
    with pytest.raises(QeffGraphError, match="not an encoder graph.*missing: attention_mask"):
        PassManager([ORTFuseEncoder()])(to_ir(proto))


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_tiny_bert_exports_fuse_every_layer(exporter, tmp_path):
    """Real exports (transformers' SDPA path): both layers fused, same hidden states."""
    from qeff_graph.export import export_encoder
    from qeff_graph.ir import load
    from tests.e2e.test_encoder import tiny_encoder

    tiny_encoder("bert", tmp_path / "hf")
    path = export_encoder(str(tmp_path / "hf"), tmp_path / "export", exporter=exporter, progress=False)
    feeds = {**FEEDS, "token_type_ids": np.zeros_like(FEEDS["input_ids"]), "input_ids": FEEDS["input_ids"] + 5}
    before = run(onnx.load(path), feeds)["last_hidden_state"]
    model = load(path)
    fuse = ORTFuseEncoder()
    assert fuse(model).modified and fuse.stats == {"attention_fused": 2, "attention_left": 0}
    Cleanup()(model)
    keep = FEEDS["attention_mask"].astype(bool)
    assert np.abs(run(model, feeds)["last_hidden_state"] - before)[keep].max() < 1e-5
