"""Each layer's attention as ONNX Runtime's ``GroupQueryAttention`` over the retained cache
(``ort-gqa``, ONNX Runtime lowering).

A retained-state program writes the new keys/values into the ``ctx_len`` cache with ScatterND
and attends through the exporter's decomposed attention: the grouped-query ``Expand``/``Reshape``
copies, ``Q·Kᵀ``, scale, the position mask, Softmax, ``P·V`` and the layout ops around them —
some 40 nodes per layer. ``com.microsoft.GroupQueryAttention`` does all of it in one kernel that
writes the new rows into the cache *in place* (past and present bound to one buffer) and attends
over each row's valid length only::

    q [B, Nq, S, H]      ─ Transpose/Reshape ─▶ [B, S, Nq·H] ─┐
    k_new, v_new [B, Nkv, S, H] ─ Transpose/Reshape ─▶ [B, S, Nkv·H] ─┤
    past_key.{i}, past_value.{i} ──────────────────────────────────────┤ GroupQueryAttention
    seqlens_k = max(position_ids, 0) over the row (int32 [B])  ─────────┤  ─▶ out ─ Reshape/Transpose ─▶ (what P·V fed)
    total_sequence_length = max(max(position_ids) + 1, S) (int32) ──────┤  ─▶ present = past_key.{i}_RetainedState
    query_seqlens = count(position_ids >= 0) over the row (int32 [B]) ──┘

With ``query_seqlens`` the kernel takes a right-padded chunk for every row at once: row ``b``'s
``Q`` real tokens are its first ``Q`` and sit at positions ``seqlens_k[b] - Q + 1 ..
seqlens_k[b]``; pads write nothing (an idle row, all pads, is left as it is). The portable
program is more general — any position per token — so the runtime has to honour the kernel's
form (:class:`~qeff_graph.backends.ort.RetainedStateSession` does): a step whose rows are not
"consecutive positions, then pads", or whose chunk would reach past the cache
(``first position + S > ctx_len``), or that writes chosen slots (continuous batching's
``batch_index``) runs row by row with the pads dropped. One difference is invisible: a pad of
the portable program writes zeros into slot ``ctx_len - 1``, the kernel writes nothing; no query
sees that slot before a real token at position ``ctx_len - 1`` writes it.

**Rotary in the kernel.** Where the query and the new key rows come, through layout ops and a
rotary (``x·cos + rotate(x)·sin``: rotate-half, or interleaved pairs as gpt-j's), from projections
``[B, S, N·H]``, the kernel reads those projections directly (``do_rotary=1``,
``rotary_interleaved``) and the exporter's head reshapes, transposes and rotary ops go too. Its
cos/sin caches are the graph's own tables (the ``[.., S, R]`` values the rotary multiplies by,
computed from ``position_ids`` as before; ``R`` = rotary_dim, less than head_dim for a partial
rotary as phi's or gpt-neox's, whose kernel turns the first ``R`` of each head only): each
token's row — its first half, or its even entries for pairs — ``[B·S, R/2]`` (rows below, up to
``total_sequence_length`` rows, the kernel's minimum), indexed by rotary position ids ``0 ..
B·S-1`` — so the kernel applies exactly the graph's angles, whatever the model's rope scaling.
The kernel wants ``R`` a multiple of 16: a rotary in pairs below that (codegen's 8) is widened
with pairs that turn by cos 1, sin 0, i.e. stay exactly as they are, where the head has room; a
rotate-half one cannot be (its halves would pair other dims) and keeps the plain form.
Which table is cos and which pairing the rotary uses are left to the numeric check (the four
readings are tried in turn); tables of another shape fail it and the layer keeps the plain form
(rotary applied by the graph, the kernel reading ``[B, N, S, H]`` values).

A layer is lowered only when its attention is the plain causal (or sliding-window) softmax
attention of one query over the cache, and that is **proven numerically**: the cone of the
layer's ``P·V`` output and its two cache writes (:class:`~qeff_graph.ir.mask_probe.ConeProbe`,
no weights) is run on random queries, keys, values and caches for a batched decode step with an
idle row, a chunk after a past, a first prompt and a right-padded batch, next to the ``GroupQueryAttention`` this pass would put
there; outputs and caches must agree within :data:`TOLERANCE`. The scale is the product of the
scalar factors on the scores and key paths (evaluated by the same run), the window is read off
the position mask (:func:`~qeff_graph.ir.mask_probe.probe_mask_windows`). One additive bias on
the scores (ALiBi: ``[B·N or N, 1 or S, ctx]`` or ``[B or 1, N or 1, 1 or S, ctx]``, computed by
the graph as before) goes in as the kernel's ``attention_bias``, its key axis cut to
``total_sequence_length`` and broadcast to ``[.., S, total]``; the kernel adds it after its scale,
so a bias the graph scales afterwards fails the check. A query and attention output with the
heads folded into the batch, ``[B·N, S, H]`` (bloom), are reshaped to ``[B, N, S, H]`` and back
around the kernel (as many query heads as the cache holds; the check proves it). Lowering is
all or nothing: if one layer cannot be proven (a soft-cap not of the form ``c·tanh(x/c)``, a
second bias, a float16 cache under float32 compute, a cache read anywhere else), no layer is
changed and ``stats`` says why — the program then keeps the valid-length lowering
(:mod:`~qeff_graph.passes.ort_valid_attention`).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qeff_graph.backends.ort.inplace import inplace_cache_inputs
from qeff_graph.errors import PreconditionError, UnsupportedGraphError
from qeff_graph.ir.analysis import depends_on, find_io, find_kv_cache, require_retained
from qeff_graph.ir.attention import (
    AttentionSite,
    _Finder,
    describe_node,
    find_attention_sites,
    is_shape_scalar,
    scalar_value,
)
from qeff_graph.ir.build import Builder, is_qeff_node
from qeff_graph.ir.mask_probe import MAX_CONSTANT_BYTES, ConeProbe, probe_mask_windows
from qeff_graph.passes.registry import register

__all__ = ["OrtGroupQueryAttention", "TOLERANCE", "has_group_query_attention"]

logger = logging.getLogger(__name__)

_TAG = "ort-gqa"
TOLERANCE = 1e-4  # max abs difference of the numeric check (outputs of unit-scale random inputs)
KERNEL_ROTARY_MULTIPLE = 16  # GroupQueryAttention's rotary_dim must be a multiple of it (ORT 1.32's CPU kernel)
_MS = "com.microsoft"


def has_group_query_attention(model: ir.Model) -> bool:
    """True if a ``com.microsoft.GroupQueryAttention`` made by this pass is in the graph."""
    return any(n.op_type == "GroupQueryAttention" and n.domain == _MS and is_qeff_node(n) for n in model.graph)


class _Layer:
    """What one layer's GroupQueryAttention needs, found and proven before anything changes."""

    def __init__(self, index: int, site: AttentionSite, key, value, heads: int, kv_heads: int, head_dim: int):
        self.index, self.site, self.key, self.value = index, site, key, value
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        # Shape reads of the values the lowering removes (exporters take head_dim or the batch off
        # them): each dim as an int or (graph input, axis) to read it from instead
        self.shape_reads: list[tuple[ir.Node, list]] = []
        self.scale: float | None = None
        self.window: int | None = None
        self.softcap = 0.0  # c of c * tanh(scores / c); 0: none
        self.bias: ir.Value | None = None  # an additive bias on the scores (ALiBi): the kernel's attention_bias
        self.bias_rank = 0  # 3: [B·N or N, 1 or S, ctx]; 4: [B or 1, N or 1, 1 or S, ctx]
        self.folded = False  # query and output [B·N, S, H]: the heads folded into the batch
        self.form: _Form | None = None  # what the kernel reads, once proven

    @property
    def attributes(self) -> dict:
        form = self.form
        rotary = {} if form is None or form.cos is None else {"do_rotary": 1,
                                                               "rotary_interleaved": int(form.interleaved)}
        return {"num_heads": self.heads, "kv_num_heads": self.kv_heads, "scale": float(self.scale),
                "local_window_size": self.window if self.window else -1, "softcap": float(self.softcap), **rotary}


