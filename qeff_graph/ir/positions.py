"""Find where a graph computes its token positions itself, and how the model reads them.

An export without a ``position_ids`` input computes its positions from the cache's length or from
``attention_mask``; those assume the queries sit right after a cache of the true length. The
forms recognised, by what feeds what, up to the value where they become the model's positions:

* ``Range(past_len, past_len + seq_len, 1)`` or ``Range(0, seq_len, 1) + past_len``
  (``past_len`` read off the cache's shape, also through past-shape's virtual shape; ``seq_len``
  off ``input_ids`` or the token embeddings), through ``Cast``/``Unsqueeze(0)``/``Reshape`` to
  ``[1, seq_len]`` (or an ``Unsqueeze`` at 0 and later axes, e.g. ``[1, seq_len, 1]``), then
  optionally ``Expand`` to ``[batch, seq_len]``. For a result with a batch of 1 (replaced by one
  with a row per batch row), what the model computes from it is followed (ranks from the graph,
  else from shape inference) to where it meets per-row data of its rank, through ops that keep
  axis 0 as the batch and broadcast it (element-wise ops and batched ``MatMul`` against no higher rank, a
  ``Gather`` of table rows, ``Unsqueeze``/``Squeeze``/``Slice``/``Concat``/``Split``/``Transpose``
  off axis 0, ``Expand``, ``Reshape`` copying axis 0); anything else there (a ``Reshape`` that
  fixes the batch at 1, a read of that batch, a graph output) is refused;
* ``CumSum(attention_mask, axis=1) - 1``, optionally with the pads filled (``Where(mask == 0,
  c, ·)``, ``· * mask``), sliced to the last ``seq_len`` columns (``Slice`` from ``-seq_len`` or
  ``past_len`` to the end).

Anything else that computes positions from the past length or ``attention_mask`` (another start,
axis or operand, positions read before they have the ``[batch, seq_len]`` layout, or read as
above by an op not listed) is refused with :class:`~qeff_graph.errors.UnsupportedGraphError` and
one line naming the node; as is such a computation in a graph that does have a ``position_ids``
input. Computations that only build the attention masks (the ones the position-mask pass
replaces), or a kept bias (shift-invariant in the key position, e.g. ALiBi), or only read shapes,
are not positions. Nothing here changes the graph or reads weight bytes.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import onnx_ir as ir

from qeff_graph.errors import UnsupportedGraphError
from qeff_graph.ir.analysis import KVCache, ModelIO
from qeff_graph.ir.attention import (
    AttentionSite,
    describe_node,
    infer_symbolic_shapes,
    is_fill,
    scalar_value,
)
from qeff_graph.ir.build import is_qeff_node

__all__ = ["PositionReads", "find_internal_positions", "is_cache_length"]


class PositionReads(NamedTuple):
    """Where one computed position tensor becomes the model's ``[batch | 1, seq_len]`` positions."""

    dtype: ir.DataType  #: element type of that value
    layout: tuple  #: axes unsqueezed after ``[batch, seq_len]`` (``()``: none)
    reads: list  #: ``(node, input index)`` of the model's reads of it


def find_internal_positions(model: ir.Model, kv: KVCache, io: ModelIO,
                            sites: list[AttentionSite]) -> list[PositionReads]:
    """The positions ``model`` computes itself (the module docstring's forms), one entry per
    ``Range``/``CumSum`` the model's values need once the masks of ``sites`` are replaced; ``[]``
    when it computes none. Raises :class:`~qeff_graph.errors.UnsupportedGraphError`, naming the
    node, for a form not understood or when the graph also has a ``position_ids`` input."""
    graph = model.graph
    live, skipped = _live(graph, sites)
    computed = _internal_positions(graph, live, [*kv.past_inputs, io.attention_mask])
    if computed and io.position_ids is not None:
        node = computed[0]
        raise UnsupportedGraphError(
            f"node {node.name!r} ({node.op_type}) computes token positions from the past length or "
            "attention_mask, which a retained cache makes wrong; export the model with a position_ids "
            "input that the model uses")
    # where each computation becomes the model's positions (raises, naming the node)
    per_row = _per_row([io.input_ids, io.attention_mask, *kv.past_inputs]) if computed else set()
    inferred: dict[str, list] = {}

    def rank(value: ir.Value) -> int | None:  # declared, else from shape inference (once)
        known = _rank(value)
        if known is None and not inferred:
            inferred.update(infer_symbolic_shapes(model) or {"": []})
        dims = inferred.get(value.name) if known is None else None
        return known if dims is None else len(dims)

    return [PositionReads(*_positions_read(node, live, skipped, per_row, rank, io, kv)) for node in computed]


