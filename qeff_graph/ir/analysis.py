"""Find the KV cache and the model IO of a causal-LM graph, by structure.

Two shapes of graph are understood:

* **dynamic KV** (what exporters emit): a past input ``[batch, kv_heads, past_len, head_dim]``
  is concatenated with the new key/value along the sequence axis (``Concat(past, new,
  axis=2|-2)``) and the result is a graph output ("present"). The concat may sit behind
  ``Identity``/``Cast`` nodes, or be the ``present_key``/``present_value`` output of an
  ONNX ``Attention`` op that takes ``past_key``/``past_value``.
* **retained** (what :mod:`qeff_graph.passes.kv_retention` produces): inputs
  ``past_key.{i}``/``past_value.{i}`` and outputs ``past_key.{i}_RetainedState``.

Names are used only as hints (layer numbers, ``key``/``value``); whether a cache tensor is a
key or a value is decided by where it flows (into the ``Q·Kᵀ`` MatMul or the ``P·V`` one).
No weight bytes are read.
"""

from __future__ import annotations

import dataclasses
import re
from collections import deque

import onnx_ir as ir

from qeff_graph.errors import PreconditionError, UnsupportedGraphError

__all__ = ["KVLayer", "KVCache", "find_kv_cache", "find_io", "ModelIO", "is_weight", "depends_on",
           "require_retained"]

_PASSTHROUGH = {"Identity", "Cast"}


@dataclasses.dataclass
class KVEntry:
    """One cache tensor (key or value) of one layer."""

    past: ir.Value  # graph input
    present: ir.Value  # graph output
    writer: ir.Node  # Concat / ScatterND / Attention node that appends the new rows
    new: ir.Value | None  # the new rows ([batch, kv_heads, seq, head_dim]) for Concat/ScatterND


@dataclasses.dataclass
class KVLayer:
    index: int
    key: KVEntry
    value: KVEntry


@dataclasses.dataclass
class KVCache:
    layers: list[KVLayer]
    retained: bool  # already in the retained-state form
    kv_heads: int | None
    head_dim: int | None
    seq_axis: int
    dtype: ir.DataType | None

    @property
    def past_inputs(self) -> list[ir.Value]:
        return [e.past for layer in self.layers for e in (layer.key, layer.value)]

    @property
    def present_outputs(self) -> list[ir.Value]:
        return [e.present for layer in self.layers for e in (layer.key, layer.value)]

    def summary(self) -> dict:
        return {
            "layers": len(self.layers),
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "sequence_axis": self.seq_axis,
            "dtype": self.dtype.name if self.dtype is not None else None,
            "form": "retained" if self.retained else "dynamic",
            "past_inputs": [v.name for v in self.past_inputs],
            "present_outputs": [v.name for v in self.present_outputs],
        }


@dataclasses.dataclass
class ModelIO:
    input_ids: ir.Value | None
    position_ids: ir.Value | None
    attention_mask: ir.Value | None
    batch_index: ir.Value | None
    logits: ir.Value | None


def _is_passthrough(node: ir.Node | None) -> bool:
    if node is None:
        return False
    if node.op_type == "Concat":  # a one-input Concat is a copy (TorchScript emits them)
        return len(node.inputs) == 1
    return node.op_type in _PASSTHROUGH


def _skip_back(value: ir.Value | None) -> ir.Value | None:
    while value is not None and _is_passthrough(value.producer()):
        value = value.producer().inputs[0]
    return value


_WEIGHT_VIEWS = frozenset({"Transpose", "Cast", "Identity", "Reshape", "DequantizeLinear"})


def is_weight(value: ir.Value | None, through: frozenset[str] = _WEIGHT_VIEWS) -> bool:
    """True if ``value`` is an initializer/constant, possibly behind ops in ``through``
    (default: Transpose/Cast/Identity/Reshape/DequantizeLinear of the default domain)."""
    seen = 0
    while value is not None and seen < 8:
        if value.const_value is not None or value.is_initializer():
            return True
        node = value.producer()
        if node is None:
            return False
        if node.op_type == "Constant":
            return True
        if node.op_type not in through or node.domain not in ("", "ai.onnx"):
            return False
        value = node.inputs[0]
        seen += 1
    return False


