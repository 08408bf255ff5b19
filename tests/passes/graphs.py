"""Small hand-built ONNX graphs for pass unit tests (onnx.helper), and ORT helpers."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

H, D, V, E = 2, 4, 16, 8  # kv heads, head dim, vocab, hidden


def _model(nodes, inputs, outputs, inits, opset=18):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _i64(name, values):
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def cache_model(seed: int = 0, heads: int = H, head_dim: int = D) -> onnx.ModelProto:
    """Dynamic-KV graph: new k/v rows from an embedding; present = Concat(past, new, axis=2);
    the scores get a padding mask from ``attention_mask`` plus a causal one (``Range`` from the
    past length), as exporters build them.

    Also outputs Shape(past_key)-derived total length, as exporters do, and logits from a
    MatMul LM head, so every pass has something to rewrite. ``heads``/``head_dim`` default to
    the module's ``H``/``D``.
    """
    H, D = heads, head_dim  # noqa: N806 - the module's names, local
    rng = np.random.default_rng(seed)
    emb = numpy_helper.from_array(rng.standard_normal((V, H * D)).astype(np.float32), "emb")
    head = numpy_helper.from_array(rng.standard_normal((H * D, V)).astype(np.float32), "lm_head")
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["x"]),  # [B,S,HD]
        helper.make_node("Shape", ["input_ids"], ["bs"]),
        helper.make_node("Concat", ["bs", "hd_tail"], ["kshape"], axis=0),
        helper.make_node("Reshape", ["x", "kshape"], ["x4"]),  # [B,S,H,D]
        helper.make_node("Transpose", ["x4"], ["k_new"], perm=[0, 2, 1, 3]),
        helper.make_node("Neg", ["k_new"], ["v_new"]),
        helper.make_node("Concat", ["past_key_values.0.key", "k_new"], ["present.0.key"], axis=-2),
        helper.make_node("Concat", ["past_key_values.0.value", "v_new"], ["present.0.value"], axis=2),
        helper.make_node("Shape", ["past_key_values.0.key"], ["past_len"], start=2, end=3),
        helper.make_node("Shape", ["input_ids"], ["seq_len"], start=1, end=2),
        helper.make_node("Add", ["past_len", "seq_len"], ["total_len"]),
        # attention: softmax(q k^T + mask) v, q = k_new
        helper.make_node("Transpose", ["present.0.key"], ["kT"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["k_new", "kT"], ["scores"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["one", "maskf"], ["inv"]),
        helper.make_node("Mul", ["inv", "neg_big"], ["add_mask2"]),
        helper.make_node("Unsqueeze", ["add_mask2", "axes12"], ["pad_mask"]),  # [B,1,1,T]
        # causal part, as exporters build it: key k visible to query q iff k <= past_len + q
        helper.make_node("Squeeze", ["past_len"], ["cm_past"]),
        helper.make_node("Squeeze", ["total_len"], ["cm_total"]),
        helper.make_node("Range", ["cm_start", "cm_total", "cm_step"], ["cm_keys"]),  # [T]
        helper.make_node("Range", ["cm_past", "cm_total", "cm_step"], ["cm_queries"]),  # [S]
        helper.make_node("Unsqueeze", ["cm_queries", "cm_axis"], ["cm_query"]),  # [S, 1]
        helper.make_node("LessOrEqual", ["cm_keys", "cm_query"], ["cm_visible"]),  # [S, T]
        helper.make_node("Where", ["cm_visible", "cm_zero", "neg_big"], ["cm_fill"]),
        helper.make_node("Add", ["pad_mask", "cm_fill"], ["add_mask"]),  # [B,1,S,T]
        helper.make_node("Add", ["scores", "add_mask"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "present.0.value"], ["ctx4"]),  # [B,H,S,D]
        helper.make_node("Transpose", ["ctx4"], ["ctx_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ctx_t", "flat_shape"], ["hidden"]),
        helper.make_node("MatMul", ["hidden", "lm_head"], ["logits"]),
    ]
    inits = [emb, head, _i64("hd_tail", [H, D]), _i64("axes12", [1, 2]), _i64("flat_shape", [0, 0, -1]),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(-1e9, np.float32), "neg_big"),
             numpy_helper.from_array(np.array(0.0, np.float32), "cm_zero"),
             numpy_helper.from_array(np.array(0, np.int64), "cm_start"),
             numpy_helper.from_array(np.array(1, np.int64), "cm_step"), _i64("cm_axis", [-1])]
    cache_t = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", H, "past", D])  # noqa: E731
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
        cache_t("past_key_values.0.key"),
        cache_t("past_key_values.0.value"),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", V]),
        helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, ["batch", H, "total", D]),
        helper.make_tensor_value_info("present.0.value", TensorProto.FLOAT, ["batch", H, "total", D]),
        helper.make_tensor_value_info("total_len", TensorProto.INT64, [1]),
    ]
    return _model(nodes, inputs, outputs, inits)


def to_ir(proto: onnx.ModelProto) -> ir.Model:
    return ir.serde.deserialize_model(proto)


def run(model: ir.Model | onnx.ModelProto, feeds: dict) -> dict:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    needed = {i.name for i in sess.get_inputs()}
    return dict(zip(names, sess.run(names, {k: v for k, v in feeds.items() if k in needed})))


def ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def reference_attention(emb: np.ndarray, head: np.ndarray, ids, pos, cache_k, cache_v):
    """numpy reference of cache_model in the retained contract: write rows at pos, mask j<=pos."""
    B, S = ids.shape
    k_new = emb[ids].reshape(B, S, H, D).transpose(0, 2, 1, 3)
    v_new = -k_new
    K, Vc = cache_k.copy(), cache_v.copy()
    ctx = K.shape[2]
    for b in range(B):
        for s in range(S):
            K[b, :, pos[b, s] % ctx] = k_new[b, :, s]
            Vc[b, :, pos[b, s] % ctx] = v_new[b, :, s]
    scores = k_new @ K.transpose(0, 1, 3, 2)
    visible = np.arange(ctx)[None, None, None, :] <= pos[:, None, :, None]
    scores = np.where(visible, scores, -10000.0)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    hidden = (p @ Vc).transpose(0, 2, 1, 3).reshape(B, S, H * D)
    return hidden @ head, K, Vc