_SHAPE_READS = {"Shape", "Size"}
# Element-wise ops (numpy broadcasting): a batch of 1 in one operand broadcasts.
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Mod", "Pow", "Max", "Min", "Where", "Equal", "Less", "LessOrEqual",
                "Greater", "GreaterOrEqual", "And", "Or", "Not", "Neg", "Abs", "Cast", "Identity", "Cos", "Sin",
                "Exp", "Log", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Tanh", "Sigmoid", "Relu", "Erf"}
_B, _P, _S = (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0)  # linear forms (batch, past_len, seq_len, 1)
_ONE, _MINUS_ONE = (0, 0, 0, 1), (0, 0, 0, -1)
_UNTIL_END = 2**31 - 1  # a Slice end at least this large means "to the end"


def _live(graph: ir.Graph, sites) -> tuple[set[int], set[tuple[int, int]]]:
    """ids of the nodes whose *values* the outputs need once the masks are replaced, and the
    (node id, input index) edges not followed: those the rewrite cuts (mask terms, masking
    ``Where``) and every leaf of a kept term (a mask leaf becomes zeros of its shape; a bias
    leaf, built from key positions, is shift-invariant and kept as it is). Shape reads carry no
    positions and are not followed either."""
    skipped: set[tuple[int, int]] = set()
    for site in sites:
        for term in site.terms:
            if term.mask_only:
                skipped.add((id(term.node), term.index))
            for where, _ in term.masked:
                skipped.update({(id(where), 0), (id(where), 1 if is_fill(where.inputs[1]) else 2)})
            skipped.update((id(leaf.use[0]), leaf.use[1]) for leaf in term.leaves)
        for where in site.mask_wheres:
            skipped.update({(id(where), 0), (id(where), 1 if is_fill(where.inputs[1]) else 2)})
    live: set[int] = set()
    stack = [o.producer() for o in graph.outputs if o.producer() is not None]
    while stack:
        node = stack.pop()
        if id(node) in live:
            continue
        live.add(id(node))
        if node.op_type in _SHAPE_READS:
            continue
        for i, value in enumerate(node.inputs):
            if value is not None and (id(node), i) not in skipped and value.producer() is not None:
                stack.append(value.producer())
    return live, skipped


def _internal_positions(graph: ir.Graph, live: set[int], sources: list[ir.Value | None]) -> list[ir.Node]:
    """The ``Range``/``CumSum`` nodes the model's values need that are computed from the past
    length or ``attention_mask`` (or shifted by it: ``Range(0, seq) + past_len``): token
    positions that assume queries sit right after the cache."""
    sources = {v for v in sources if v is not None}

    def shifted(value: ir.Value) -> bool:
        for use in value.uses():
            user = use.node
            if id(user) not in live or use.idx > 1:
                continue
            if user.op_type == "Cast" and shifted(user.outputs[0]) or user.op_type in ("Add", "Sub") \
                    and -1 in _cone(user.inputs[1 - use.idx], stop=sources):
                return True
        return False

    return [node for node in graph
            if node.op_type in ("Range", "CumSum") and id(node) in live and not is_qeff_node(node)
            and (-1 in _cone(node.outputs[0], stop=sources) or node.op_type == "Range" and shifted(node.outputs[0]))]