def depends_on(value: ir.Value, sources: set[ir.Value], limit: int = 100000, *,
               through_shapes: bool = False, stop=None) -> bool:
    """True if ``value`` is computed from the *data* of any of ``sources`` (backward BFS).

    Reads of a shape (``Shape``/``Size``) do not count as depending on the data, unless
    ``through_shapes``; ``stop(node)`` ends the walk at a node (its inputs are not followed).
    """
    seen: set[int] = set()
    queue = deque([value])
    while queue and len(seen) < limit:
        v = queue.popleft()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        if v in sources:
            return True
        node = v.producer()
        if node is None or stop is not None and stop(node):
            continue
        if through_shapes or node.op_type not in ("Shape", "Size"):
            queue.extend(i for i in node.inputs if i is not None)
    return False


def _layer_number(name: str | None) -> int | None:
    numbers = re.findall(r"\d+", name or "")
    return int(numbers[0]) if numbers else None


def _name_role(name: str | None) -> str | None:
    name = (name or "").lower()
    if "key" in name or re.search(r"(^|[._])k($|[._])", name):
        return "key"
    if "value" in name or re.search(r"(^|[._])v($|[._])", name):
        return "value"
    return None


def _structural_role(value: ir.Value, max_nodes: int = 64) -> str | None:
    """Key or value, by the first MatMul / Attention the cache tensor flows into."""
    queue = deque([value])
    seen: set[int] = set()
    while queue and len(seen) < max_nodes:
        v = queue.popleft()
        for use in v.uses():
            node, index = use.node, use.idx
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
                return {1: "key", 2: "value", 4: "key", 5: "value"}.get(index)
            if node.op_type == "MatMul":
                other = node.inputs[1 - index]
                return "value" if other is not None and _near_softmax(other) else "key"
            queue.extend(node.outputs)
    return None


def _near_softmax(value: ir.Value, depth: int = 4) -> bool:
    """True if a Softmax produces ``value`` within ``depth`` nodes (masking/NaN guards between)."""
    frontier = [value]
    for _ in range(depth):
        nxt = []
        for v in frontier:
            node = v.producer() if v is not None else None
            if node is None:
                continue
            if node.op_type == "Softmax":
                return True
            nxt.extend(i for i in node.inputs if i is not None)
        frontier = nxt
    return False


def _writer_of(present: ir.Value, inputs: set[ir.Value]):
    """Return (writer_node, past_input, new_rows) when ``present`` is a cache output."""
    value = _skip_back(present)
    node = value.producer() if value is not None else None
    if node is None:
        return None
    if node.op_type == "Concat" and len(node.inputs) == 2:
        past = _skip_back(node.inputs[0])
        axis = node.attributes.get_int("axis", 0)
        if past in inputs and axis in (2, -2):
            return node, past, node.inputs[1]
    if node.op_type == "ScatterND":
        past = _skip_back(node.inputs[0])
        if past in inputs:
            return node, past, node.inputs[2]
    if node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft" and \
            (node.name or "").startswith("qeff/"):  # the ort-gqa lowering of a retained program
        out_index = list(node.outputs).index(value)
        if out_index in (1, 2) and node.inputs[2 + out_index] in inputs:
            return node, node.inputs[2 + out_index], node.inputs[out_index]
    if node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
        out_index = list(node.outputs).index(value)
        if out_index in (1, 2) and len(node.inputs) > 3 + out_index:
            past = _skip_back(node.inputs[3 + out_index])
            if past in inputs:
                return node, past, None
    return None


