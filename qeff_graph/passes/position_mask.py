"""Derive the attention mask from ``position_ids`` and drop ``attention_mask``.

The exporter's causal mask assumes the queries sit at ``past_len + i`` and takes padding from
``attention_mask``. With a retained cache the real positions differ per row (ragged prompts,
chunked prefill), so the mask is *replaced* at every attention site that
:func:`qeff_graph.ir.attention.find_attention_sites` finds from the key cache (a site it does
not understand stops the pass with one line naming the node; a ``Softmax`` that is not on a
scores path, such as a mixture-of-experts router, is never touched):

* decomposed attention: the mask terms on the scores (``Add`` of a mask, ``Where(c, scores,
  fill)``) are removed, additive biases (ALiBi, relative or learned) are kept with their mask
  parts zeroed, and the ``Softmax`` reads ``Where(visible, scores, -10000)``;
* ONNX ``Attention`` ops: ``attn_mask`` becomes the boolean ``visible`` (or ``Where(visible,
  bias, -10000)`` when the mask carried a bias) and ``is_causal=0``,

with ``visible[b, 0, i, j] = j <= position_ids[b, i]`` of shape ``[batch, 1, seq_len,
ctx_len]`` (``ctx_len`` read off the cache input); with a window ``W`` for the site's layer
also ``j > position_ids[b, i] - W`` (each query sees its last W positions, as sliding attention
does; the cache keeps every position, so this needs ``ctx_len`` slots, no ring). ``sliding_window``
is one window for every layer or a list with one entry per layer (``None``: full attention), as
configured (the builder reads config.json); the exporter's own masks are also run on a probe
(:mod:`qeff_graph.ir.mask_probe`): a window they apply is used where none is configured, a
configured one is kept where the graph shows plain causal attention (an exporter may have traced
it away), a different one is refused — as is a mask that is not causal (bidirectional, chunked).
A padding token has position ``-1``: it sees nothing (its output is ignored), and every other
consumer of ``position_ids`` (rotary tables, learned position embeddings) reads
``max(position_ids, 0)`` so a pad never indexes out of range. ``attention_mask`` is removed from
the inputs; a use that survives (a bias built from it, its shape) reads an all-ones ``[batch,
ctx_len]`` tensor, i.e. key slot ``j`` is position ``j``.

A graph without a ``position_ids`` input gets one. If it computes its positions itself (an
export without ``position_ids``), those positions assume the queries sit right after a cache of
the true length, which a retained cache (always ``ctx_len`` long) makes wrong; the forms that
:func:`qeff_graph.ir.positions.find_internal_positions` recognises (``Range(past_len, past_len +
seq_len)``, ``CumSum(attention_mask) - 1``, see :mod:`qeff_graph.ir.positions`) are replaced where
they become the model's positions by ``max(position_ids, 0)`` (cast to their dtype). Anything else
that computes positions from the past length or ``attention_mask``, or such a computation in a
graph that does have a ``position_ids`` input, is refused with one line naming the node, before
the graph is changed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from qeff_graph.errors import PreconditionError, UnsupportedGraphError

from qeff_graph.ir.analysis import find_io, find_kv_cache
from qeff_graph.ir.attention import Term, find_attention_sites, is_fill
from qeff_graph.ir.build import Builder, is_qeff_node
from qeff_graph.ir.mask_probe import probe_mask_windows, reconcile_windows
from qeff_graph.ir.positions import find_internal_positions
from qeff_graph.passes.registry import register

__all__ = ["PositionMask", "MASKED_SCORE"]

logger = logging.getLogger(__name__)

# Score given to invisible keys: exp(-10000 - max) == 0 in fp32 and fp16, and a fully masked
# row (a pad query) stays finite instead of turning into NaN.
MASKED_SCORE = -10000.0

VISIBLE_MASK = "qeff_visible_mask"


@register("position-mask")
class PositionMask(ir.passes.InPlacePass):
    """Replace the exporter's causal/padding mask by `key j visible iff j <= position_ids`.

    Requires: a graph with a KV cache whose attention sites the attention analysis understands,
    not already rewritten by this pass, with a ``position_ids`` input ``[batch, seq_len]`` or,
    without one, positions computed in a recognised form (or none at all).
    Ensures: ``position_ids`` is an input; every site's Softmax (or Attention ``attn_mask``)
    reads the position-derived mask (windowed per layer where ``sliding_window`` says so);
    ``attention_mask`` is no longer an input; consumers other than the mask (and the model's
    reads of positions it computed itself) read ``max(position_ids, 0)``.
    """

    def __init__(self, sliding_window: int | Sequence[int | None] | None = None):
        super().__init__()
        windows = sliding_window if isinstance(sliding_window, (list, tuple)) else [sliding_window]
        for w in windows:
            if w is not None and (not isinstance(w, int) or w < 1):
                raise UnsupportedGraphError(f"sliding_window must be >= 1, got {w}")
        self.sliding_window = list(sliding_window) if isinstance(sliding_window, (list, tuple)) \
            else sliding_window

    def window(self, layer: int, layers: int) -> int | None:
        if not isinstance(self.sliding_window, list):
            return self.sliding_window
        if len(self.sliding_window) != layers:
            raise UnsupportedGraphError(
                f"sliding_window lists {len(self.sliding_window)} layers but the graph has {layers}")
        return self.sliding_window[layer]

    def requires(self, model: ir.Model) -> None:
        if any(v.name == VISIBLE_MASK for n in model.graph for v in n.outputs):
            raise PreconditionError(
                "the position mask is already applied (this is a retained-state program or was "
                "optimized before); pass the original export")
        find_kv_cache(model)  # says clearly when there is none

    def ensures(self, model: ir.Model) -> None:
        if any(v.name == "attention_mask" for v in model.graph.inputs):
            raise ir.passes.PostconditionError("attention_mask is still a graph input")
        if not any(v.name == "position_ids" for v in model.graph.inputs):
            raise ir.passes.PostconditionError("position_ids is not a graph input")
        for site in self.sites:
            target = site.softmax.inputs[0] if site.softmax is not None else site.scores.inputs[3]
            producer = target.producer() if target is not None else None
            if producer is None or not any(
                    i is not None and (i.name or "").startswith(VISIBLE_MASK)
                    for i in [target, *producer.inputs]):
                raise ir.passes.PostconditionError(
                    f"attention of layer {site.layer} ({site.scores.name!r}) does not read the position mask")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        kv = find_kv_cache(model)
        io = find_io(model, kv)
        sites = find_attention_sites(model, kv)  # raises, naming the node, before any change
        computed = find_internal_positions(model, kv, io, sites)  # raises, naming the node, before any change
        windows = {site.layer: self.window(site.layer, len(kv.layers)) for site in sites}  # checked up front
        # the windows the exporter's own masks apply (probed numerically), reconciled with the
        # configured ones: a graph window wins over none, a different one is refused
        windows = reconcile_windows(probe_mask_windows(model, sites, kv, io), windows)
        self.sites = sites
        pos = io.position_ids
        synthesized = pos is None
        if synthesized:  # the graph computed its positions (replaced below) or needed none: the program does
            pos = ir.Value(name="position_ids", type=ir.TensorType(ir.DataType.INT64),
                           shape=ir.Shape(["batch_size", "seq_len"]))
            graph.inputs.append(pos)
        # the model's own reads of the positions get the clamped ones (qeff-graph's own, e.g. the
        # cache writes of kv-retention, need the -1 of a pad)
        old_pos_uses = [(u.node, u.idx) for u in pos.uses() if not is_qeff_node(u.node)]

        b = Builder(graph, "position-mask")
        ctx = b.op("Squeeze", b.op("Shape", kv.layers[0].key.past, start=2, end=3), b.i64(0))
        slots = b.op("Range", b.const(0, "int64"), ctx, b.const(1, "int64"))
        slots = b.op("Reshape", slots, b.i64(1, 1, 1, -1))
        query_pos = b.op("Unsqueeze", pos, b.i64(1, 3))
        masks: dict[int | None, ir.Value] = {}

        def visible(window: int | None) -> ir.Value:  # [B, 1, S, ctx]
            if window not in masks:
                causal = b.op("LessOrEqual", slots, query_pos)
                if window is None:
                    masks[window] = b.op("Identity", causal, name=VISIBLE_MASK)
                else:
                    start = b.op("Sub", query_pos, b.const(np.array(window, dtype=np.int64)))
                    masks[window] = b.op("And", causal, b.op("Greater", slots, start),
                                         name=f"{VISIBLE_MASK}_w{window}")
            return masks[window]

        fill = b.const(np.array(MASKED_SCORE, dtype=np.float32))
        for site in sites:
            vis = visible(windows[site.layer])
            terms = [self._strip(b, t) for t in site.terms]  # bias-only term values, or None
            if site.kind == "decomposed":
                for where in site.mask_wheres:  # Where(c, scores, fill): the scores pass
                    where.outputs[0].replace_all_uses_with(_unfilled(where))
                scores = site.softmax.inputs[0]
                site.softmax.replace_input_with(0, b.op("Where", vis, scores, b.op("CastLike", fill, scores)))
            else:
                node = site.scores
                bias = next((t for t in terms if t is not None), None)
                if bias is None:
                    mask = vis
                else:
                    query = node.inputs[0]
                    mask = b.op("Where", vis, b.op("CastLike", bias, query), b.op("CastLike", fill, query),
                                name=f"{VISIBLE_MASK}_biased_{site.layer}")
                if len(node.inputs) < 4:
                    node.resize_inputs(4)
                node.replace_input_with(3, mask)
                node.attributes["is_causal"] = ir.AttrInt64("is_causal", 0)

        clamped = b.op("Max", pos, b.const(np.array(0, dtype=np.int64)), name="qeff_position_ids_clamped")
        for user, index in old_pos_uses:
            user.replace_input_with(index, clamped)
        for dtype, layout, reads in computed:
            same = clamped if dtype == ir.DataType.INT64 else b.op("Cast", clamped, to=dtype)
            same = b.op("Unsqueeze", same, b.i64(*layout)) if layout else same
            for user, index in reads:
                user.replace_input_with(index, same)
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
            "sites": len(sites),
            "decomposed": sum(s.kind == "decomposed" for s in sites),
            "attention_ops": sum(s.kind == "attention-op" for s in sites),
            "biases_kept": sum(len(t.biases) for s in sites for t in s.terms),
            "attention_mask_removed": int(removed_mask),
            "position_ids_added": int(synthesized),
            "computed_positions_replaced": len(computed),
        }
        if any(w is not None for w in windows.values()):
            self.stats["windows"] = ",".join(str(windows[k]) for k in sorted(windows))
        return ir.passes.PassResult(model, modified=True)

    @staticmethod
    def _strip(b: Builder, term: Term) -> ir.Value | None:
        """Remove the mask parts of an additive term; return the bias that is left (None if none).

        A mask-only term on the scores is bypassed (the ``Add`` passes the scores through); in a
        mixed term each mask leaf is replaced by zeros of its shape and each ``Where(c, x, fill)``
        by ``x``, so the bias keeps its broadcast shape.
        """
        node, index = term.node, term.index
        if term.mask_only:
            if node.op_type == "Add":
                node.outputs[0].replace_all_uses_with(node.inputs[1 - index])
            return None
        for where, (user, idx) in term.masked:
            user.replace_input_with(idx, _unfilled(where))
        for leaf in term.leaves:
            if leaf.role != "mask":
                continue
            if leaf.value.dtype == ir.DataType.BOOL:
                raise UnsupportedGraphError(
                    f"boolean mask {leaf.value.name!r} is added into a float bias term; not understood")
            user, idx = leaf.use
            zeros = b.op("ConstantOfShape", b.op("Shape", leaf.value), value=ir.tensor(np.zeros(1, np.float32)))
            user.replace_input_with(idx, b.op("CastLike", zeros, leaf.value))
        return node.inputs[index] if node.op_type != "Add" else None


def _unfilled(where: ir.Node) -> ir.Value:
    """The input of a masking ``Where(c, x, fill)`` (or ``Where(c, fill, x)``) that is not the fill."""
    return where.inputs[2] if is_fill(where.inputs[1]) else where.inputs[1]