class _Form:
    """The kernel's q/k/v for one layer: ``packed`` — ``[B, S, N·H]`` values before the exporter's
    head reshape, with the rotary (``cos``/``sin``, the ``[.., S, R]`` tables the graph multiplies
    by) done by the kernel — or the ``[B, N, S, H]`` values the attention read (rotary already
    applied), transposed and reshaped for the kernel. ``scalars``: every scalar factor between
    these values and the softmax, ``(operand, divides)``. A rotary turns the first ``rotary_dim``
    (the tables' last dim) of each head, in halves (rotate-half) or in pairs (``interleaved``).
    ``kernel_dim``: the rotary_dim the kernel is given (a multiple of 16); above ``rotary_dim``
    only for pairs, whose extra pairs turn by cos 1, sin 0 (they stay as they are, exactly).
    ``seq_first``: which of q/k/v (not packed) are ``[B, S, N, H]`` rather than ``[B, N, S, H]``
    (codegen turns its heads before the exporter's transpose)."""

    def __init__(self, q, k, v, scalars, packed=False, cos=None, sin=None, rotary_dim=0, interleaved=False,
                 kernel_dim=None, seq_first=(False, False, False)):
        self.q, self.k, self.v, self.scalars = q, k, v, scalars
        self.packed, self.cos, self.sin, self.seq_first = packed, cos, sin, tuple(seq_first)
        self.rotary_dim, self.interleaved = rotary_dim, interleaved
        self.kernel_dim = rotary_dim if kernel_dim is None else kernel_dim
        if self.kernel_dim != rotary_dim and not interleaved:
            raise ValueError("only a rotary in interleaved pairs is widened with identity pairs")

    @property
    def values(self) -> list[ir.Value]:
        return [self.q, self.k, self.v] + ([self.cos, self.sin] if self.cos is not None else [])


@register(_TAG)
class OrtGroupQueryAttention(ir.passes.InPlacePass):
    """Replace every layer's attention and cache write with one GroupQueryAttention (all or none).

    Requires: a retained-state program (``kv-retention``, ``position-mask``) with
    ``position_ids``, not lowered yet (neither by this pass nor by ``ort-valid-attention``).
    Ensures (when it lowers): every cache input is read only by its layer's GroupQueryAttention
    (and shape reads), whose present output is the ``_RetainedState`` output, so the runtime
    can bind past and present to one buffer; no ScatterND writes the cache any more.
    """

    def __init__(self, check_seed: int = 0):
        super().__init__()
        self.check_seed = check_seed
        self.stats: dict = {}

    def requires(self, model: ir.Model) -> None:
        require_retained(model)
        if has_group_query_attention(model) or any(
                is_qeff_node(n) and n.name.startswith("qeff/ort-valid-attention/") for n in model.graph):
            raise PreconditionError("the attention is already lowered to ONNX Runtime")

    def ensures(self, model: ir.Model) -> None:
        if not self.stats.get("lowered"):
            return
        kv = find_kv_cache(model)
        for layer in kv.layers:
            for entry in (layer.key, layer.value):
                readers = [u.node for u in entry.past.uses() if u.node.op_type != "Shape"]
                if len(readers) != 1 or readers[0].op_type != "GroupQueryAttention":
                    raise ir.passes.PostconditionError(
                        f"layer {layer.index}: {entry.past.name!r} is read by something other than its attention")
        if inplace_cache_inputs(model) != {v.name for v in kv.past_inputs}:
            raise ir.passes.PostconditionError("the lowering left a cache that cannot be updated in place")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        kv = find_kv_cache(model)
        io = find_io(model, kv)
        self.stats = {"layers": len(kv.layers), "lowered": 0}
        try:
            layers = _plan(model, kv, io, self.check_seed)
        except UnsupportedGraphError as exc:
            why = str(exc)
            self.stats["kept_reason"] = why
            logger.info("%s: the attention stays as it is: %s", _TAG, why)
            return ir.passes.PassResult(model, modified=False)
        _lower(model, io, layers)
        self.stats["lowered"] = len(layers)
        self.stats["windows"] = sorted({la.window or 0 for la in layers})
        self.stats["rotary"] = sum(la.form.cos is not None for la in layers)
        return ir.passes.PassResult(model, modified=True)


