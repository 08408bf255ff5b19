"""Read every attention layer's window off the exporter's own mask, by running it.

The position-derived mask (:mod:`qeff_graph.passes.position_mask`) replaces the exporter's mask,
so the window a layer slides over must be known before the rewrite. ``config.json`` names it
when it is there; the graph always *computes* it. :func:`probe_mask_windows` cuts out of the
graph the nodes that compute each attention site's mask (the mask leaves of its additive terms,
the conditions of its masking ``Where``s and of the ``Where(c, bias, fill)`` around a masked
bias, an ONNX ``Attention``'s ``attn_mask``), runs that cone in ONNX Runtime for one row with no
padding and reads the result as ``visible[query, key]``:

* a mask leaf added to the scores is visible where it is 0 and masked where it is a fill
  (<= :data:`~qeff_graph.ir.attention.MASK_FILL_MAX` or -inf); any other value is refused;
  a boolean (or integer) leaf is visible where it is true (nonzero);
* ``Where(c, scores, fill)`` is visible where ``c`` is true, ``Where(c, fill, scores)`` where it
  is false; the parts of a site are combined by AND;
* an ``Attention`` op adds its own ``is_causal`` (bottom-right aligned when it takes the past
  cache, else top-left) and ``left_window_size``/``right_window_size`` (opset 25).

The inputs are fed as an export sees them: ``input_ids`` of ``S`` = :data:`PROBE_QUERIES`
tokens, ``attention_mask`` all ones over ``L`` keys, ``position_ids`` ``L-S .. L-1`` and zero
caches ``[1, kv_heads, L-S, head_dim]`` (a graph that reads its past length as ``cache - seq``,
as after the ``past-shape`` pass, is fed caches of ``L``); the queries are the last ``S`` of the
``L`` keys. ``L`` is the first of :data:`PROBE_LENGTHS` at which the cone runs and gives masks
over ``L`` keys (a bounded position table runs at a shorter length). Each site is then

* **causal** (``None``): query ``p`` sees exactly the keys ``0 .. p``; a window of ``L`` or more
  looks the same, and never masks anything in a context of at most ``L``;
* **a sliding window** ``W``: query ``p`` sees exactly the keys ``p-W+1 .. p`` (transformers'
  convention, the one :mod:`position_mask` rewrites);
* anything else — a key after the query visible (bidirectional), a query that does not see
  itself, holes, windows that differ between queries (chunked attention), masks that differ
  between heads, values that are neither 0 nor a fill — is refused with
  :class:`~qeff_graph.errors.UnsupportedGraphError`, one line naming the layer and the node that
  puts the mask on the scores; so is a cone that cannot run at all (an input the probe cannot
  feed, an op ONNX Runtime does not have, a large weight it would need).

No weight is read: only the cone's small constants (at most :data:`MAX_CONSTANT_BYTES` each) are
copied into the probe. A large initializer the cone reads only as the data of ``Gather(w, ids,
axis=0)`` (exporters take the batch and sequence length, or the dtype, off the token
embeddings) is replaced by zeros of two rows, which gives the same shape and dtype.

:func:`reconcile_windows` merges the probed windows with configured ones (``config.json`` or the
user's): the graph's window wins over no window; full attention in the graph gives way to a
configured window (an exporter may have traced the window away); two different windows are
refused, naming both.
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from collections import deque
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from qeff_graph.errors import UnsupportedGraphError
from qeff_graph.ir.analysis import KVCache, ModelIO, find_io, find_kv_cache
from qeff_graph.ir.attention import (
    MASK_FILL_MAX,
    AttentionSite,
    describe_node,
    find_attention_sites,
    is_fill,
)

__all__ = ["ConeProbe", "MAX_CONSTANT_BYTES", "PROBE_LENGTHS", "PROBE_QUERIES", "probe_mask_windows", "reconcile_windows"]

logger = logging.getLogger(__name__)

# Total key counts the probe tries, longest first: 8192 shows the common windows (4096:
# Mistral, Gemma 2, Cohere 2; 2047: Phi-3; 1024/512: Gemma 3) and runs in milliseconds (the
# cone computes [queries, keys] masks); shorter ones for graphs that cannot run that long.
PROBE_LENGTHS = (8192, 1024, 256, 64)
# Queries per probe: the last S of the L keys.
PROBE_QUERIES = 4
# The largest constant of the mask cone copied into the probe.
MAX_CONSTANT_BYTES = 8 << 20
# The token fed as input_ids (not 0, which is many vocabularies' pad token).
_TOKEN = 1

_BOOLEAN_OPS = {"Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Equal", "Not", "And", "Or", "Xor",
                "IsInf", "IsNaN"}


class _CannotRun(Exception):
    """The probe did not run, or gave masks of the wrong shape, at one length: try another."""


@dataclasses.dataclass
class _Part:
    """One mask value of a site and how to read it: ``additive`` (0 visible, fill masked),
    ``boolean`` (true visible), ``keep`` (a Where condition, true visible) or ``drop`` (true masked)."""

    value: ir.Value
    kind: str


def _is_boolean(value: ir.Value) -> bool:
    """The same test as the attention analysis: a bool, a comparison, a cast to bool, an int input."""
    node = value.producer()
    if value.dtype == ir.DataType.BOOL or node is not None and node.op_type in _BOOLEAN_OPS:
        return True
    if node is not None and node.op_type == "Cast" and node.attributes.get_int("to", 0) == ir.DataType.BOOL:
        return True
    return node is None and value.dtype is not None and value.dtype.is_integer()


def _condition(where: ir.Node) -> _Part:
    """``Where(c, x, fill)`` keeps x where c is true; ``Where(c, fill, x)`` where it is false."""
    return _Part(where.inputs[0], "keep" if is_fill(where.inputs[2]) else "drop")


def _parts(site: AttentionSite) -> list[_Part]:
    parts: list[_Part] = []
    for term in site.terms:
        for leaf in term.leaves:
            if leaf.role == "mask":
                parts.append(_Part(leaf.value, "boolean" if _is_boolean(leaf.value) else "additive"))
        parts.extend(_condition(where) for where, _use in term.masked)
    parts.extend(_condition(where) for where in site.mask_wheres)
    return parts


def _first_node(site: AttentionSite) -> ir.Node:
    """The node that puts the mask on the scores (for messages)."""
    for node in site.chain:
        if node in site.mask_wheres:
            return node
        for term in site.terms:
            if term.node is node:
                leaf = next((x for x in term.leaves if x.role == "mask"), None)
                if leaf is not None:
                    return leaf.value.producer() or node
    for term in site.terms:
        for leaf in term.leaves:
            if leaf.role == "mask" and leaf.value.producer() is not None:
                return leaf.value.producer()
    return site.scores


def _nbytes(tensor: ir.TensorProtocol) -> int:
    dims = tuple(tensor.shape.numpy()) if tensor.shape is not None else ()
    return int(np.prod(dims, dtype=np.int64)) * max(1, int(np.ceil(tensor.dtype.itemsize)))


def _inner_reads(node: ir.Node):
    """Values a node reads: its inputs, and outer-scope values its subgraphs read."""
    yield from (v for v in node.inputs if v is not None)
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            graphs = [attr.value]
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs = list(attr.value)
        else:
            continue
        for graph in graphs:
            inner: set[ir.Value] = set(graph.inputs) | set(graph.initializers.values())
            nodes = list(ir.traversal.RecursiveGraphIterator(graph))
            for n in nodes:
                inner.update(n.outputs)
            for n in nodes:
                yield from (v for v in n.inputs if v is not None and v not in inner)


class ConeProbe:
    """The cone of ``values`` (every node they are computed from, back to graph inputs, constants
    and the ``cuts``) as a small ONNX model, and an ORT session over it. Used for the mask of
    every site (:func:`probe_mask_windows`) and by lowering passes that check a rewrite against
    the graph it came from (``cuts`` are fed like inputs, :meth:`run_arrays`)."""

    def __init__(self, model: ir.Model, kv: KVCache, io: ModelIO, values: list[ir.Value], max_bytes: int,
                 retained_view: bool = False, cuts: Sequence[ir.Value] = (),
                 cut_dtypes: Mapping[ir.Value, ir.DataType] | None = None, external_random: bool = False):
        import onnx

        self.kv = kv
        self.io = io
        graph_inputs = set(model.graph.inputs)
        # retained view: the cache is ctx_len long and a step writes into it, so what the exporter
        # concatenated (past + new) reads as the past itself; with past-shape's virtual shapes
        # (past = ctx_len - seq) that is the only consistent way to feed the mask
        alias = {e.writer.outputs[0]: e.past for layer in kv.layers for e in (layer.key, layer.value)
                 if e.writer.op_type == "Concat"} if retained_view else {}
        nodes: dict[ir.Node, None] = {}
        leaves: dict[ir.Value, None] = {}  # graph inputs and constants the cone reads
        seen: set[ir.Value] = set()
        cut = set(cuts)
        queue = deque(values)
        while queue:
            v = queue.popleft()
            v = alias.get(v, v)
            if v in seen:
                continue
            seen.add(v)
            node = v.producer()
            if node is None or v in cut:
                leaves[v] = None
                continue
            if node not in nodes:
                nodes[node] = None
                queue.extend(_inner_reads(node))
        self.order = _topological(list(nodes))
        names: dict[ir.Value, str] = {}
        used = {v.name for v in seen if v.name}

        def name(v: ir.Value) -> str:
            v = alias.get(v, v)
            if v not in names:
                fresh = v.name
                if not fresh:
                    fresh = f"qeff_probe_v{len(names)}"
                    while fresh in used:
                        fresh += "_"
                    used.add(fresh)
                names[v] = fresh
            return names[v]

        self.inputs: list[ir.Value] = []
        initializers = []
        for v in leaves:
            if v in graph_inputs or v in cut:
                self.inputs.append(v)
                continue
            tensor = v.const_value
            if tensor is None:
                raise UnsupportedGraphError(
                    f"the attention mask reads {v.name!r}, which is neither a graph input nor a constant; "
                    "cannot run the mask to read its sliding windows")
            initializers.append(self._constant(v, tensor, nodes, name(v), max_bytes, external_random))
        for node in self.order:  # a Constant node holding a weight
            attr = node.attributes.get("value") if node.op_type == "Constant" else None
            if attr is not None and attr.type == ir.AttributeType.TENSOR and _nbytes(attr.value) > max_bytes:
                raise UnsupportedGraphError(
                    f"the attention mask reads the constant of {describe_node(node)} ({_nbytes(attr.value) >> 20} MiB); "
                    "the mask probe copies no weights, so it cannot read the sliding windows off this graph")
        protos = []
        for node in self.order:
            proto = ir.serde.serialize_node(node)
            del proto.input[:]
            proto.input.extend(name(v) if v is not None else "" for v in node.inputs)
            del proto.output[:]
            proto.output.extend(name(v) for v in node.outputs)
            protos.append(proto)
        self.outputs = []
        for k, v in enumerate(values):
            out = f"qeff_probe_out{k}"
            protos.append(onnx.helper.make_node("Cast", [name(v)], [out], to=onnx.TensorProto.FLOAT))
            self.outputs.append(out)
        self.input_names = [name(v) for v in self.inputs]
        types = {v: (cut_dtypes or {}).get(v, v.dtype) for v in self.inputs}  # the graph is not annotated
        inputs = [onnx.helper.make_tensor_value_info(
            name(v), int(types[v]) if types[v] is not None else onnx.TensorProto.INT64,
            [None] * len(v.shape) if v.shape is not None else None) for v in self.inputs]
        outputs = [onnx.helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in self.outputs]
        g = onnx.helper.make_graph(protos, "qeff_mask_probe", inputs, outputs, initializers)
        proto = onnx.helper.make_model(
            g, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()])
        proto.ir_version = model.ir_version or 8
        proto.functions.extend(ir.serde.serialize_function(f) for f in model.functions.values())
        self.proto = proto
        self.session = self._session(proto)

    def _constant(self, v: ir.Value, tensor, nodes, name: str, max_bytes: int, external_random: bool = False):
        from qeff_graph.ir.io import read_tensor

        size = _nbytes(tensor)
        dtype = tensor.dtype
        if external_random and isinstance(tensor, ir.ExternalTensor) and dtype.is_floating_point():
            # a check that compares two computations fed the same values reads no weight file:
            # random values of the constant's shape (e.g. a rotary's inv_freq) serve it as well
            rng = np.random.default_rng(zlib.crc32(name.encode()))
            array = rng.standard_normal(tuple(tensor.shape.numpy())).astype(dtype.numpy())
            return ir.serde.serialize_tensor(ir.Tensor(array, dtype=dtype, name=name))
        if size > max_bytes:
            uses = [(u.node, u.idx) for u in v.uses() if u.node in nodes]
            rows = tensor.shape.numpy()
            gathered = uses and len(rows) >= 1 and all(
                n.op_type == "Gather" and n.domain in ("", "ai.onnx") and i == 0 and n.attributes.get_int("axis", 0) == 0
                for n, i in uses)
            if not gathered:
                by = f", by {describe_node(uses[0][0])}" if uses else ""
                raise UnsupportedGraphError(
                    f"the attention mask reads the weight {v.name!r} ({size >> 20} MiB{by}); "
                    "the mask probe copies no weights, so it cannot read the sliding windows off this graph")
            # only the shape (and dtype) of the gathered rows can matter to a mask: zeros of two rows
            array = np.zeros((min(int(rows[0]), _TOKEN + 1), *map(int, rows[1:])), dtype=dtype.numpy())
        else:
            array = read_tensor(tensor)
        return ir.serde.serialize_tensor(ir.Tensor(np.asarray(array), dtype=dtype, name=name))

    @staticmethod
    def _session(proto):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 4  # a length the graph cannot run is expected: no error log
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        try:
            return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - ORT raises several types, all one message here
            raise UnsupportedGraphError(
                f"cannot run the attention mask of this graph to read its sliding windows: {_one_line(exc)}") from None

    def feeds(self, length: int, queries: int, cache: int) -> dict[str, np.ndarray]:
        io, pasts = self.io, set(self.kv.past_inputs)
        feeds = {}
        for v, input_name in zip(self.inputs, self.input_names):
            dtype = v.dtype.numpy() if v.dtype is not None else np.int64
            if v is io.input_ids:
                array = np.full((1, queries), _TOKEN, dtype=dtype)
            elif v is io.position_ids:
                array = np.arange(length - queries, length, dtype=np.int64)[None].astype(dtype)
            elif v is io.attention_mask:
                array = np.ones((1, length), dtype=dtype)
            elif v is io.batch_index:
                array = np.zeros((1, 1), dtype=dtype)
            elif v in pasts:
                dims = list(v.shape.dims) if v.shape is not None and len(v.shape) == 4 else [None] * 4
                heads = dims[1] if isinstance(dims[1], int) else self.kv.kv_heads or 1
                head_dim = dims[3] if isinstance(dims[3], int) else self.kv.head_dim or 1
                array = np.zeros((1, heads, cache, head_dim), dtype=dtype)
            else:
                raise UnsupportedGraphError(
                    f"the attention mask reads the graph input {v.name!r}, which the mask probe cannot feed "
                    "(it feeds input_ids, position_ids, attention_mask and the cache); cannot read the "
                    "sliding windows off this graph")
            feeds[input_name] = array
        return feeds

    def run_arrays(self, arrays: Mapping[ir.Value, np.ndarray]) -> list[np.ndarray]:
        """Run the cone on ``arrays`` (one per input or cut it reads); its values as float32."""
        missing = [v.name for v in self.inputs if v not in arrays]
        if missing:
            raise UnsupportedGraphError(f"the probe reads {missing[0]!r}, which it was not given")
        feeds = {n: arrays[v] for v, n in zip(self.inputs, self.input_names)}
        return self.session.run(self.outputs, feeds)

    def run(self, length: int, queries: int, cache: int) -> list[np.ndarray]:
        try:
            return self.session.run(self.outputs, self.feeds(length, queries, cache))
        except UnsupportedGraphError:
            raise
        except Exception as exc:  # noqa: BLE001 - an ORT failure at this length: try the next one
            raise _CannotRun(_one_line(exc)) from None


def _one_line(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return (text[:240] + "...") if len(text) > 240 else text or type(exc).__name__


def _topological(nodes: list[ir.Node]) -> list[ir.Node]:
    inside = set(nodes)
    producers = {v: n for n in nodes for v in n.outputs}
    deps = {n: {producers[v] for v in _inner_reads(n) if v in producers and producers[v] is not n} for n in nodes}
    done: set[ir.Node] = set()
    order: list[ir.Node] = []
    for start in nodes:
        stack = [(start, False)]
        while stack:
            node, expanded = stack.pop()
            if node in done:
                continue
            if expanded:
                done.add(node)
                order.append(node)
                continue
            stack.append((node, True))
            stack.extend((d, False) for d in deps[node] if d not in done and d in inside)
    return order


def _matrix(array: np.ndarray, queries: int, length: int, what: str) -> np.ndarray:
    """``array`` broadcast against ``[batch, heads, queries, keys]`` as a ``[queries, keys]``
    matrix (raises _CannotRun when its shape does not fit the probe, refuses per-head masks)."""
    if array.ndim > 4:
        raise _CannotRun(f"{what} has rank {array.ndim}")
    array = array.reshape((1,) * (4 - array.ndim) + array.shape)
    if array.shape[0] != 1 or array.shape[2] not in (1, queries) or array.shape[3] not in (1, length):
        raise _CannotRun(f"{what} has shape {list(array.shape)}, not [1, heads, {queries}, {length}]")
    if array.shape[1] > 1 and not np.array_equal(array, np.broadcast_to(array[:, :1], array.shape), equal_nan=True):
        raise UnsupportedGraphError(f"{what} differs between heads; a per-head mask is not a window the "
                                    "position mask can rewrite")
    return np.broadcast_to(array[0, 0], (queries, length))


def _visible(array: np.ndarray, kind: str, queries: int, length: int, what: str) -> np.ndarray:
    m = _matrix(array, queries, length, what)
    if kind == "additive":
        masked = (m <= MASK_FILL_MAX) | np.isneginf(m)
        odd = ~masked & (m != 0)
        if odd.any():
            q, k = np.argwhere(odd)[0]
            raise UnsupportedGraphError(
                f"{what} adds {m[q, k]:g} to a score (query {q}, key {k}), neither 0 nor a mask fill "
                f"(<= {MASK_FILL_MAX:g}); not a mask the probe understands")
        return ~masked
    visible = m != 0
    return visible if kind in ("boolean", "keep") else ~visible


def _attention_op(node: ir.Node, queries: int, length: int) -> np.ndarray:
    """What an ONNX Attention op masks by itself (is_causal, left/right windows), as visible[q, k]."""
    if len(node.inputs) > 6 and node.inputs[6] is not None:
        raise UnsupportedGraphError(f"{describe_node(node)} takes nonpad_kv_seqlen; the mask probe does not model it")
    has_past = len(node.inputs) > 4 and node.inputs[4] is not None
    offset = length - queries if has_past else 0  # ONNX: bottom-right with a past cache, else top-left
    q = np.arange(queries)[:, None] + offset
    k = np.arange(length)[None, :]
    visible = np.ones((queries, length), dtype=bool)
    if node.attributes.get_int("is_causal", 0):
        visible &= k <= q
    left = node.attributes.get_int("left_window_size", -1)
    right = node.attributes.get_int("right_window_size", -1)
    if left >= 0:
        visible &= k >= q - left
    if right >= 0:
        visible &= k <= q + right
    return visible


def _classify(visible: np.ndarray, layer: int, node: ir.Node) -> int | None:
    """None for causal attention over all ``L`` keys, ``W`` for a sliding window; refuses the rest."""
    queries, length = visible.shape
    where = f"the attention mask of layer {layer} ({describe_node(node)})"
    window = None
    unbounded: list[int] = []  # positions of the queries that see key 0
    for i in range(queries):
        p = length - queries + i
        seen = np.flatnonzero(visible[i])
        if seen.size == 0:
            raise UnsupportedGraphError(f"{where} hides every key from the query at position {p}; not a causal mask")
        if seen[-1] > p:
            raise UnsupportedGraphError(
                f"{where} lets the query at position {p} see the later key at position {seen[-1]} "
                "(bidirectional or future keys visible); not a causal mask, refusing rather than guessing")
        if seen[-1] != p:
            raise UnsupportedGraphError(f"{where} hides its own position from the query at position {p}; "
                                        "not a causal mask")
        first = int(seen[0])
        if seen.size != p - first + 1:
            raise UnsupportedGraphError(
                f"{where} lets the query at position {p} see keys {first}..{p} with gaps; not a causal "
                "mask or a sliding window")
        if first == 0:
            unbounded.append(p)
            continue
        width = p - first + 1
        if window is None:
            window = width
        elif width != window:
            raise UnsupportedGraphError(
                f"{where} shows windows of {window} and {width} keys for different queries (chunked "
                "attention?); not a sliding window the position mask can rewrite")
    if window is not None and any(p + 1 > window for p in unbounded):
        raise UnsupportedGraphError(
            f"{where} shows a window of {window} keys for some queries and all keys for others; not a "
            "sliding window")
    return window


def probe_mask_windows(model: ir.Model, sites: Sequence[AttentionSite] | None = None, kv: KVCache | None = None,
                       io: ModelIO | None = None, *, lengths: Sequence[int] = PROBE_LENGTHS,
                       queries: int = PROBE_QUERIES,
                       max_constant_bytes: int = MAX_CONSTANT_BYTES) -> dict[int, int | None]:
    """The attention window of every layer with an attention site, read by running its mask.

    Returns ``{layer: None}`` for causal attention over every key (within the probed length
    ``L``: a window of ``L`` or more looks the same) and ``{layer: W}`` for a sliding window of
    ``W`` keys (the query at position ``p`` sees ``p-W+1 .. p``). Raises
    :class:`~qeff_graph.errors.UnsupportedGraphError` (one line naming the layer and the node)
    for a mask that is neither, sites of one layer that disagree, or a mask that cannot be run.
    ``sites``/``kv``/``io``: what the caller already found (found here otherwise). The graph is
    not changed.
    """
    kv = kv or find_kv_cache(model)
    io = io or find_io(model, kv)
    sites = list(sites) if sites is not None else find_attention_sites(model, kv)
    if not sites:
        return {}
    site_parts = [_parts(site) for site in sites]
    values = list(dict.fromkeys(p.value for parts in site_parts for p in parts))
    index = {v: k for k, v in enumerate(values)}
    probes: dict[bool, ConeProbe] = {}

    def probe(retained: bool) -> ConeProbe:
        if retained not in probes:
            probes[retained] = ConeProbe(model, kv, io, values, max_constant_bytes, retained_view=retained)
        return probes[retained]

    errors: list[str] = []
    for length in lengths:
        if length <= queries:
            continue
        # an export reads past = cache; a graph after past-shape reads past = cache - seq, with
        # the concatenated cache read as the retained one
        for cache, retained in ((length - queries, False), (length, True)):
            try:
                arrays = probe(retained).run(length, queries, cache) if values else []
                visible = [_site_visible(site, parts, arrays, index, queries, length)
                           for site, parts in zip(sites, site_parts)]
            except _CannotRun as exc:
                errors.append(f"L={length}, cache {cache}: {exc}")
                continue
            windows: dict[int, int | None] = {}
            for site, vis in zip(sites, visible):
                w = _classify(vis, site.layer, _first_node(site))
                if site.layer in windows and windows[site.layer] != w:
                    raise UnsupportedGraphError(
                        f"the attention sites of layer {site.layer} have different masks (windows "
                        f"{windows[site.layer]} and {w}); not supported")
                windows[site.layer] = w
            logger.info("mask probe over %d keys: windows %s", length, windows)
            return windows
    raise UnsupportedGraphError(
        "cannot run the attention mask of this graph to read its sliding windows "
        f"({errors[0] if errors else 'no probe length fits'}); refusing rather than guessing")


def _site_visible(site: AttentionSite, parts: list[_Part], arrays: list[np.ndarray], index: dict,
                  queries: int, length: int) -> np.ndarray:
    visible = np.ones((queries, length), dtype=bool)
    for part in parts:
        what = f"the attention mask of layer {site.layer} ({part.value.name!r})"
        visible = visible & _visible(arrays[index[part.value]], part.kind, queries, length, what)
    if site.kind == "attention-op":
        visible = visible & _attention_op(site.scores, queries, length)
    return visible


def reconcile_windows(probed: Mapping[int, int | None], configured: Mapping[int, int | None] | None,
                      ctx_len: int | None = None) -> dict[int, int | None]:
    """One window per layer from the graph's (``probed``) and the configured ones.

    ``configured``: ``{layer: W or None}`` from ``config.json`` or the user (None, or a layer
    missing: nothing configured). A window of ``ctx_len`` or more masks nothing and counts as
    none. Per layer: the same window (or none) on both sides is kept; a window on one side only
    is taken — the graph's when nothing is configured, the configured one when the graph attends
    to every key (an exporter may have traced the window away); two different windows raise
    :class:`~qeff_graph.errors.UnsupportedGraphError` naming both.
    """
    configured = dict(configured or {})

    def norm(w: int | None) -> int | None:
        return None if w is None or ctx_len is not None and w >= ctx_len else w

    out: dict[int, int | None] = {}
    for layer in sorted(set(probed) | set(configured)):
        graph_w, conf_w = norm(probed.get(layer)), norm(configured.get(layer))
        if graph_w is not None and conf_w is not None and graph_w != conf_w:
            raise UnsupportedGraphError(
                f"layer {layer}: the graph's attention mask has a sliding window of {graph_w} keys but the "
                f"configuration says {conf_w}; pass sliding_window={graph_w} for this layer (or fix "
                "config.json) if the graph is right")
        out[layer] = graph_w if graph_w is not None else conf_w
    return out