def _positions_read(node: ir.Node, live: set[int], skipped: set, per_row: set[int], rank, io,
                    kv) -> tuple[ir.DataType, tuple, list]:
    """Follow the positions computed by ``node`` (a ``Range`` or ``CumSum`` of the module
    docstring's forms) to the value where they become the model's ``[batch | 1, seq_len]``
    positions (maybe unsqueezed after them); return its dtype, those unsqueezed axes and its reads
    by the model. Raise, naming ``node``, otherwise."""
    pasts = set(kv.past_inputs)

    def refuse(why: str):
        raise UnsupportedGraphError(
            f"node {node.name!r} ({node.op_type}) computes token positions from the past length or "
            f"attention_mask, which a retained cache makes wrong, and {why}; not understood (export the "
            "model with a position_ids input)")

    def reads(value: ir.Value) -> list[tuple[ir.Node, int]]:
        return [(u.node, u.idx) for u in value.uses() if id(u.node) in live
                and u.node.op_type not in _SHAPE_READS and (id(u.node), u.idx) not in skipped]

    def sym(value: ir.Value | None) -> list | None:
        return _sym(value, io, pasts)

    def is_mask(value: ir.Value | None) -> bool:
        while value is not None and value.producer() is not None and value.producer().op_type in ("Cast", "Identity"):
            value = value.producer().inputs[0]
        return value is not None and value is io.attention_mask

    if node.op_type == "Range":
        start, limit = (_one(sym(v)) for v in node.inputs[:2])
        if scalar_value(node.inputs[2]) != 1:
            refuse("its step is not 1")
    else:
        axis = sym(node.inputs[1])
        if not is_mask(node.inputs[0]):
            refuse("what it sums is not attention_mask")
        if axis not in ([_ONE], [_MINUS_ONE]):
            refuse("it does not sum over the sequence axis (1) of attention_mask")
        if node.attributes.get_int("exclusive", 0) or node.attributes.get_int("reverse", 0):
            refuse("it is exclusive or reversed")

    def step(state: tuple, user: ir.Node, index: int) -> tuple | None:
        """(layout, batched, first, offset, sliced) after ``user`` reads the positions at
        ``index``; None when ``user`` is not a step of the form. ``layout``: None for a Range's
        ``[seq_len]``, else the axes unsqueezed after ``[1 | batch, seq_len]`` (``()``: none);
        ``first``: a Range's first position."""
        layout, batched, first, offset, sliced = state
        op, other = user.op_type, user.inputs[1 - index] if len(user.inputs) > 1 and index < 2 else None
        if op in ("Cast", "Identity"):
            return state
        if node.op_type == "Range":
            if first != _P and (op == "Add" or op == "Sub" and index == 0) \
                    and (shift := _one(sym(other))) is not None:  # Range(0, seq) + past_len
                return layout, batched, _arith(op, first, shift), offset, sliced
            if index == 0 and layout is None and op == "Unsqueeze" and (axes := _axes(user, sym)) is not None \
                    and 0 in (normal := sorted(a % (len(axes) + 1) for a in axes)):  # [1, seq_len, (1...)]
                return tuple(normal[1:]), batched, first, offset, sliced
            if index == 0 and layout in (None, ()) and not batched and op == "Reshape" \
                    and sym(user.inputs[1]) in ([_ONE, _S], [_MINUS_ONE, _S], [_ONE, _MINUS_ONE]):
                return (), batched, first, offset, sliced  # [1, seq_len]
            if index == 0 and op == "Expand" and layout == () and (shape := sym(user.inputs[1])) is not None \
                    and len(shape) == 2 and shape[0] in (_B, _ONE) and shape[1] in (_S, _ONE):
                return layout, batched or shape[0] == _B, first, offset, sliced
            return None
        if sliced:
            return None
        if not offset and (op == "Sub" and index == 0 and scalar_value(other) == 1
                           or op == "Add" and scalar_value(other) == -1):
            return layout, batched, first, True, sliced  # cumsum - 1: the position of each real token
        if op == "Mul" and is_mask(other) or op == "Where" and index in (1, 2) and scalar_value(
                user.inputs[3 - index]) is not None and _selects_pads(user.inputs[0], index, is_mask):
            return state  # zeroes or fills the pads only
        if op == "Slice" and index == 0 and len(user.inputs) in (4, 5) and _axes(user, sym, 3) in ([1], [-1]) \
                and (len(user.inputs) == 4 or user.inputs[4] is None or sym(user.inputs[4]) == [_ONE]) \
                and sym(user.inputs[1]) in ([(0, 0, -1, 0)], [_P]) and _to_end(sym(user.inputs[2])):
            return layout, batched, first, offset, True  # the last seq_len columns: the new tokens
        return None

    value = node.outputs[0]
    state = (None, False, start, False, False) if node.op_type == "Range" else ((), True, None, False, False)
    while len(found := reads(value)) == 1 and not value.is_graph_output() \
            and (after := step(state, *found[0])) is not None:
        state, value = after, found[0][0].outputs[0]
    layout, batched, first, offset, sliced = state
    if node.op_type == "Range" and first != _P:
        refuse("its positions do not start at the past length (the cache's length axis)")
    if node.op_type == "Range" and _arith("Sub", limit, start) != _S:
        refuse("it does not count seq_len positions")
    if layout is None or node.op_type == "CumSum" and not (offset and sliced) or value.is_graph_output():
        user = next((u for u, i in found if step(state, u, i) is None), found[0][0] if found else None)
        refuse(f"its positions are read by {describe_node(user, 'the graph outputs')} before they are shaped as "
               + ("[1 or batch, seq_len]" if node.op_type == "Range" else "(cumsum - 1)[:, -seq_len:]"))
    if not batched:  # [1, seq_len, ...] becomes [batch, seq_len, ...]
        _batch_of_one(value, 2 + len(layout), reads, live, per_row, rank, sym, refuse)
    dtype = _dtype(value)
    if dtype is None:
        refuse(f"the type of {value.name!r} is unknown")
    return dtype, layout, found