def _plan(model: ir.Model, kv, io, seed: int) -> list[_Layer]:
    """Every layer's lowering, each checked numerically; raises (one line) at the first that fails."""
    if io.attention_mask is not None:
        raise UnsupportedGraphError("the program still reads attention_mask (run position-mask first)")
    finder = _Finder(model, kv)
    sites = find_attention_sites(model, kv)
    layers = []
    for layer in kv.layers:
        mine = [s for s in sites if s.layer == layer.index]
        layers.append(_layer(finder, layer, mine, io))
    windows = probe_mask_windows(model, sites, kv, io)
    rng = np.random.default_rng(seed)
    for la in layers:
        la.window = windows.get(la.index)
        plain = _plain_form(finder, la)
        rotary = _rotary_form(finder, la, io, plain)
        for form in (rotary if rotary is not None else []) + [plain]:
            try:
                _prove(model, kv, io, la, form, rng)
            except UnsupportedGraphError as exc:
                if form is plain:
                    raise
                logger.info("%s: %s", _TAG, exc)
                continue  # this rotary reading is not the graph's: try the next, then the plain form
            la.form = form
            break
        la.shape_reads = _shape_reads(finder, la, io)
    return layers


def _layer(finder: _Finder, layer, sites: list[AttentionSite], io) -> _Layer:
    where = f"layer {layer.index}"
    if len(sites) != 1 or sites[0].kind != "decomposed":
        raise UnsupportedGraphError(f"{where}: not one decomposed attention ({len(sites)} sites)")
    site = sites[0]
    softcap = _softcap(site) if site.softcap else 0.0
    if softcap is None:
        raise UnsupportedGraphError(f"{where}: soft-capped scores not in the form c * tanh(x / c) "
                                    f"({describe_node(site.scores)})")
    biases = [term for term in site.terms if not term.mask_only]
    bias, bias_rank = None, 0
    if biases:  # one additive term (ALiBi): the kernel's attention_bias, if the check agrees
        term = biases[0]
        bias = term.node.inputs[term.index]
        bias_rank = len(finder.dims(bias) or [])
        if len(biases) > 1 or term.masked or term.node.op_type != "Add" or bias_rank not in (3, 4):
            raise UnsupportedGraphError(f"{where}: a bias is added to the scores in a form GroupQueryAttention has no "
                                        f"input for ({describe_node(term.node)})")
    for entry, reader, what in ((layer.key, site.scores, "key"), (layer.value, site.pv, "value")):
        if entry.writer.op_type != "ScatterND" or not is_qeff_node(entry.writer):
            raise UnsupportedGraphError(f"{where}: the {what} cache is not written by kv-retention's ScatterND")
        reads, _ = finder.cache_reads(entry)
        if [(n, i) for n, i, _v in reads] != [(reader, 1)]:
            others = [describe_node(n) for n, _i, _v in reads if n is not reader]
            raise UnsupportedGraphError(f"{where}: the {what} cache is also read by {(others or ['?'])[0]}")
    q, k_new = site.scores.inputs[0], _new_rows(layer.key.writer)  # before the pad guard: its dims are plainer
    q_dims, k_dims = finder.dims(q), finder.dims(k_new)
    out_dims = finder.dims(site.pv.outputs[0])
    folded = (q_dims is not None and out_dims is not None and len(q_dims) == len(out_dims) == 3
              and k_dims is not None and len(k_dims) == 4 and isinstance(k_dims[1], int))
    if folded:  # heads folded into the batch, [B·N, S, H] (bloom): as many query heads as the cache holds
        q_dims, out_dims = [k_dims[0], k_dims[1], *q_dims[1:]], [k_dims[0], k_dims[1], *out_dims[1:]]
    for name, dims in (("query", q_dims), ("new key", k_dims), ("attention output", out_dims)):
        if dims is None or len(dims) != 4 or not isinstance(dims[1], int) or not isinstance(dims[3], int):
            raise UnsupportedGraphError(f"{where}: the {name} is not [batch, heads, seq, head_dim] with known heads "
                                        f"and head_dim ({dims})")
    heads, head_dim, kv_heads = q_dims[1], q_dims[3], k_dims[1]
    if k_dims[3] != head_dim or out_dims[1] != heads or out_dims[3] != head_dim or heads % kv_heads:
        raise UnsupportedGraphError(f"{where}: query {q_dims}, key {k_dims} and output {out_dims} do not match")
    dtypes = {q.dtype, k_new.dtype, layer.key.past.dtype, layer.value.past.dtype, site.pv.outputs[0].dtype} - {None}
    if len(dtypes) != 1 or dtypes.pop() not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
        raise UnsupportedGraphError(f"{where}: the cache and the attention compute in different types")
    la = _Layer(layer.index, site, layer.key, layer.value, heads, kv_heads, head_dim)
    la.folded = folded
    la.softcap = softcap
    la.bias, la.bias_rank = bias, bias_rank
    return la


def _shape_reads(finder: _Finder, la: _Layer, io) -> list[tuple[ir.Node, list]]:
    """The ``Shape`` nodes that read a value the lowering removes and stay needed, each dim sourced
    from a graph input that keeps it (the layer's caches, ``input_ids``) or a number; raises when
    a dim read has no such source."""
    site = la.site
    kept = {v.producer() for v in [*la.form.values, la.bias] if v is not None}  # what the kernel reads stays
    dead: set[ir.Node] = {site.scores, *site.chain, *site.probs, site.pv, la.key.writer, la.value.writer} - kept
    for entry in (la.key, la.value):
        dead |= {v.producer() for v in finder.cache_reads(entry)[1] if v.producer() is not None}
    outputs = set(finder.model.graph.outputs)
    queue = [v.producer() for n in dead for v in n.inputs if v is not None and v.producer() is not None]
    while queue:  # whatever only feeds removed nodes goes too
        node = queue.pop()
        if node in dead or node in kept or any(o in outputs for o in node.outputs):
            continue
        users = [u.node for o in node.outputs for u in o.uses()]
        if users and all(u in dead for u in users):
            dead.add(node)
            queue.extend(v.producer() for v in node.inputs if v is not None and v.producer() is not None)
    sources = {}
    for value in (io.input_ids, la.key.past):
        for axis, dim in enumerate(finder.dims(value) or []):
            if isinstance(dim, str):
                sources.setdefault(dim, (value, axis))
    reads = []
    for node in dead:
        for value in node.outputs:
            for use in value.uses():
                if use.node in dead or value is site.pv.outputs[0]:
                    continue
                if use.node.op_type not in ("Shape", "Size"):
                    raise UnsupportedGraphError(f"layer {la.index}: {describe_node(use.node)} reads {value.name!r}, "
                                                "a value of the attention the lowering removes")
                dims = finder.dims(value)
                needed = _dims_read(use.node, len(dims)) if dims is not None else None
                if dims is None or any(not isinstance(dims[i], int) and dims[i] not in sources for i in needed):
                    raise UnsupportedGraphError(
                        f"layer {la.index}: {describe_node(use.node)} reads the shape of {value.name!r} ({dims}), "
                        "whose dims do not all come from the cache or the token inputs")
                # a dim nothing reads (only Gathers of others follow) is filled with 0
                reads.append((use.node, [d if isinstance(d, int) else sources[d] if i in needed else 0
                                         for i, d in enumerate(dims)]))
    return reads


