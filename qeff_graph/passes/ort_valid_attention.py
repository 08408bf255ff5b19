"""Attend over the valid part of the retained cache only (``ort-valid-attention``, ONNX Runtime lowering).

A retained-state program attends over all ``ctx_len`` cache slots and masks the ones beyond each
query's position, so a decode step costs O(ctx_len) whatever the text length: the K/V reads, the
grouped-query ``Expand`` copies, the scores and the Softmax all run over the whole cache. This
pass makes them run over the first ``T = max(position_ids) + 1`` slots — every slot a query of
the step may see (slot j is visible to position p iff j <= p) — so decode cost follows the
text, not the reserved context::

    past_key.{i} ─ ScatterND ─┬─▶ past_key.{i}_RetainedState          (unchanged: the whole cache)
                              └─ Slice(axis 2, 0:T) ─▶ the attention reads

and every other operand of the score path (the position mask, kept biases such as ALiBi, the mask
``Where`` conditions; the ``attn_mask`` of an ONNX ``Attention`` op) is sliced to ``T`` along its
last (key) axis. The columns dropped are masked ones: their softmax weight is exactly 0, so the
result is the same; only the work goes. Together with the runtime's in-place cache update
(:mod:`qeff_graph.backends.ort.inplace`) nothing per step is O(ctx_len) but the mask compare.

Shapes on the cache read paths must follow the sliced cache. Exporters often build the
grouped-query ``Expand``/``Reshape`` targets (and Bloom its score views) as ``Concat`` of single
dims, one of them the cache length (``past + seq``, i.e. ``ctx_len`` in a program): that dim
becomes the valid length ``T`` where its symbolic form provably is the cache length, else ``-1``
in a Reshape (the one dim left to infer: the sliced length) or ``1`` in an Expand whose input
carries the length on that axis (broadcasting keeps the input's length). A target that depends
on the cache length any other way keeps the layer in the portable form — exact, just not
faster — and the pass reports it in its stats and the log, naming the node. A shape read of a
value whose symbolic dims are all ints or token-input symbols does not count as depending on
the cache length.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from qeff_graph.backends.ort.inplace import inplace_cache_inputs
from qeff_graph.errors import PreconditionError
from qeff_graph.ir.analysis import depends_on, find_io, find_kv_cache, require_retained
from qeff_graph.ir.attention import (
    AttentionSite,
    _Finder,
    find_attention_sites,
    scalar_value,
)
from qeff_graph.ir.build import Builder, is_qeff_node
from qeff_graph.ir.positions import is_cache_length
from qeff_graph.passes.ort_group_query_attention import has_group_query_attention
from qeff_graph.passes.registry import register

__all__ = ["OrtValidAttention"]

logger = logging.getLogger(__name__)

_TAG = "ort-valid-attention"
VALID_LENGTH = "qeff_valid_length"  # the [1] int64 T every slice ends at
_SHAPE_INPUTS = {"Reshape": 1, "Expand": 1, "Tile": 1}  # layout ops whose target shape is an input


@register(_TAG)
class OrtValidAttention(ir.passes.InPlacePass):
    """Slice the retained cache to ``max(position_ids) + 1`` slots before the attention reads it.

    Requires: a retained-state program (``kv-retention`` and ``position-mask`` applied) with
    ``position_ids``; not already lowered. Ensures: in every lowered layer the attention reads the
    cache only through the valid-length slice, the ``_RetainedState`` outputs are still the
    ScatterND results (the cache update stays in place), and the score path carries no operand
    wider than the slice.
    """

    def requires(self, model: ir.Model) -> None:
        require_retained(model)
        if any(v.name == VALID_LENGTH for n in model.graph for v in n.outputs):
            raise PreconditionError("the attention is already lowered to the valid length")

    def ensures(self, model: ir.Model) -> None:
        kv = find_kv_cache(model)
        for layer in kv.layers:
            if layer.index not in self.lowered:
                continue
            for entry in (layer.key, layer.value):
                full = entry.writer.outputs[0]
                stray = [u.node.name for u in full.uses() if not _is_valid_slice(u.node)]
                if stray:
                    raise ir.passes.PostconditionError(
                        f"layer {layer.index}: {stray[0]} still reads the whole cache {full.name!r}")
        pasts = {v.name for v in kv.past_inputs}
        if inplace_cache_inputs(model) != pasts and self.inplace_before:
            raise ir.passes.PostconditionError("the lowering broke the in-place cache update")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.lowered, self.inplace_before = set(), False
        if has_group_query_attention(model):  # ort-gqa lowered every layer: nothing left to do
            self.stats = {"layers": len(find_kv_cache(model).layers), "lowered": 0, "gqa": True}
            return ir.passes.PassResult(model, modified=False)
        kv = find_kv_cache(model)
        io = find_io(model, kv)
        self.inplace_before = inplace_cache_inputs(model) == {v.name for v in kv.past_inputs}
        sites = find_attention_sites(model, kv)
        lengths = _Lengths(_Finder(model, kv), kv, io)
        self.lowered: set[int] = set()
        kept: dict[int, str] = {}
        plans: dict[int, list] = {}
        for layer in kv.layers:
            why, retargets, carried = None, [], set()
            for entry in (layer.key, layer.value):
                fixes, blocked, flow = lengths.path_plan(entry)
                why, retargets, carried = why or blocked, retargets + fixes, carried | flow
            for site in (s for s in sites if s.layer == layer.index):
                fixes, blocked = _site_plan(lengths, site, carried)
                why, retargets = why or blocked, retargets + fixes
            if why:
                kept[layer.index] = why
                logger.info("%s: layer %d keeps the whole-cache attention: %s", _TAG, layer.index, why)
            else:
                self.lowered.add(layer.index)
                plans[layer.index] = retargets

        b = Builder(graph, _TAG)
        if self.lowered:
            top = b.op("ReduceMax", io.position_ids, keepdims=1)  # [1, 1]: the furthest position of the step
            length = b.op("Add", b.op("Reshape", top, b.i64(1)), b.i64(1))
            length = b.op("Max", length, b.i64(1), name=VALID_LENGTH)  # >= 1 even for an all-pad step
            zero, one, seq_axis, last_axis, minus_one = b.i64(0), b.i64(1), b.i64(2), b.i64(-1), b.i64(-1)
            sliced: dict[int, ir.Value] = {}

            def key_slice(value: ir.Value) -> ir.Value:  # one slice per operand, shared by its layers
                if id(value) not in sliced:
                    sliced[id(value)] = b.op("Slice", value, zero, length, last_axis)
                return sliced[id(value)]

            for layer in kv.layers:
                if layer.index not in self.lowered:
                    continue
                for entry in (layer.key, layer.value):
                    full = entry.writer.outputs[0]
                    uses = [(u.node, u.idx) for u in full.uses()]
                    part = b.op("Slice", full, zero, length, seq_axis)
                    for node, idx in uses:
                        node.replace_input_with(idx, part)
                for site in (s for s in sites if s.layer == layer.index):
                    for node, idx in _side_operands(site):
                        node.replace_input_with(idx, key_slice(node.inputs[idx]))
                for node, shape_input, (piece, how) in plans[layer.index]:
                    pieces = list(node.inputs[shape_input].producer().inputs)
                    pieces[piece] = {"length": length, "infer": minus_one, "broadcast": one}[how]
                    node.replace_input_with(shape_input, b.op("Concat", *pieces, axis=0))
        b.commit()
        graph.sort()
        self.stats = {"layers": len(kv.layers), "lowered": len(self.lowered), "kept": len(kept)}
        if kept:
            first = min(kept)
            self.stats["kept_reason"] = f"layer {first}: {kept[first]}"
        return ir.passes.PassResult(model, modified=bool(self.lowered))


def _is_valid_slice(node: ir.Node) -> bool:
    return node.op_type == "Slice" and is_qeff_node(node) and len(node.inputs) > 2 \
        and node.inputs[2] is not None and node.inputs[2].name == VALID_LENGTH


def _site_plan(ctx: _Lengths, site: AttentionSite, carried: set[ir.Value]) -> tuple[list, str | None]:
    """``(retargets, why)`` for the Reshapes on ``site``'s scores and probabilities (Bloom's
    ``[B*H, S, L]`` ↔ ``[B, H, S, L]`` views): a target that follows the cache length is retargeted
    like those on the cache paths, or the layer stays whole (``why``)."""
    if site.kind != "decomposed":
        return [], None  # an Attention op takes K, V and its mask as they come
    nodes = [*site.chain, *site.probs]
    flow = carried | {site.scores.outputs[0]} | {n.outputs[0] for n in nodes}  # all carry the sliced keys
    retargets = []
    for node in nodes:
        if node.op_type != "Reshape" or not ctx.reads_length(node.inputs[1], flow):
            continue
        piece, why = ctx.length_piece(node, node.inputs[1], flow)
        if why:
            return [], f"{node.name} reshapes the scores with a target from the cache length: {why}"
        retargets.append((node, 1, piece))
    return retargets, None


def _side_operands(site: AttentionSite) -> list[tuple[ir.Node, int]]:
    """(node, input index) of every operand combined with the scores that has a key axis."""
    if site.kind != "decomposed":
        mask = site.scores.inputs[3] if len(site.scores.inputs) > 3 else None
        return [(site.scores, 3)] if mask is not None else []
    found = []
    value = site.scores.outputs[0]
    for node in site.chain:  # Mul/Div (the scale, a soft-cap) take scalars; Transpose/Cast/Tanh none
        if node.op_type in ("Add", "Where"):
            for idx, operand in enumerate(node.inputs):
                if operand is not None and operand is not value and scalar_value(operand) is None:
                    found.append((node, idx))
        value = node.outputs[0]
    return found


class _Lengths:
    """What decides whether a shape follows the cache length, derived once per pass run."""

    def __init__(self, finder: _Finder, kv, io):
        self.finder, self.io = finder, io
        self.pasts = set(kv.past_inputs)
        self.length = {str(p.shape[2]) for p in self.pasts if p.shape is not None and p.shape.rank() == 4}
        # dims known not to be the cache length: ints, and the symbols of the token inputs
        self.others = {str(d) for v in finder.model.graph.inputs if v not in self.pasts and v.shape is not None
                       for d in v.shape.dims if not isinstance(d, int)} - self.length

    def path_plan(self, entry) -> tuple[list, str | None, set[ir.Value]]:
        """``(retargets, why, carried)`` for the read paths of ``entry``'s cache (``carried``: the
        values on them): the shape pieces to replace so that every layout op follows a sliced
        cache, or why one cannot (then ``retargets`` is moot)."""
        _, carried = self.finder.cache_reads(entry)
        carried.discard(entry.past)
        retargets = []
        for value in carried:
            for use in value.uses():
                node = use.node
                shape_input = _SHAPE_INPUTS.get(node.op_type)
                if shape_input is None or use.idx == shape_input or len(node.inputs) <= shape_input:
                    continue
                target = node.inputs[shape_input]
                if not self.reads_length(target, carried):
                    continue
                piece, why = self.length_piece(node, target, carried)
                if why:
                    return [], f"{node.name} ({node.op_type}) takes its target shape from the cache length: {why}", \
                        carried
                retargets.append((node, shape_input, piece))
        return retargets, None, carried

    def length_piece(self, node: ir.Node, target: ir.Value, carried) -> tuple[tuple[int, str] | None, str | None]:
        """``(index, how)`` of the one ``Concat`` piece of ``target`` computed from the cache
        length: ``"length"`` when it provably is that length (it becomes the valid length), else
        ``"infer"`` (-1 in a Reshape) or ``"broadcast"`` (1 in an Expand whose input carries the
        length on that axis)."""
        concat = target.producer()
        if node.op_type == "Tile" or concat is None or concat.op_type != "Concat" \
                or concat.attributes.get_int("axis", 0) != 0:
            return None, "not a Concat of dims"
        pieces = list(concat.inputs)
        if any(self.finder.dims(p) != [1] for p in pieces):
            return None, "its pieces are not single dims"
        hits = [i for i, p in enumerate(pieces) if self.reads_length(p, carried)]
        if len(hits) != 1:
            return None, f"{len(hits)} of its dims follow the cache length"
        index = hits[0]
        if is_cache_length(pieces[index], self.io, self.pasts):
            return (index, "length"), None
        if node.op_type == "Reshape":
            if any(_constant(p) is not None and _constant(p) < 0 for p in pieces):
                return None, "it already infers a dim (-1)"
            return (index, "infer"), None
        dims = self.finder.dims(node.inputs[0])  # Expand: the input must carry the length at that axis
        at = index - len(pieces) + len(dims) if dims is not None else -1
        if dims is None or at < 0 or dims[at] is None or dims[at] == 1:
            return None, "its input's dim at that axis is not known to be the cache length"
        return (index, "broadcast"), None

    def reads_length(self, value: ir.Value, carried: set[ir.Value]) -> bool:
        """True if ``value`` may be computed from the cache length: from a cache input (its shape
        included), other than through the shape of a value on the (sliced) read path or of a
        value whose shape (symbolic shape inference) provably does not involve the cache length."""

        def settled(node: ir.Node) -> bool:
            if node.op_type not in ("Shape", "Size"):
                return False
            if node.inputs[0] in carried:
                return True
            dims = self.finder.dims(node.inputs[0])
            return dims is not None and all(isinstance(d, int) or str(d) in self.others for d in dims)

        return depends_on(value, self.pasts, through_shapes=True, stop=settled)


def _constant(value: ir.Value) -> int | None:
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None or tensor.size != 1:
        return None
    return int(tensor.numpy().reshape(-1)[0])