def _per_row(inputs: list[ir.Value | None]) -> set[int]:
    """ids of the values computed from the *data* of ``inputs`` (not only from their shapes)."""
    out: set[int] = set()
    stack = [v for v in inputs if v is not None]
    while stack:
        value = stack.pop()
        if id(value) not in out:
            out.add(id(value))
            stack.extend(o for u in value.uses() if u.node.op_type not in _SHAPE_READS for o in u.node.outputs)
    return out


def _batch_of_one(value: ir.Value, value_rank: int, reads, live: set[int], per_row: set[int], rank, sym,
                  refuse) -> None:
    """Positions with a batch of 1 (``value``, ``[1, seq_len, ...]`` of rank ``value_rank``) are fed
    ``[batch, seq_len, ...]`` ones: follow what the model computes from them while its batch is
    1, through ops that keep axis 0 as the batch and broadcast it, to where they meet per-row data
    of the same rank (whose batch it then is); refuse anything else (a ``Reshape`` that could
    bake the batch of 1 in, a broadcast against a higher rank, a read of the shape)."""
    stack, seen = [(value, value_rank)], set()
    while stack:
        v, r = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if v.is_graph_output():
            refuse(f"its [1, seq_len] positions reach the graph output {v.name!r}")
        shape_read = next((u.node for u in v.uses() if u.node.op_type in _SHAPE_READS and id(u.node) in live
                           and _reads_batch(u.node, r, sym)), None)
        if v is not value and shape_read is not None:
            refuse(f"the batch of what the model computes from its [1, seq_len] positions is read by "
                   f"{describe_node(shape_read, 'the graph outputs')}")
        for user, index in reads(v):
            op, others = user.op_type, [x for i, x in enumerate(user.inputs) if i != index and x is not None]
            ranks = [rank(x) for x in others]
            data = others[0] if others else None
            shape = sym(user.inputs[1]) if op in ("Expand", "Reshape") and len(user.inputs) > 1 else None
            nxt = None
            if op in _ELEMENTWISE or op == "MatMul" and r >= 3:  # MatMul: batched over the leading axes
                if None in ranks:
                    refuse(f"its [1, seq_len] positions reach {describe_node(user, 'the graph outputs')}, whose other operands' ranks are unknown")
                if max(ranks, default=0) <= r and (op != "MatMul" or min(ranks) >= 3):
                    if any(id(x) in per_row and rank(x) == r for x in others):
                        continue  # meets per-row data: the output's batch is the data's
                    nxt = r
            elif op in ("Unsqueeze", "Squeeze") and index == 0 and (axes := _axes(user, sym)) is not None:
                n = r + len(axes) if op == "Unsqueeze" else r
                nxt = n if op == "Unsqueeze" else r - len(axes)
                nxt = nxt if all(a % n for a in axes) else None
            elif op == "Transpose" and list(user.attributes.get_ints("perm", [0]))[:1] == [0] \
                    or op == "Slice" and index == 0 and (axes := _axes(user, sym, 3)) is not None and all(a % r for a in axes) \
                    or op in ("Split", "Softmax") and index == 0 and user.attributes.get_int("axis", 0) % r \
                    or op == "Concat" and user.attributes.get_int("axis", 0) % r \
                    and all(id(x) not in per_row and id(value.producer()) in _cone(x) for x in others):
                nxt = r
            elif op in ("Gather", "GatherND") and index == 1 and id(data) not in per_row and ranks[0] is not None \
                    and user.attributes.get_int("axis", 0) == 0 and user.attributes.get_int("batch_dims", 0) == 0:
                nxt = r + ranks[0] - 1 if op == "Gather" else rank(user.outputs[0])
            elif op == "Expand" and index == 0 and shape is not None and len(shape) <= r \
                    or op == "Tile" and index == 0 and (sym(user.inputs[1]) or [None])[0] == _ONE:
                nxt = r
            elif op == "Reshape" and index == 0 and shape is not None and shape[:1] == [(0, 0, 0, 0)] \
                    and not user.attributes.get_int("allowzero", 0):  # axis 0 copied: the batch stays
                nxt = len(shape)
            if nxt is None:
                refuse(f"its [1, seq_len] positions reach {describe_node(user, 'the graph outputs')}, which may not broadcast them over the batch")
            stack.extend((o, nxt) for o in user.outputs if o is not None)