def _new_rows(writer: ir.Node) -> ir.Value:
    """The new key/value rows a cache ScatterND writes, before kv-retention's pad guard
    ``Where(real, rows, 0)``: the kernel writes nothing for a pad, so the guard has no work left
    (the numeric check runs the guard as part of the original cone)."""
    rows = writer.inputs[2]
    guard = rows.producer()
    if guard is not None and guard.op_type == "Where" and (guard.name or "").startswith("qeff/kv-retention/") \
            and scalar_value(guard.inputs[2]) == 0.0:
        return guard.inputs[1]
    return rows


def _softcap(site: AttentionSite) -> float | None:
    """``c`` of a soft-cap ``Div(c)|Mul(1/c) → Tanh → Mul(c)`` on the scores, else None. (The scale
    GroupQueryAttention applies before its soft-cap is the product of every scalar on the scores,
    where ``1/c`` and ``c`` cancel; the numeric check has the last word.)"""
    chain = site.chain
    at = next((i for i, n in enumerate(chain) if n.op_type == "Tanh"), None)
    if at is None or at == 0 or at + 1 >= len(chain) or sum(n.op_type == "Tanh" for n in chain) != 1:
        return None
    before, after = chain[at - 1], chain[at + 1]
    if after.op_type != "Mul" or before.op_type not in ("Mul", "Div"):
        return None
    cap = next((scalar_value(v) for v in after.inputs if v is not chain[at].outputs[0]), None)
    incoming = chain[at - 2].outputs[0] if at >= 2 else site.scores.outputs[0]
    inner = next((scalar_value(v) for v in before.inputs if v is not incoming), None)
    if not cap or inner is None or not np.isclose(inner if before.op_type == "Div" else 1.0 / inner, cap):
        return None
    return float(cap)


def _chain_scalars(finder: _Finder, la: _Layer) -> list[tuple[ir.Value, bool]]:
    """The scalar factors ``(operand, divides)`` on the chain after ``Q·Kᵀ`` and on the key's read
    path from the cache."""
    found = []
    value = la.site.scores.outputs[0]
    for node in la.site.chain:
        if node.op_type in ("Mul", "Div"):
            idx = list(node.inputs).index(value)
            found.append((node.inputs[1 - idx], node.op_type == "Div"))
        value = node.outputs[0]
    _, carried = finder.cache_reads(la.key)
    for v in carried:
        node = v.producer()
        if node is not None and node.op_type in ("Mul", "Div") and node is not la.key.writer:
            idx = next(i for i, x in enumerate(node.inputs) if x in carried)
            found.append((node.inputs[1 - idx], node.op_type == "Div"))
    return found


def _plain_form(finder: _Finder, la: _Layer) -> _Form:
    """The query as the scores read it and the new rows as the cache gets them (rotary applied)."""
    return _Form(la.site.scores.inputs[0], _new_rows(la.key.writer), _new_rows(la.value.writer),
                 _chain_scalars(finder, la))


