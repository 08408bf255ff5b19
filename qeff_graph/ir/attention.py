"""Find every attention of a causal-LM graph by structure, and say why when one is not understood.

An *attention site* is found from the cache, never from a ``Softmax``: the key cache of layer
``L`` (its past input, the Concat/ScatterND that writes it, and reads of it through layout ops
— ``Transpose``/``Reshape``/``Expand``/``Unsqueeze``/``Squeeze``/``Cast``/``Identity``/``Tile``,
a ``Gather`` of cache rows, a scalar ``Mul``/``Div``) reaches either

* **decomposed attention**: the second operand of a scores ``MatMul(Q, Kᵀ)``; from there the
  scores flow through scalar scaling (``Mul``/``Div`` by a constant), additive terms (``Add``),
  masking ``Where(cond, scores, fill)``, soft-capping ``Tanh`` and ``Cast`` into a ``Softmax``
  over the last axis, whose probabilities reach a ``MatMul(P, V)`` with ``V`` read from the same
  layer's value cache; or
* **a fused op**: ONNX ``Attention`` (opset 23/24) reading the cache as its key input or
  past input. ``com.microsoft`` ``Attention``/``MultiHeadAttention``/``GroupQueryAttention`` are
  recognised and refused (they keep their own cache; export without ORT fusions).

Each additive term on the scores (and an ``Attention`` op's ``attn_mask``) is split into
*leaves* (through ``Add`` and layout ops) and each leaf is classified:

* ``mask``: selects between 0 and a fill ≤ -1e4 (``Where(c, 0, fill)``, ``(1 - m) · fill``,
  ``Where(c, 0, fill)`` behind ``Max``/layout ops) — replaced by the position-derived mask;
* ``masked``: ``Where(c, x, fill)`` with a non-constant ``x`` — the mask is dropped, ``x``
  (e.g. an ALiBi bias the model masked) is classified in turn;
* ``bias``: anything else that is a float term (ALiBi ``slopes × key_position``, a relative or
  learned bias) — kept as it is; it reads positions from ``attention_mask`` (an all-ones
  ``[batch, ctx_len]`` once the mask is derived from ``position_ids``, i.e. key slot ``j`` has
  position ``j``) or from the virtual cache length, so it covers the ctx_len key slots.

A ``Softmax`` that is not reached from a key cache (a mixture-of-experts router, a classifier)
is not a site and is never touched. Anything on a scores path that is not listed above makes
:func:`find_attention_sites` raise :class:`~qeff_graph.errors.UnsupportedGraphError` with one
line naming the node and what was unexpected. No weight bytes are read (only scalar constants).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import deque

import numpy as np
import onnx_ir as ir

from qeff_graph.errors import UnsupportedGraphError
from qeff_graph.ir.analysis import KVCache, find_kv_cache, is_weight
from qeff_graph.ir.build import is_qeff_node

__all__ = ["AttentionSite", "Leaf", "ShapeReader", "Term", "describe_node", "find_attention_sites", "scalar_value", "is_fill", "MASK_FILL_MAX",
           "infer_symbolic", "infer_symbolic_shapes"]

# A fill value at or below this is a mask (exp(-1e4) == 0 in fp32); torch uses finfo.min or -inf.
MASK_FILL_MAX = -1e4

# Ops that move or copy cache data without mixing key positions with anything else.
_LAYOUT = {"Transpose", "Reshape", "Expand", "Unsqueeze", "Squeeze", "Cast", "Identity", "Tile",
           "CastLike"}
# Ops a term may pass through between its leaves and the scores (broadcasting, slicing).
_TERM_LAYOUT = {"Expand", "Slice", "Reshape", "Unsqueeze", "Squeeze", "Cast", "Identity", "Transpose",
                "CastLike"}
_FUSED_MS = {"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedMultiHeadAttention",
             "DecoderMaskedMultiHeadAttention"}
_SHAPE_READS = {"Shape", "Size"}
# Ops whose output is boolean whatever the graph's type annotations say
_BOOLEAN_OPS = {"Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Equal", "Not", "And", "Or", "Xor",
                "IsInf", "IsNaN"}
_COMPARE = {"Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Equal", "Not", "And", "Or", "Xor",
            "Trilu", "IsInf", "IsNaN"}


@dataclasses.dataclass
class Leaf:
    value: ir.Value
    role: str  # "mask" | "bias"
    why: str
    use: tuple[ir.Node, int]  # the term node input through which the leaf is added


@dataclasses.dataclass
class Term:
    """An additive term on the scores: ``node.inputs[index]`` (or an ``Attention``'s attn_mask)."""

    node: ir.Node
    index: int
    leaves: list[Leaf]
    masked: list[tuple[ir.Node, tuple[ir.Node, int]]]  # Where(c, x, fill) whose mask is dropped, its use

    @property
    def mask_only(self) -> bool:
        return all(leaf.role == "mask" for leaf in self.leaves) and not self.masked

    @property
    def biases(self) -> list[Leaf]:
        return [leaf for leaf in self.leaves if leaf.role == "bias"]


@dataclasses.dataclass
class AttentionSite:
    layer: int
    kind: str  # "decomposed" | "attention-op"
    scores: ir.Node  # MatMul(Q, Kᵀ), or the Attention op
    softmax: ir.Node | None = None
    pv: ir.Node | None = None  # MatMul(P, V)
    chain: list[ir.Node] = dataclasses.field(default_factory=list)  # scores → softmax, in order
    probs: list[ir.Node] = dataclasses.field(default_factory=list)  # softmax → P·V (exclusive), in order
    terms: list[Term] = dataclasses.field(default_factory=list)
    mask_wheres: list[ir.Node] = dataclasses.field(default_factory=list)  # Where(c, chain, fill)
    scale: float | None = 1.0  # None: computed in the graph from shapes
    softcap: bool = False

    def describe(self) -> dict:
        return {
            "layer": self.layer,
            "kind": self.kind,
            "node": self.scores.name,
            "scale": self.scale,
            "softcap": self.softcap,
            "mask_terms": sum(1 for t in self.terms if t.mask_only) + len(self.mask_wheres),
            "bias_terms": sum(len(t.biases) for t in self.terms),
        }


def describe_node(node: ir.Node | None, missing: str = "a graph input") -> str:
    """How refusals name a node: ``node 'name' (OpType)``; ``missing`` when there is none."""
    if node is None:
        return missing
    return f"node {node.name or '<unnamed>'!r} ({node.op_type})"


def scalar_value(value: ir.Value | None) -> float | None:
    """The number held by a scalar (or all-equal small) constant, else None. Reads no weights
    larger than 16 elements."""
    seen = 0
    while value is not None and seen < 6:
        tensor = value.const_value
        node = value.producer()
        if tensor is None and node is not None and node.op_type == "Constant":
            attr = node.attributes.get("value")
            tensor = attr.value if attr is not None else None
            if tensor is None:
                for key in ("value_float", "value_int"):
                    if key in node.attributes:
                        return float(node.attributes[key].value)
        if tensor is None and node is not None and node.op_type == "ConstantOfShape":
            attr = node.attributes.get("value")
            if attr is None:
                return 0.0
            tensor = attr.value
        if tensor is not None:
            shape = tuple(tensor.shape.dims) if tensor.shape is not None else ()
            if int(np.prod(shape, dtype=np.int64)) > 16:
                return None
            array = np.asarray(tensor.numpy(), dtype=np.float64).reshape(-1)
            if array.size == 0 or not np.all(array == array[0]):
                return None
            return float(array[0])
        if node is None or node.op_type not in ("Cast", "Identity", "Expand", "Reshape", "Unsqueeze",
                                                "Squeeze", "CastLike"):
            return None
        value = node.inputs[0]
        seen += 1
    return None


def is_shape_scalar(value: ir.Value | None, limit: int = 64) -> bool:
    """True for a scalar constant, or a number computed only from tensor *shapes* and small
    constants (e.g. ``1 / sqrt(sqrt(head_dim))`` from ``Shape(q)``): a scale, not data."""
    if scalar_value(value) is not None:
        return True
    queue = deque([value])
    seen: set[int] = set()
    while queue:
        v = queue.popleft()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        if len(seen) > limit:
            return False
        node = v.producer()
        if node is None:  # every leaf must be a small constant (a graph input or a weight is data)
            if v.const_value is not None and v.const_value.size <= 16:
                continue
            return False
        if node.op_type in _SHAPE_READS or node.op_type == "Constant":
            continue
        queue.extend(node.inputs)
    return True


def is_fill(value: ir.Value | None) -> bool:
    v = scalar_value(value)
    return v is not None and (v <= MASK_FILL_MAX or math.isinf(v) and v < 0)


def _is_zero(value: ir.Value | None) -> bool:
    return scalar_value(value) == 0.0


def _consumers(value: ir.Value) -> list[tuple[ir.Node, int]]:
    """Nodes that read the *data* of ``value`` (not its shape, nor its type as CastLike's target)."""
    return [(u.node, u.idx) for u in value.uses()
            if u.node.op_type not in _SHAPE_READS and not (u.node.op_type == "CastLike" and u.idx == 1)]


class ShapeReader:
    """The dims of a model's values, its symbolic shape inference run once, when first needed."""

    def __init__(self, model: ir.Model):
        self.model = model
        self._inferred: dict[str, list] | None = None
        self._types: dict[str, ir.DataType] = {}

    def dims(self, value: ir.Value) -> list | None:
        """``value``'s dims (ints and symbol names; None where unknown): the graph's own shapes
        when complete, else ONNX Runtime's symbolic shape inference (graph only, no weights)."""
        known = _dims(value.shape)
        if known is not None and None not in known:
            return known
        return self._infer()[0].get(value.name, known)

    def dtype(self, value: ir.Value) -> ir.DataType | None:
        """``value``'s element type: the graph's own, else inferred as :meth:`dims` (an exporter
        may leave intermediate values untyped); None where unknown."""
        if value.dtype is not None:
            return value.dtype
        return self._infer()[1].get(value.name)

    def _infer(self) -> tuple[dict[str, list], dict[str, ir.DataType]]:
        """The inferred shapes and element types, inferred once."""
        if self._inferred is None:
            self._inferred, self._types = infer_symbolic(self.model)
        return self._inferred, self._types


class _Finder(ShapeReader):
    def __init__(self, model: ir.Model, kv: KVCache):
        super().__init__(model)
        self.kv = kv
        self.outputs = set(model.graph.outputs)

    def keeps_key_axis(self, node: ir.Node) -> bool:
        """A Reshape/Transpose on the scores that provably keeps the last (key) axis last."""
        if node.op_type == "Transpose":
            perm = node.attributes.get_ints("perm", None)
            return perm is not None and perm[-1] == len(perm) - 1
        before, after = self.dims(node.inputs[0]), self.dims(node.outputs[0])
        return bool(before and after) and before[-1] is not None and before[-1] == after[-1]

    def cache_reads(self, entry) -> tuple[list[tuple[ir.Node, int, ir.Value]], set]:
        """Nodes (with input index) that read the cache of ``entry`` past the layout ops; the set
        of every value that carries the cache."""
        starts = [entry.past, entry.writer.outputs[0]] if entry.writer.op_type != "Attention" else [entry.past]
        carried: set[ir.Value] = set()
        reads: list[tuple[ir.Node, int, ir.Value]] = []
        queue = deque(starts)
        while queue:
            v = queue.popleft()
            if v in carried:
                continue
            carried.add(v)
            for node, idx in _consumers(v):
                if node is entry.writer:
                    continue
                op = node.op_type
                if op in _LAYOUT and idx == 0 or op == "Concat" and len(node.inputs) == 1:
                    queue.append(node.outputs[0])
                elif op == "Gather" and idx == 0 and node.attributes.get_int("axis", 0) == 0:
                    queue.append(node.outputs[0])  # rows of the cache (continuous batching)
                elif op in ("Mul", "Div") and is_shape_scalar(node.inputs[1 - idx]):
                    queue.append(node.outputs[0])
                elif op == "ScatterND" and idx == 0 and is_qeff_node(node):
                    continue
                else:
                    reads.append((node, idx, v))
        return reads, carried

    def sites(self) -> list[AttentionSite]:
        sites: list[AttentionSite] = []
        for layer in self.kv.layers:
            key_reads, _ = self.cache_reads(layer.key)
            _, value_carried = self.cache_reads(layer.value)
            if layer.key.writer.op_type == "Attention":
                key_reads.append((layer.key.writer, 4, layer.key.past))
            found = False
            for node, idx, _v in key_reads:
                if node.op_type in _FUSED_MS and node.domain == "com.microsoft":
                    raise UnsupportedGraphError(
                        f"{describe_node(node)} is com.microsoft.{node.op_type}, a fused attention that keeps its "
                        "own cache; the retained-state rewrite needs an export without ORT fusions")
                if node.op_type == "Attention" and node.domain in ("", "ai.onnx") and idx in (1, 4):
                    if not any(s.scores is node for s in sites):
                        sites.append(self.attention_op(node, layer.index))
                    found = True
                elif node.op_type == "MatMul" and idx == 1:
                    sites.append(self.decomposed(node, layer.index, value_carried))
                    found = True
                elif node in self.outputs or any(o in self.outputs for o in node.outputs):
                    continue
                else:
                    raise UnsupportedGraphError(
                        f"{describe_node(node)} reads the key cache of layer {layer.index} (input {idx}) in a way the "
                        "attention analysis does not understand (expected MatMul(Q, Kᵀ) or an Attention op)")
            if not found:
                raise UnsupportedGraphError(
                    f"no attention reads the key cache of layer {layer.index} ({layer.key.past.name!r}); "
                    "this graph layout is not supported")
        return sites

    def decomposed(self, matmul: ir.Node, layer: int, value_carried: set) -> AttentionSite:
        site = AttentionSite(layer=layer, kind="decomposed", scores=matmul)
        value = matmul.outputs[0]
        for _ in range(64):
            users = _consumers(value)
            if len(users) != 1:
                names = ", ".join(describe_node(n) for n, _ in users) or "nothing"
                raise UnsupportedGraphError(
                    f"the scores of layer {layer} ({value.name!r}, from {describe_node(matmul)}) are read by "
                    f"{len(users)} nodes ({names}); expected one path to a Softmax")
            node, idx = users[0]
            op = node.op_type
            other = node.inputs[1 - idx] if len(node.inputs) == 2 else None
            if op in ("Mul", "Div") and is_shape_scalar(other):
                if op == "Div" and idx == 1:
                    raise UnsupportedGraphError(f"{describe_node(node)} divides by the scores of layer {layer}")
                s = scalar_value(other)
                if s is None or site.scale is None:
                    site.scale = None  # computed from shapes
                else:
                    site.scale *= s if op == "Mul" else 1.0 / s
            elif op == "Add":
                site.terms.append(self.term(node, 1 - idx, layer))
            elif op == "Where" and idx in (1, 2):
                fill = node.inputs[3 - idx]
                if not is_fill(fill):
                    raise UnsupportedGraphError(
                        f"{describe_node(node)} on the scores of layer {layer} selects {fill.name!r}, which is not "
                        f"a mask fill (a constant <= {MASK_FILL_MAX:g})")
                site.mask_wheres.append(node)
            elif op == "Tanh":
                site.softcap = True
            elif op in ("Cast", "Identity"):
                pass
            elif op in ("Reshape", "Transpose") and idx == 0:
                if not self.keeps_key_axis(node):
                    raise UnsupportedGraphError(
                        f"{describe_node(node)} reshapes the attention scores of layer {layer} and its shapes do not "
                        "show that the key axis stays last")
            elif op == "Softmax":
                dims = self.dims(value)
                rank = len(dims) if dims is not None else None
                axis = node.attributes.get_int("axis", -1)
                if axis != -1 and (rank is None or axis != rank - 1):
                    raise UnsupportedGraphError(
                        f"{describe_node(node)} of layer {layer} normalizes over axis {axis}, not the key axis")
                if rank != 4:
                    raise UnsupportedGraphError(
                        f"{describe_node(node)} of layer {layer} normalizes scores of rank {rank}; the position mask "
                        "needs them as [batch, heads, seq, keys]")
                site.chain.append(node)
                site.softmax = node
                site.pv = self.pv(node, layer, value_carried, site.probs)
                return site
            else:
                raise UnsupportedGraphError(
                    f"{describe_node(node)} on the attention scores of layer {layer} is not understood by the "
                    "attention analysis (expected scaling, Add, Where, Tanh, Cast, then Softmax)")
            site.chain.append(node)
            value = node.outputs[0]
        raise UnsupportedGraphError(f"the scores of {describe_node(matmul)} never reach a Softmax")

    def pv(self, softmax: ir.Node, layer: int, value_carried: set, path: list[ir.Node]) -> ir.Node:
        """The ``MatMul(P, V)`` after ``softmax``; the nodes between are appended to ``path``."""
        value = softmax.outputs[0]
        for _ in range(8):
            # IsNaN/IsInf only feed a guard Where(IsNaN(p), 0, p), checked below
            users = [(n, i) for n, i in _consumers(value) if n.op_type not in ("IsNaN", "IsInf")]
            if len(users) != 1:
                raise UnsupportedGraphError(
                    f"the attention probabilities of layer {layer} ({describe_node(softmax)}) are read by "
                    f"{len(users)} nodes; expected one MatMul with the value cache")
            node, idx = users[0]
            if node.op_type == "MatMul" and idx == 0:
                if node.inputs[1] not in value_carried:
                    raise UnsupportedGraphError(
                        f"{describe_node(node)} multiplies the probabilities of layer {layer} with "
                        f"{node.inputs[1].name!r}, which is not read from that layer's value cache")
                return node
            if node.op_type in ("Cast", "Identity", "Dropout") or \
                    node.op_type in ("Reshape", "Transpose") and idx == 0 and self.keeps_key_axis(node) or \
                    node.op_type == "Where" and idx in (1, 2) and _is_zero(node.inputs[3 - idx]):  # NaN guard
                path.append(node)
                value = node.outputs[0]
                continue
            raise UnsupportedGraphError(
                f"{describe_node(node)} after the Softmax of layer {layer} is not understood (expected "
                "MatMul with the value cache)")
        raise UnsupportedGraphError(f"{describe_node(softmax)}: no MatMul with the value cache follows")

    def attention_op(self, node: ir.Node, layer: int) -> AttentionSite:
        site = AttentionSite(layer=layer, kind="attention-op", scores=node)
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            site.terms.append(self.term(node, 3, layer))
        return site

    def term(self, node: ir.Node, index: int, layer: int) -> Term:
        leaves: list[Leaf] = []
        masked: list[tuple[ir.Node, tuple[ir.Node, int]]] = []
        queue = deque([(node.inputs[index], (node, index))])
        seen: set[int] = set()
        while queue:
            v, use = queue.popleft()
            if v is None or id(v) in seen:
                continue
            seen.add(id(v))
            producer = v.producer()
            if v.dtype == ir.DataType.BOOL or producer is not None and producer.op_type == "Cast" and \
                    producer.attributes.get_int("to", 0) == ir.DataType.BOOL:
                leaves.append(Leaf(v, "mask", "boolean mask", use))
                continue
            if producer is not None and producer.op_type in _BOOLEAN_OPS:  # a comparison: a bool mask
                leaves.append(Leaf(v, "mask", "boolean mask", use))
                continue
            if producer is None and v.dtype is not None and v.dtype.is_integer():
                leaves.append(Leaf(v, "mask", "an integer 0/1 mask input", use))
                continue
            if producer is None or is_weight(v) or scalar_value(v) is not None:
                leaves.append(Leaf(v, "bias", "a constant or graph input added to the scores", use))
                continue
            op = producer.op_type
            if op == "Add":
                queue.extend((i, (producer, k)) for k, i in enumerate(producer.inputs))
            elif op in _TERM_LAYOUT:
                queue.append((producer.inputs[0], (producer, 0)))
            elif op == "Where":
                _, a, b = producer.inputs
                if _is_zero(a) and is_fill(b) or is_fill(a) and _is_zero(b):
                    leaves.append(Leaf(v, "mask", "selects 0 or a mask fill", use))
                elif is_fill(b) or is_fill(a):
                    masked.append((producer, use))
                    queue.append((a if is_fill(b) else b, (producer, 1 if is_fill(b) else 2)))
                else:
                    leaves.append(self.bias(v, use, layer))
            elif op == "Mul" and any(is_fill(i) for i in producer.inputs):
                leaves.append(Leaf(v, "mask", "(1 - mask) times a mask fill", use))
            elif op in ("Max", "Min") and any(is_fill(i) for i in producer.inputs):
                queue.extend((i, (producer, k)) for k, i in enumerate(producer.inputs) if not is_fill(i))
            else:
                leaves.append(self.bias(v, use, layer))
        return Term(node=node, index=index, leaves=leaves, masked=masked)

    def bias(self, value: ir.Value, use: tuple[ir.Node, int], layer: int) -> Leaf:
        """A float term kept as it is — refused when it looks like a mask built another way."""
        queue = deque([value])
        seen: set[int] = set()
        while queue and len(seen) < 400:
            v = queue.popleft()
            if v is None or id(v) in seen:
                continue
            seen.add(id(v))
            node = v.producer()
            if node is None or node.op_type in _SHAPE_READS:
                continue
            if node.op_type in _COMPARE or is_fill(v):
                raise UnsupportedGraphError(
                    f"the term {value.name!r} added to the scores of layer {layer} is computed with "
                    f"{describe_node(node)}, like a mask, but not in a form the analysis understands "
                    "(Where(c, 0, fill) or (1 - m) * fill); refusing rather than guessing")
            queue.extend(node.inputs)
        return Leaf(value, "bias", f"computed by {value.producer().op_type}", use)


def _dims(shape: ir.Shape | None) -> list | None:
    if shape is None:
        return None
    out = []
    for d in shape.dims:
        if isinstance(d, int):
            out.append(d)
        else:
            out.append(d.value if getattr(d, "value", None) is not None else None)
    return out


def infer_symbolic_shapes(model: ir.Model) -> dict[str, list]:
    """Shapes of every value from the graph alone: ONNX Runtime's symbolic shape inference
    (which follows shape arithmetic), else ONNX's with data propagation; {} when neither runs.
    Small in-memory initializers (axes, shape constants) are kept, the weights become typed inputs."""
    return infer_symbolic(model)[0]


def infer_symbolic(model: ir.Model) -> tuple[dict[str, list], dict[str, ir.DataType]]:
    """``(shapes, element types)`` of every value, as :func:`infer_symbolic_shapes` infers them."""
    import onnx

    proto = ir.to_proto(model)
    graph = proto.graph
    inputs = {i.name for i in graph.input}
    keep = []
    for t in graph.initializer:
        small = int(np.prod(t.dims, dtype=np.int64)) <= 64 and t.data_location != onnx.TensorProto.EXTERNAL
        if small:
            keep.append(t)
        elif t.name not in inputs:
            graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    del graph.initializer[:]
    graph.initializer.extend(keep)
    inferred = None
    chatty = logging.getLogger("onnxruntime.tools.symbolic_shape_infer")
    level = chatty.level
    chatty.setLevel(logging.ERROR)  # it warns about every merged symbolic dim
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inferred = SymbolicShapeInference.infer_shapes(proto, auto_merge=True)
    except Exception:  # noqa: BLE001 - fall back to ONNX's own inference
        try:
            inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
        except Exception:  # noqa: BLE001 - no shapes: the caller refuses what it cannot prove
            return {}, {}
    finally:
        chatty.setLevel(level)
    out, types = {}, {}
    for v in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
        t = v.type.tensor_type
        if t.HasField("shape"):
            out[v.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
        if t.elem_type:
            types[v.name] = ir.DataType(t.elem_type)
    return out, types


def find_attention_sites(model: ir.Model, kv: KVCache | None = None) -> list[AttentionSite]:
    """Every attention site of ``model``, one or more per layer; raises with the node and the
    reason when a read of the key cache is not understood."""
    kv = kv or find_kv_cache(model)
    return _Finder(model, kv).sites()