def _reads_batch(node: ir.Node, rank: int, sym) -> bool:
    """A ``Shape``/``Size`` read of a rank ``rank`` tensor whose result may hold its axis 0 (only a
    ``Shape`` from axis 1 on, or one whose every use picks a later axis, does not)."""
    if node.op_type != "Shape" or node.attributes.get_int("start", 0) % rank:
        return node.op_type != "Shape"
    return not all(u.node.op_type == "Gather" and u.idx == 0 and (index := _one(sym(u.node.inputs[1]))) is not None
                   and index[:3] == (0, 0, 0) and index[3] % rank for u in node.outputs[0].uses())


def _rank(value: ir.Value | None) -> int | None:
    if value is None:
        return None
    if value.shape is not None:
        return len(value.shape)
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else len(tensor.shape)


def _one(forms: list | None) -> tuple | None:
    """The form of a one-element tensor, else None."""
    return forms[0] if forms is not None and len(forms) == 1 else None


def _add(*forms: tuple) -> tuple:
    return tuple(map(sum, zip(*forms)))


def _arith(op: str, x: tuple | None, y: tuple | None) -> tuple | None:
    if x is None or y is None:
        return None
    if op == "Add":
        return _add(x, y)
    if op == "Sub":
        return _add(x, tuple(-v for v in y))
    if x[:3] == (0, 0, 0):  # Mul: one side a constant
        x, y = y, x
    return tuple(v * y[3] for v in x) if y[:3] == (0, 0, 0) else None