def _rotary_form(finder: _Finder, la: _Layer, io, plain: _Form) -> list[_Form] | None:
    """Readings with the rotary in the kernel (rotate-half or interleaved pairs, each with both
    ways of naming the two tables cos and sin), or None when the structure is not there. Walking
    up from the query and the new key rows, each side must reach, through layout ops, scalar
    factors, ``Mul``/``Add``/``Neg``/``Slice``/``Split``/``Concat`` (a rotary), one value
    ``[batch, seq, heads·head_dim]`` that does not depend on the positions (the projection
    output), and the position-dependent operands of its ``Mul``s must be the same two tables
    ``[.., seq, rotary_dim]`` for query and key (``rotary_dim`` at most head_dim: a partial rotary
    leaves the rest of each head as it is; the kernel wants a multiple of 16: a rotary in pairs
    below that is widened with identity pairs, cos 1 and sin 0, when the head has the room, a
    rotate-half one cannot be — its halves would pair other dims). Which is cos, and which
    pairing the rotary uses, the numeric check decides."""
    if io.position_ids is None:
        return None
    for packed in (True, False):  # the projections, else (fused Q/K/V) the heads before the rotary
        found = [_projection(finder, start, heads * la.head_dim, io, heads_layout=not packed)
                 for start, heads in ((plain.q, la.heads), (plain.k, la.kv_heads))]
        if None not in found:
            break
    else:
        return None
    (q, q_tables, q_scalars), (k, k_tables, k_scalars) = found
    if len(q_tables) != 2 or q_tables != k_tables:
        return None
    seq_first = (False, False, False) if packed else (
        _seq_first(finder, q, plain.q), _seq_first(finder, k, plain.k), False)
    widths = set()
    for table in q_tables:  # [.., seq, rotary_dim]
        dims = finder.dims(table)
        if dims is None or len(dims) < 2 or not isinstance(dims[-1], int):
            return None
        widths.add(dims[-1])
    rotary_dim = widths.pop()
    kernel_dim = -(-rotary_dim // KERNEL_ROTARY_MULTIPLE) * KERNEL_ROTARY_MULTIPLE
    if widths or rotary_dim % 2 or not 0 < rotary_dim <= la.head_dim or kernel_dim > la.head_dim:
        return None  # the kernel's rule: cos_cache width (rotary_dim / 2) a multiple of 8
    pairings = (False, True) if kernel_dim == rotary_dim else (True,)  # only pairs widen exactly
    v = _projection(finder, plain.v, la.kv_heads * la.head_dim, io, layout_only=True) if packed else [plain.v]
    if v is None:
        return None
    scalars = plain.scalars + q_scalars + k_scalars
    a, b = sorted(q_tables, key=lambda t: t.name or "")
    return [_Form(q, k, v[0], scalars, packed=packed, cos=c, sin=s_, rotary_dim=rotary_dim, interleaved=pairs,
                  kernel_dim=kernel_dim, seq_first=seq_first) for pairs in pairings for c, s_ in ((a, b), (b, a))]


def _seq_first_dims(dims: list) -> list | None:
    """``[B, S, N, H]`` for heads-first ``[B, N, S, H]`` dims; None where the two read alike."""
    if dims is None or len(dims) != 4 or dims[1] == dims[2]:
        return None
    return [dims[0], dims[2], dims[1], dims[3]]


def _seq_first(finder: _Finder, value: ir.Value, start: ir.Value) -> bool:
    """Whether ``value`` is ``start``'s heads in ``[B, S, N, H]`` (its dims say so)."""
    dims = finder.dims(value)
    return dims is not None and dims == _seq_first_dims(finder.dims(start))


_ROTARY_OPS = {"Mul", "Add", "Sub", "Neg", "Slice", "Split", "Concat"}
_ROTARY_ARITHMETIC = {"Mul", "Div", "Add", "Sub", "Neg", "Concat"}  # what computes a rotary, not what feeds it
_VIEW_OPS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Cast"}


def _projection(finder: _Finder, start: ir.Value, width: int, io, layout_only: bool = False,
                heads_layout: bool = False):
    """``(value, tables, scalars)``: the nearest value above ``start`` shaped ``[batch, seq,
    width]`` (``heads_layout``: shaped as ``start``, ``[batch, heads, seq, head_dim]``, or as
    ``[batch, seq, heads, head_dim]``, and not made by rotary arithmetic — a fused Q/K/V projection
    has no ``[batch, seq, heads·head_dim]`` value of its own; a view of the same heads, as
    :func:`_same_heads` reads it, is walked through), the position-dependent operands of the
    ``Mul``s on the way (the rotary tables) and the scalar factors; None if the walk meets anything
    else, or more than one such value."""
    positions = {io.position_ids}
    tokens = {io.input_ids}
    start_dims = finder.dims(start)  # [batch, heads, seq, head_dim]: the projection is [batch, seq, width]
    if start_dims is None or len(start_dims) != 4:
        return None
    batch_seq = [start_dims[0], start_dims[2]]
    seq_first = _seq_first_dims(start_dims)
    tables: set[ir.Value] = set()
    scalars: list[tuple[ir.Value, bool]] = []
    tops: set[ir.Value] = set()
    queue, seen = [start], set()
    while queue:
        value = queue.pop()
        if value in seen:
            continue
        seen.add(value)
        dims = finder.dims(value)
        node = value.producer()
        if heads_layout:  # the heads before the rotary: shaped as start (or seq first), not rotary arithmetic
            top = (dims == start_dims or (seq_first is not None and dims == seq_first)) and node is not None \
                and node.op_type not in _ROTARY_ARITHMETIC
            if top and _same_heads(finder, node, (start_dims, seq_first)):
                top = False  # a view of the same heads (in either layout): the rotary may lie above
        else:  # the projection
            top = dims is not None and len(dims) == 3 and dims[2] == width and dims[:2] == batch_seq
        if top and value is not start:
            tops.add(value)
            continue
        if node is None or len(seen) > 64:
            return None
        allowed = _VIEW_OPS if layout_only else _VIEW_OPS | _ROTARY_OPS
        if node.op_type not in allowed:
            return None
        if node.op_type in _VIEW_OPS:
            queue.append(node.inputs[0])
            continue
        if node.op_type in ("Mul", "Div") and any(is_shape_scalar(x) for x in node.inputs):
            data = [x for x in node.inputs if not is_shape_scalar(x)]
            if len(data) != 1:
                return None  # constants only (not on the data path), or no scalar operand after all
            scalars += [(x, node.op_type == "Div") for x in node.inputs if x is not data[0]]
            queue.extend(data)
            continue
        if node.op_type == "Mul":
            # the table is computed from the positions alone; the data also from the tokens
            varying = [x for x in node.inputs if depends_on(x, positions) and not depends_on(x, tokens)]
            if len(varying) != 1:
                return None
            tables.add(_table(varying[0]))
            queue.extend(x for x in node.inputs if x is not varying[0])
            continue
        if node.op_type == "Slice" or node.op_type == "Split":
            queue.append(node.inputs[0])
            continue
        queue.extend(x for x in node.inputs if x is not None)
    if heads_layout:  # rotate_half(x) is shaped as x and position-free too: keep x, what the others derive from
        tops = {t for t in tops if not any(u is not t and depends_on(t, {u}) for u in tops)}
    if len(tops) != 1:
        return None
    return tops.pop(), tables, scalars


def _same_heads(finder: _Finder, node: ir.Node, layouts: tuple) -> bool:
    """Whether ``node`` passes heads through unchanged, from one of ``layouts`` (``[B, N, S, H]``,
    ``[B, S, N, H]``) to one of them: a Transpose swapping heads and seq (or keeping all), a Cast
    to its own type, an Identity, or a Reshape/Squeeze/Unsqueeze that keeps the dims."""
    if node.op_type not in _VIEW_OPS or not node.inputs or node.inputs[0] is None:
        return False
    src, out = finder.dims(node.inputs[0]), finder.dims(node.outputs[0])
    if src is None or out is None or src not in layouts or out not in layouts:
        return False
    if node.op_type == "Transpose":
        perm = list(node.attributes.get_ints("perm", []))
        return (perm == [0, 2, 1, 3] and src != out) or (perm == [0, 1, 2, 3] and src == out)
    if node.op_type == "Cast":
        to = node.attributes.get_int("to", None)
        return src == out and to is not None and finder.dtype(node.inputs[0]) == ir.DataType(to)
    return src == out


def _table(value: ir.Value) -> ir.Value:
    """A rotary table as computed, before the Unsqueeze/Cast that fit it to the heads layout."""
    node = value.producer()
    while node is not None and node.op_type in ("Unsqueeze", "Cast", "Identity"):
        value, node = node.inputs[0], node.inputs[0].producer()
    return value


def _prove(model: ir.Model, kv, io, la: _Layer, form: _Form, rng: np.random.Generator) -> None:
    """Run the layer's attention cone from ``form``'s values and the GroupQueryAttention reading
    them on the same random data (a batched decode step with an idle row, a chunk after a past, a
    first prompt, a right-padded batch); raise unless they agree."""
    where = f"layer {la.index}"
    q, k_new, v_new = form.q, form.k, form.v
    outs = [la.site.pv.outputs[0], la.key.writer.outputs[0], la.value.writer.outputs[0]]
    tables = [form.cos, form.sin] if form.cos is not None else []
    computed = [v for v, _ in form.scalars if scalar_value(v) is None]
    outs += tables + computed + ([la.bias] if la.bias is not None else [])
    # fed as the cache's type where the graph does not say (a wrong guess fails the run below)
    guess = {v: v.dtype or la.key.past.dtype for v in (q, k_new, v_new)}
    try:
        probe = ConeProbe(model, kv, io, outs, MAX_CONSTANT_BYTES, cuts=[q, k_new, v_new], cut_dtypes=guess,
                          external_random=True)  # both sides get the same tables: their values do not matter
    except UnsupportedGraphError as exc:
        raise UnsupportedGraphError(f"{where}: cannot run its attention to check the rewrite ({exc})") from None
    known = {io.input_ids, io.position_ids, io.batch_index, q, k_new, v_new, *kv.past_inputs}
    stray = [v.name for v in probe.inputs if v not in known]
    if stray:
        raise UnsupportedGraphError(f"{where}: its attention reads {stray[0]!r}, which GroupQueryAttention has no input for")
    dtype = la.key.past.dtype.numpy()
    ctx = 16 if not la.window else max(16, la.window + 8)  # room for every case's chunk (P + S <= ctx)
    cases = [np.array([[ctx - 11], [-1], [ctx - 3]]), np.array([[ctx - 7, ctx - 6, ctx - 5]]), np.arange(4)[None],
             np.array([[4, 5, 6, -1], [0, 1, 2, 3], [9, -1, -1, -1]])]
    reference = None
    for positions in cases:
        batch, seq = positions.shape

        def rows(heads, seq_first, folded=False):
            shape = (batch, seq, heads * la.head_dim) if form.packed else \
                (batch, seq, heads, la.head_dim) if seq_first else (batch, heads, seq, la.head_dim)
            return rng.standard_normal(shape).astype(dtype).reshape((-1, seq, la.head_dim) if folded else shape)

        sf = form.seq_first
        arrays = {io.input_ids: np.ones((batch, seq), np.int64), io.position_ids: positions.astype(np.int64),
                  q: rows(la.heads, sf[0], la.folded), k_new: rows(la.kv_heads, sf[1]),
                  v_new: rows(la.kv_heads, sf[2]),
                  la.key.past: rng.standard_normal((batch, la.kv_heads, ctx, la.head_dim)).astype(dtype),
                  la.value.past: rng.standard_normal((batch, la.kv_heads, ctx, la.head_dim)).astype(dtype)}
        if io.batch_index is not None:
            arrays[io.batch_index] = np.arange(batch, dtype=np.int64)[:, None]
        for other in kv.past_inputs:  # another layer's cache, read for its shape (the mask's length)
            if other not in arrays:
                dims = list(other.shape.dims) if other.shape is not None and len(other.shape) == 4 else []
                if len(dims) != 4 or not all(isinstance(d, int) for d in (dims[1], dims[3])):
                    raise UnsupportedGraphError(f"{where}: its attention reads {other.name!r} of unknown heads")
                arrays[other] = np.zeros((batch, dims[1], ctx, dims[3]), dtype)
        try:
            got = probe.run_arrays(arrays)
        except Exception as exc:  # noqa: BLE001 - ORT raises several types; one line either way
            raise UnsupportedGraphError(f"{where}: its attention does not run on the check's inputs: "
                                        f"{' '.join(str(exc).split())[:200]}") from None
        values = iter(got[3 + len(tables):])
        scale = 1.0
        for v, divides in form.scalars:
            s = scalar_value(v)
            s = float(np.asarray(next(values)).reshape(-1)[0]) if s is None else s
            scale = scale / s if divides else scale * s
        la.scale, la.form = scale, form  # the attributes the kernel gets
        reference = reference or _gqa_session(la, dtype)
        total = max(positions.max() + 1, seq)
        try:
            extra = _rotary_caches(got[3], got[4], batch, seq, form, total) if tables else {}
            if la.bias is not None:
                extra["attention_bias"] = _attention_bias(got[-1], la.heads, seq, total)
        except ValueError as exc:  # tables (or a bias) of another shape than the kernel's
            la.form = None
            raise UnsupportedGraphError(f"{where}: the rotary tables or the bias do not fit the kernel's: "
                                        f"{exc}") from None
        try:
            want = _run_gqa(reference, arrays, la, form, positions, extra)
        except Exception as exc:  # noqa: BLE001 - the kernel refused this reading of the layer
            la.form = None
            raise UnsupportedGraphError(f"{where}: GroupQueryAttention does not run on the check's inputs: "
                                        f"{' '.join(str(exc).split())[:200]}") from None
        if la.folded:
            got = [got[0].reshape(batch, la.heads, seq, la.head_dim), *got[1:]]
        valid = positions >= 0
        seen = [valid[:, None, :, None], np.arange(ctx)[None, None, :, None] < ctx - 1]  # pads: module docstring
        for name, a, b, where_ in zip(("output", "key cache", "value cache"), got[:3], want, [seen[0], *seen[1:] * 2]):
            with np.errstate(invalid="ignore"):  # pad rows may hold inf/nan on both sides; they are not compared
                diff = float(np.max(np.abs(a.astype(np.float32) - b.astype(np.float32)), initial=0.0, where=where_))
            if not diff <= TOLERANCE:
                la.form = None
                rotary = "with the rotary, " if tables else ""
                raise UnsupportedGraphError(
                    f"{where}: GroupQueryAttention ({rotary}scale {la.scale:.6g}, window {la.window}) differs from "
                    f"the attention of {describe_node(la.site.scores)} in the {name} by {diff:.3g} "
                    f"(positions {positions.tolist()})")


def _rotary_caches(cos: np.ndarray, sin: np.ndarray, batch: int, seq: int, form: _Form, total: int) -> dict:
    """What :func:`_lower` computes from the graph's tables: ``[B·S, K/2]`` caches (each token's
    row of ``R = rotary_dim`` angles: its first half for a rotate-half rotary, its even entries for
    an interleaved one, widened to the kernel's ``K = kernel_dim`` with cos 1 / sin 0; rows below,
    up to ``total`` rows, the kernel's minimum, that no position id reads) and the kernel's
    position ids ``0 .. B·S-1`` that index them, row by row."""
    width, extra = form.rotary_dim, (form.kernel_dim - form.rotary_dim) // 2

    def cache(table, fill):
        rows = np.broadcast_to(table.reshape(table.shape[0], -1, width), (batch, seq, width)).reshape(-1, width)
        half = rows[:, 0::2] if form.interleaved else rows[:, :width // 2]
        return np.pad(half, ((0, max(0, total - len(half))), (0, extra)), constant_values=fill)

    return {"cos_cache": cache(cos, 1), "sin_cache": cache(sin, 0),
            "rotary_position_ids": np.arange(batch * seq, dtype=np.int64).reshape(batch, seq)}


def _attention_bias(bias: np.ndarray, heads: int, seq: int, total: int) -> np.ndarray:
    """What :func:`_lower` computes from the graph's bias on the scores (``[B·N or N, 1 or S, ctx]``
    or ``[B or 1, N or 1, 1 or S, ctx]``): the kernel's ``attention_bias`` ``[B or 1, N or 1, S,
    total]`` (keys by absolute position, as the cache slots are)."""
    b = bias if bias.ndim == 4 else bias.reshape(-1, heads, *bias.shape[-2:])
    return np.ascontiguousarray(np.broadcast_to(b[..., :total], (*b.shape[:2], seq, total)))


def _gqa_session(la: _Layer, dtype):
    """An ORT session over the one GroupQueryAttention node :func:`_lower` inserts for ``la``."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    t = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    rotary = la.form.cos is not None
    tables = ["cos_cache", "sin_cache", "rotary_position_ids"] if rotary else ["", "", ""]
    bias = "attention_bias" if la.bias is not None else ""
    node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "seqlens_k", "total", *tables,
                                                    bias, *[""] * 5, "query_seqlens"],
                            ["out", "present_k", "present_v"], domain=_MS, **la.attributes)
    inputs = [helper.make_tensor_value_info(n, t, None) for n in ("q", "k", "v", "pk", "pv")]
    inputs += [helper.make_tensor_value_info(n, onnx.TensorProto.INT32, None)
               for n in ("seqlens_k", "total", "query_seqlens")]
    if rotary:
        inputs += [helper.make_tensor_value_info(n, t, None) for n in ("cos_cache", "sin_cache")]
        inputs.append(helper.make_tensor_value_info("rotary_position_ids", onnx.TensorProto.INT64, None))
    if bias:
        inputs.append(helper.make_tensor_value_info(bias, t, None))
    outputs = [helper.make_tensor_value_info(n, t, None) for n in ("out", "present_k", "present_v")]
    graph = helper.make_graph([node], "qeff_gqa_check", inputs, outputs)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(_MS, 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3  # a reading the kernel refuses is reported by the check, in one line
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _run_gqa(session, arrays, la: _Layer, form: _Form, positions, extra: dict) -> list[np.ndarray]:
    """The kernel on the check's inputs, in and out of the program's layouts; past and present
    share one buffer (as the runtime binds them)."""
    import onnxruntime as ort

    batch, seq = positions.shape

    def packed(a, seq_first):  # [B, N, S, H] (or [B·N, S, H]), or [B, S, N, H] -> [B, S, N*H]
        if form.packed or seq_first:
            return a.reshape(batch, seq, -1)
        heads_first = a.reshape(batch, -1, seq, a.shape[-1])
        return np.ascontiguousarray(heads_first.transpose(0, 2, 1, 3).reshape(batch, seq, -1))

    caches = [arrays[la.key.past].copy(), arrays[la.value.past].copy()]
    binding = session.io_binding()
    binding.bind_output("out", "cpu")
    sf = form.seq_first
    for name, array in (("q", packed(arrays[form.q], sf[0])), ("k", packed(arrays[form.k], sf[1])),
                        ("v", packed(arrays[form.v], sf[2])),
                        ("seqlens_k", np.maximum(positions, 0).max(axis=1).astype(np.int32)),
                        ("total", np.array(max(positions.max() + 1, seq), np.int32)),
                        ("query_seqlens", (positions >= 0).sum(axis=1).astype(np.int32)), *extra.items()):
        binding.bind_cpu_input(name, np.ascontiguousarray(array))
    for name, present, cache in (("pk", "present_k", caches[0]), ("pv", "present_v", caches[1])):
        value = ort.OrtValue.ortvalue_from_numpy(cache)
        binding.bind_ortvalue_input(name, value)
        binding.bind_ortvalue_output(present, value)
    session.run_with_iobinding(binding)
    out = binding.get_outputs()[0].numpy().reshape(batch, seq, la.heads, la.head_dim).transpose(0, 2, 1, 3)
    return [out, *caches]


def _dims_read(shape: ir.Node, rank: int) -> set[int]:
    """The dims of ``shape``'s input that are used: those a constant ``Gather`` picks when only such
    Gathers read the shape, else all (``Size``: all)."""
    everything = set(range(rank))
    if shape.op_type != "Shape" or shape.attributes.get_int("start", 0) != 0 or "end" in shape.attributes:
        return everything
    picked: set[int] = set()
    for use in shape.outputs[0].uses():
        node = use.node
        index = ir.convenience.get_const_tensor(node.inputs[1]) if node.op_type == "Gather" and use.idx == 0 else None
        if index is None or node.attributes.get_int("axis", 0) != 0:
            return everything
        picked |= {int(i) % rank for i in np.asarray(index.numpy()).reshape(-1)}
    return picked


def _replace_shape_read(b: Builder, node: ir.Node, dims: list) -> None:
    """``node`` (Shape/Size of a removed value) rebuilt from where each dim still is."""
    rank = len(dims)
    size = node.op_type == "Size"
    start = 0 if size else node.attributes.get_int("start", 0)
    end = rank if size else node.attributes.get_int("end", rank)
    start, end = (x + rank if x < 0 else x for x in (start, end))
    pieces = []
    for dim in dims[max(0, start):min(rank, end)]:
        if isinstance(dim, int):
            pieces.append(b.i64(dim))
        else:
            value, axis = dim
            pieces.append(b.op("Shape", value, start=axis, end=axis + 1))
    shape = b.op("Concat", *pieces, axis=0) if pieces else b.const(np.zeros(0, np.int64))
    node.outputs[0].replace_all_uses_with(b.op("ReduceProd", shape, keepdims=0) if size else shape)


def _lower(model: ir.Model, io, layers: list[_Layer]) -> None:
    graph = model.graph
    model.opset_imports.setdefault(_MS, 1)
    b = Builder(graph, _TAG)
    clamped = b.op("Max", io.position_ids, b.i64(0))
    if model.opset_imports.get("", 18) >= 18:
        top = b.op("ReduceMax", clamped, b.i64(1), keepdims=0)  # [B]
    else:
        top = b.op("ReduceMax", clamped, axes=[1], keepdims=0)
    seqlens = b.op("Cast", top, to=ir.DataType.INT32)
    real = b.op("Cast", b.op("GreaterOrEqual", io.position_ids, b.const(np.array(0, np.int64))), to=ir.DataType.INT32)
    query_seqlens = b.op("ReduceSum", real, b.i64(1), keepdims=0)  # [B]: the row's real tokens
    # the kernel's bound on every row's length: the longest row, at least the step's seq_len (a
    # capacity such as ctx_len would do too, but a first chunk then attends over all of it)
    longest = b.op("Add", b.op("ReduceMax", top, keepdims=0), b.const(np.array(1, np.int64)))
    seq = b.op("Squeeze", b.op("Shape", io.position_ids, start=1, end=2), b.i64(0))
    total = b.op("Cast", b.op("Max", longest, seq), to=ir.DataType.INT32)
    to_bsd = b.i64(0, 0, -1)
    caches: dict = {}  # (cos, sin, rotary_dim, interleaved) -> the kernel's rotary inputs, shared by the layers

    def rotary(form: _Form) -> list[ir.Value]:
        width, extra = form.rotary_dim, (form.kernel_dim - form.rotary_dim) // 2
        key = (id(form.cos), id(form.sin), width, form.interleaved, form.kernel_dim)
        if key not in caches:  # the graph's own tables, one row per token: [B*S, R/2]; row ids 0..B*S-1
            shape = b.op("Shape", io.position_ids)
            rows = b.op("Concat", shape, b.i64(width), axis=0)

            count = b.op("ReduceProd", shape, keepdims=0)
            # the kernel wants at least total_sequence_length rows: zeros below the B*S real ones
            below = b.op("Max", b.op("Sub", b.op("Cast", total, to=ir.DataType.INT64), count),
                         b.const(np.array(0, np.int64)))
            # rows below no position id reads; columns past rotary_dim / 2: identity pairs (cos 1, sin 0)
            pads = b.op("Concat", b.i64(0, 0), b.op("Unsqueeze", below, b.i64(0)), b.i64(extra), axis=0)

            def cache(table, fill):  # the first half of each row (rotate-half), or its even entries (pairs)
                full = b.op("Expand", b.op("Reshape", table, b.i64(0, -1, width)), rows)
                end, step = (width, 2) if form.interleaved else (width // 2, 1)
                half = b.op("Slice", b.op("Reshape", full, b.i64(-1, width)), b.i64(0), b.i64(end), b.i64(1),
                            b.i64(step))
                value = b.op("CastLike", b.const(np.array(fill, np.float32)), half)
                return b.op("Pad", half, pads, value)

            ids = b.op("Reshape", b.op("Range", b.const(np.array(0, np.int64)), count, b.const(np.array(1, np.int64))),
                       shape)
            caches[key] = [cache(form.cos, 1), cache(form.sin, 0), ids]
        return caches[key]

    biases: dict = {}  # the graph's bias value -> the kernel's attention_bias, shared by the layers

    def attention_bias(la: _Layer) -> ir.Value | None:
        """``[B or 1, N or 1, S, total]`` from the bias the graph adds (:func:`_attention_bias`)."""
        if la.bias is None:
            return None
        if id(la.bias) not in biases:
            x = la.bias
            if la.bias_rank == 3:  # heads folded into the first dim: [B·N or N, 1 or S, ctx]
                x = b.op("Reshape", x, b.op("Concat", b.i64(-1, la.heads), b.op("Shape", x, start=-2), axis=0))
            length = b.op("Reshape", b.op("Cast", total, to=ir.DataType.INT64), b.i64(1))
            x = b.op("Slice", x, b.i64(0), length, b.i64(3))
            steps = b.op("Shape", io.position_ids, start=1, end=2)  # [S]
            biases[id(la.bias)] = b.op("Expand", x, b.op("Concat", b.i64(1, 1), steps, length, axis=0))
        return biases[id(la.bias)]

    for la in layers:
        site, form = la.site, la.form
        if form.packed:
            packed = [form.q, form.k, form.v]
        else:
            heads_first = [form.q, form.k, form.v]
            if la.folded:  # [B·N, S, H] -> [B, N, S, H]
                heads_first[0] = b.op("Reshape", form.q, b.op("Concat", b.i64(-1, la.heads),
                                                              b.op("Shape", form.q, start=1), axis=0))
            packed = [b.op("Reshape", x if seq_first else b.op("Transpose", x, perm=[0, 2, 1, 3]), to_bsd)
                      for x, seq_first in zip(heads_first, form.seq_first)]
        tables = rotary(form) if form.cos is not None else [None] * 3
        out, present_k, present_v = b.op_multi(
            "GroupQueryAttention", *packed, la.key.past, la.value.past, seqlens, total, *tables, attention_bias(la),
            *[None] * 5, query_seqlens, num_outputs=3, domain=_MS, **la.attributes)
        to_bnsh = b.i64(0, 0, la.heads, la.head_dim)
        result = b.op("Transpose", b.op("Reshape", out, to_bnsh), perm=[0, 2, 1, 3])
        if la.folded:  # back to [B·N, S, H]
            result = b.op("Reshape", result, b.op("Concat", b.i64(-1), b.op("Shape", result, start=2), axis=0))
        site.pv.outputs[0].replace_all_uses_with(result)
        for node, dims in la.shape_reads:
            _replace_shape_read(b, node, dims)
        for entry, present in ((la.key, present_k), (la.value, present_v)):
            old = entry.writer.outputs[0]  # the ScatterND result is the _RetainedState output
            name = old.name
            graph.outputs[list(graph.outputs).index(old)] = present
            old.name = f"{name}_qeff_replaced"
            present.name = name
            present.dtype, present.shape = old.dtype, old.shape
    b.commit()
    ir.passes.common.RemoveUnusedNodesPass()(model)  # the decomposed attention and the ScatterNDs
    graph.sort()