def find_kv_cache(model: ir.Model) -> KVCache:
    """Find every layer's past/present key and value. Raises if the graph has no KV cache."""
    graph = model.graph
    inputs = set(graph.inputs)
    found: list[tuple[KVEntry, str | None]] = []
    for out in graph.outputs:
        hit = _writer_of(out, inputs)
        if hit is None:
            continue
        writer, past, new = hit
        entry = KVEntry(past=past, present=out, writer=writer, new=new)
        if writer.op_type == "GroupQueryAttention":
            role = "key" if out is writer.outputs[1] else "value"
        else:
            role = _structural_role(past if writer.op_type == "Attention" else _skip_back(out))
        found.append((entry, role or _name_role(past.name) or _name_role(out.name)))
    if not found:
        raise UnsupportedGraphError(
            "no KV cache found: expected past inputs [batch, kv_heads, past_len, head_dim] "
            "concatenated along axis 2 into present outputs; export the model with its cache "
            "(use_cache=True, e.g. `qeff-graph export` or optimum's text-generation-with-past)"
        )
    keys = [e for e, r in found if r == "key"]
    values = [e for e, r in found if r == "value"]
    if len(keys) != len(values) or len(keys) + len(values) != len(found):
        raise UnsupportedGraphError(
            f"KV cache is ambiguous: found {len(keys)} key and {len(values)} value caches "
            f"among {len(found)} cache outputs; name them past_key_values.{{i}}.key/value"
        )

    def order(entries: list[KVEntry]) -> list[KVEntry]:
        numbers = [_layer_number(e.past.name) for e in entries]
        if None not in numbers and len(set(numbers)) == len(numbers):
            return [e for _, e in sorted(zip(numbers, entries), key=lambda t: t[0])]
        return entries  # graph output order

    keys, values = order(keys), order(values)
    layers = [KVLayer(i, k, v) for i, (k, v) in enumerate(zip(keys, values))]
    past0 = layers[0].key.past
    dims = list(past0.shape.dims) if past0.shape is not None else [None] * 4
    retained = layers[0].key.writer.op_type in ("ScatterND", "GroupQueryAttention")
    return KVCache(
        layers=layers,
        retained=retained,
        kv_heads=dims[1] if len(dims) == 4 and isinstance(dims[1], int) else None,
        head_dim=dims[3] if len(dims) == 4 and isinstance(dims[3], int) else None,
        seq_axis=2,
        dtype=past0.dtype,
    )


def find_io(model: ir.Model, kv: KVCache | None = None) -> ModelIO:
    """Find input_ids, position_ids, attention_mask, batch_index and logits (names first)."""
    graph = model.graph
    by_name = {v.name: v for v in graph.inputs}
    cache = set(kv.past_inputs) if kv else set()
    int_inputs = [
        v for v in graph.inputs
        if v not in cache and v.dtype in (ir.DataType.INT64, ir.DataType.INT32)
    ]
    input_ids = by_name.get("input_ids")
    if input_ids is None:
        for v in int_inputs:
            if any(u.node.op_type == "Gather" and is_weight(u.node.inputs[0]) for u in v.uses()):
                input_ids = v
                break
    position_ids = by_name.get("position_ids")
    attention_mask = by_name.get("attention_mask")
    batch_index = by_name.get("batch_index")
    present = set(kv.present_outputs) if kv else set()
    outputs = [o for o in graph.outputs if o not in present]
    logits = next((o for o in outputs if o.name == "logits"), outputs[0] if outputs else None)
    return ModelIO(input_ids, position_ids, attention_mask, batch_index, logits)


def require_retained(model: ir.Model) -> tuple[KVCache, ModelIO]:
    """``(kv, io)`` of a retained-state program with ``position_ids``; raises
    :class:`~qeff_graph.errors.PreconditionError` otherwise (what the ORT lowerings require)."""
    kv = find_kv_cache(model)
    if not kv.retained:
        raise PreconditionError("needs a retained-state program (run kv-retention first)")
    io = find_io(model, kv)
    if io.position_ids is None:
        raise PreconditionError("the program has no position_ids input")
    return kv, io