def _sym(value: ir.Value | None, io, pasts: set, depth: int = 0) -> list | None:
    """A small int tensor (flattened) as linear forms in (batch, past_len, seq_len, 1), e.g.
    ``Shape(past_key)[2]`` -> ``[(0, 1, 0, 0)]``; None (or None entries) where not understood.
    The cache's length read by the model is the past length; read by qeff-graph's own nodes (the
    virtual shape of past-shape) it is ctx_len = past_len + seq_len."""
    if value is None or depth > 32:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is not None:
        if tensor.shape is None or int(np.prod(tensor.shape.dims, dtype=np.int64)) > 8:
            return None
        array = tensor.numpy().reshape(-1)
        if array.dtype.kind not in "iuf" or not np.all(np.mod(array, 1) == 0):
            return None
        return [(0, 0, 0, int(v)) for v in array]
    node = value.producer()
    if node is None:
        return None
    op, ins = node.op_type, node.inputs

    def sub(i: int) -> list | None:
        return _sym(ins[i], io, pasts, depth + 1) if i < len(ins) else None

    if op == "Shape":
        dims = _dims(ins[0], io, pasts, depth + 1)
        if dims is None:
            return None
        if ins[0] in pasts and is_qeff_node(node):
            dims[2] = _add(_P, _S)
        return dims[node.attributes.get_int("start", 0): node.attributes.get_int("end", len(dims))]
    if op in ("Identity", "Cast"):
        return sub(0)
    if op in ("Squeeze", "Unsqueeze", "Reshape", "Flatten"):
        x = sub(0)
        return x if x is not None and len(x) == 1 else None
    if op == "Concat":
        parts = [_sym(v, io, pasts, depth + 1) for v in ins]
        return None if any(p is None for p in parts) else [d for p in parts for d in p]
    if op == "Gather":
        data, index = sub(0), sub(1)
        if data is None or index is None or any(i is None or i[:3] != (0, 0, 0) or not -len(data) <= i[3] < len(data)
                                                for i in index):
            return None
        return [data[i[3]] for i in index]
    if op in ("Add", "Sub", "Mul"):
        x, y = sub(0), sub(1)
        if x is None or y is None or len(x) != len(y) and 1 not in (len(x), len(y)):
            return None
        n = max(len(x), len(y))
        return [_arith(op, a, b) for a, b in zip(x * n if len(x) == 1 else x, y * n if len(y) == 1 else y)]
    if op == "Neg":
        x = sub(0)
        return None if x is None else [_arith("Mul", a, _MINUS_ONE) for a in x]
    return None


def _dims(value: ir.Value | None, io, pasts: set, depth: int = 0) -> list | None:
    """The shape of ``value`` as linear forms (None where unknown) for the cache, ``input_ids``,
    ``attention_mask`` and what keeps their axes: token embeddings (``Gather`` of table rows,
    scaled by a number), a ``Reshape`` to the same shape, a ``Concat``."""
    if value is None or depth > 32:
        return None
    if value in pasts:
        return [_B, None, _P, None]
    if value is io.input_ids:
        return [_B, _S]
    if value is io.attention_mask:
        return [_B, _add(_P, _S)]
    node = value.producer()
    if node is None:
        return None
    ins = node.inputs
    if node.op_type in ("Identity", "Cast"):
        return _dims(ins[0], io, pasts, depth + 1)
    if node.op_type in ("Mul", "Div", "Add", "Sub") and len(ins) == 2:  # scaled by one number
        for x, c in ((ins[0], ins[1]), (ins[1], ins[0])):
            tensor = ir.convenience.get_const_tensor(c) if c is not None else None
            dims = _dims(x, io, pasts, depth + 1) if tensor is not None and tensor.size == 1 else None
            if dims is not None and len(tensor.shape) <= len(dims):
                return dims
        return None
    if node.op_type == "Gather" and node.attributes.get_int("axis", 0) == 0 and ins[0].shape is not None:
        index = _dims(ins[1], io, pasts, depth + 1)
        return None if index is None else index + [None] * (len(ins[0].shape) - 1)
    if node.op_type == "Reshape":
        x, shape = _dims(ins[0], io, pasts, depth + 1), _sym(ins[1], io, pasts, depth + 1)
        same = x is not None and shape is not None and len(x) == len(shape) and shape.count(_MINUS_ONE) <= 1 \
            and all(s in (_MINUS_ONE, (0, 0, 0, 0)) or s == d is not None for s, d in zip(shape, x))
        return x if same else None
    if node.op_type == "Concat":
        parts = [_dims(v, io, pasts, depth + 1) for v in ins]
        if not parts or any(p is None for p in parts) or len({len(p) for p in parts}) != 1:
            return None
        axis = node.attributes.get_int("axis", 0) % len(parts[0])
        out = list(parts[0])
        out[axis] = None if any(p[axis] is None for p in parts) else _add(*(p[axis] for p in parts))
        return out
    return None


