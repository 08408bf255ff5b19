"""Derive the attention mask from ``position_ids`` and drop ``attention_mask``.

The exporter's causal mask assumes the queries sit at ``past_len + i`` and takes padding from
``attention_mask``. With a retained cache the real positions differ per row (ragged prompts,
chunked prefill), so the mask is *replaced* where it meets the scores:

* decomposed attention: walking up from each attention ``Softmax`` input through the mask
  ``Add``/``Where``/``Cast`` nodes to the raw scores, the Softmax then reads
  ``Where(visible, scores, -10000)``;
* ONNX ``Attention`` ops: ``attn_mask`` becomes the boolean ``visible`` and ``is_causal=0``,

with ``visible[b, 0, i, j] = j <= position_ids[b, i]`` of shape ``[batch, 1, seq_len,
ctx_len]`` (``ctx_len`` read off the cache input); with ``sliding_window=W`` also
``j > position_ids[b, i] - W`` (each query sees its last W positions, as Mistral-style sliding
attention does; the cache keeps every position, so this needs ``ctx_len`` slots, no ring). A padding token has position ``-1``: it sees
nothing (its output is ignored), and every other consumer of ``position_ids`` (rotary tables,
learned position embeddings) reads ``max(position_ids, 0)`` so a pad never indexes out of
range. ``attention_mask`` is removed from the inputs; any use that survives (rare: e.g. its
shape) reads an all-ones ``[batch, ctx_len]`` tensor.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qeff_graph.errors import UnsupportedGraphError
from qeff_graph.ir.analysis import depends_on, find_io, find_kv_cache
from qeff_graph.ir.build import Builder, is_qeff_node
from qeff_graph.passes.registry import register

__all__ = ["PositionMask", "MASKED_SCORE"]

logger = logging.getLogger(__name__)

# Score given to invisible keys: exp(-10000 - max) == 0 in fp32 and fp16, and a fully masked
# row (a pad query) stays finite instead of turning into NaN.
MASKED_SCORE = -10000.0

_MASK_OPS = {"Add", "Where", "Cast", "Identity", "Sub"}


def _scores_of(softmax_input: ir.Value, cache: set[ir.Value]) -> ir.Value:
    """Walk up from a Softmax input past the mask-applying nodes to the raw scores."""
    value = softmax_input
    for _ in range(16):
        node = value.producer()
        if node is None or node.op_type not in _MASK_OPS or is_qeff_node(node):
            return value
        if node.op_type in ("Cast", "Identity"):
            value = node.inputs[0]
            continue
        operands = node.inputs[1:] if node.op_type == "Where" else node.inputs
        dependent = [v for v in operands if v is not None and depends_on(v, cache)]
        if len(dependent) != 1 or (node.op_type == "Sub" and dependent[0] is not node.inputs[0]):
            return value
        value = dependent[0]
    return value


@register("position-mask")
class PositionMask(ir.passes.InPlacePass):
    """Replace the exporter's causal/padding mask by `key j visible iff j <= position_ids`.

    Expects: a graph with a KV cache and a ``position_ids`` input ``[batch, seq_len]``;
    attention is either decomposed (``Softmax`` over scores computed from the key cache) or
    ONNX ``Attention`` ops.
    Guarantees: every attention site uses the position-derived mask (windowed when
    ``sliding_window`` is set: every layer slides); ``attention_mask`` is no longer an input;
    consumers other than the mask read ``max(position_ids, 0)``.
    """

    def __init__(self, sliding_window: int | None = None):
        super().__init__()
        if sliding_window is not None and sliding_window < 1:
            raise UnsupportedGraphError(f"sliding_window must be >= 1, got {sliding_window}")
        self.sliding_window = sliding_window

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        kv = find_kv_cache(model)
        io = find_io(model, kv)
        if io.position_ids is None:
            raise UnsupportedGraphError(
                "graph has no position_ids input; re-export the model with position_ids "
                "(e.g. `qeff-graph export`), the retained cache needs them"
            )
        pos = io.position_ids
        keys = {layer.key.past for layer in kv.layers} | {layer.key.present for layer in kv.layers}
        # the cache itself when the present output sits behind Identity/Cast (an Attention
        # writer's first output is the attention result, not the cache)
        keys |= {layer.key.writer.outputs[0] for layer in kv.layers
                 if layer.key.writer.op_type != "Attention"}

        softmaxes = [
            n for n in graph
            if n.op_type == "Softmax" and not is_qeff_node(n) and depends_on(n.inputs[0], keys)
        ]
        attentions = [
            n for n in graph
            if n.op_type == "Attention" and n.domain in ("", "ai.onnx") and not is_qeff_node(n)
        ]
        if not softmaxes and not attentions:
            raise UnsupportedGraphError(
                "no attention found that reads the key cache (no Softmax over cache scores, no "
                "ONNX Attention op); this graph layout is not supported yet"
            )
        old_pos_uses = [(u.node, u.idx) for u in pos.uses()]

        b = Builder(graph, "position-mask")
        ctx = b.op("Squeeze", b.op("Shape", kv.layers[0].key.past, start=2, end=3), b.i64(0))
        slots = b.op("Range", b.const(0, "int64"), ctx, b.const(1, "int64"))
        slots = b.op("Reshape", slots, b.i64(1, 1, 1, -1))
        query_pos = b.op("Unsqueeze", pos, b.i64(1, 3))
        if self.sliding_window:
            causal = b.op("LessOrEqual", slots, query_pos)
            start = b.op("Sub", query_pos, b.const(np.array(self.sliding_window, dtype=np.int64)))
            visible = b.op("And", causal, b.op("Greater", slots, start), name="qeff_visible_mask")
        else:
            visible = b.op("LessOrEqual", slots, query_pos, name="qeff_visible_mask")  # [B,1,S,ctx]

        masked = None
        for node in softmaxes:
            scores = _scores_of(node.inputs[0], keys)
            if masked is None:
                masked = b.const(np.array(MASKED_SCORE, dtype=np.float32))
            fill = b.op("CastLike", masked, scores)
            node.replace_input_with(0, b.op("Where", visible, scores, fill))
        for node in attentions:
            if len(node.inputs) < 4:
                node.resize_inputs(4)
            node.replace_input_with(3, visible)
            node.attributes["is_causal"] = ir.AttrInt64("is_causal", 0)

        clamped = b.op("Max", pos, b.const(np.array(0, dtype=np.int64)), name="qeff_position_ids_clamped")
        for user, index in old_pos_uses:
            user.replace_input_with(index, clamped)
        b.commit()

        removed_mask = False
        mask = io.attention_mask
        if mask is not None:
            ir.passes.common.RemoveUnusedNodesPass()(model)
            if mask.uses():
                logger.info("attention_mask still used by %d nodes; feeding ones", len(mask.uses()))
                b2 = Builder(graph, "position-mask")
                batch = b2.op("Shape", io.input_ids if io.input_ids is not None else pos, start=0, end=1)
                ctx_1d = b2.op("Shape", kv.layers[0].key.past, start=2, end=3)
                one = b2.op("Cast", b2.const(np.array(1, dtype=np.int64)), to=mask.dtype or ir.DataType.INT64)
                ones = b2.op("Expand", one, b2.op("Concat", batch, ctx_1d, axis=0))
                ir.convenience.replace_all_uses_with(mask, ones)
                b2.commit()
            graph.inputs.remove(mask)
            removed_mask = True
        graph.sort()
        self.stats = {
            "softmax_masks": len(softmaxes),
            "attention_masks": len(attentions),
            "attention_mask_removed": int(removed_mask),
        }
        if self.sliding_window:
            self.stats["sliding_window"] = self.sliding_window
        return ir.passes.PassResult(model, modified=True)