def _axes(node: ir.Node, sym, index: int = 1) -> list[int] | None:
    """The constant ``axes`` of an Unsqueeze (input or attribute) or a Slice (input 3)."""
    if "axes" in node.attributes:
        return list(node.attributes.get_ints("axes"))
    forms = sym(node.inputs[index]) if len(node.inputs) > index else None
    if forms is None or any(f is None or f[:3] != (0, 0, 0) for f in forms):
        return None
    return [f[3] for f in forms]


def _to_end(forms: list | None) -> bool:
    """A Slice end that reaches the end of the attention_mask's [past_len + seq_len] columns."""
    return forms is not None and len(forms) == 1 and forms[0] is not None and (
        forms[0] == _add(_P, _S) or forms[0][:3] == (0, 0, 0) and forms[0][3] >= _UNTIL_END)


def _selects_pads(cond: ir.Value | None, index: int, is_mask) -> bool:
    """``Where(cond, ...)`` keeps input ``index`` exactly at the real tokens: ``cond`` is
    ``attention_mask == 0`` (keeping input 2) or the mask as booleans (keeping input 1)."""
    node = cond.producer() if cond is not None else None
    if node is None:
        return False
    if node.op_type == "Equal" and index == 2:
        return any(is_mask(node.inputs[i]) and scalar_value(node.inputs[1 - i]) == 0 for i in (0, 1))
    return index == 1 and node.op_type == "Cast" and node.attributes.get_int("to") == ir.DataType.BOOL \
        and is_mask(node.inputs[0])


def _dtype(value: ir.Value) -> ir.DataType | None:
    """The element type of ``value``, read back through the position ops when not annotated."""
    for _ in range(64):
        if value is None or value.dtype is not None:
            break
        tensor, node = ir.convenience.get_const_tensor(value), value.producer()
        if tensor is not None:
            return tensor.dtype
        if node is None or node.op_type == "Cast":
            return None if node is None else ir.DataType(node.attributes.get_int("to"))
        if node.op_type in _SHAPE_READS:
            return ir.DataType.INT64
        value = node.inputs[2 if node.op_type == "Where" else 0]
    return None if value is None else value.dtype


def _cone(value: ir.Value, stop: set | None = None, limit: int = 5000) -> set[int]:
    """ids of the nodes ``value`` is computed from (shape reads included); ``-1`` is in the set
    when one of ``stop`` is reached."""
    out: set[int] = set()
    stack = [value]
    seen: set[int] = set()
    while stack and len(seen) < limit:
        v = stack.pop()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        if stop is not None and v in stop:
            out.add(-1)
            continue
        node = v.producer()
        if node is not None and id(node) not in out:
            out.add(id(node))
            stack.extend(node.inputs)
    return out


def is_cache_length(value: ir.Value, io, pasts: set) -> bool:
    """True if the one-element int ``value`` is provably the full cache length ``past_len +
    seq_len`` (``ctx_len`` in a retained program, where past-shape's virtual shape is read)."""
    return _sym(value, io, pasts) == [_add(_P, _S)]
