"""Lower an encoder's self-attention to ONNX Runtime's fused ``com.microsoft.Attention`` (``ort-fuse-encoder``).

The ort backend's lowering of encoder programs (the qaic backend keeps the portable graph).
Each self-attention that BERT-family encoders export (TorchScript and dynamo, transformers'
SDPA path) is matched from its ``Softmax``::

    x ─ MatMul(Wq) ─ Add(bq) ─ Reshape[B,S,N,H] ─ Transpose(0,2,1,3) ─ [Mul|Div c] ───┐
    x ─ MatMul(Wk) ─ Add(bk) ─ Reshape[B,S,N,H] ─ Kᵀ ─────────────────── [Mul|Div c] ─ MatMul
                                                                                       │
       mask ─────────────────────────────────────────── Add ◀─ [Mul|Div c] ◀───────────┘
                                                         │
      Softmax(-1) ─ [Where(IsNaN(p), 0, p)] ─ MatMul(·, V) ─ Transpose(0,2,1,3) ─ Reshape[B,S,N·H] ─▶ y
                                                  ▲
    x ─ MatMul(Wv) ─ Add(bv) ─ Reshape[B,S,N,H] ─ Transpose(0,2,1,3)

with Kᵀ one of ``Transpose(0,2,3,1)`` of the reshaped K (TorchScript), ``Transpose(0,1,3,2)``
of ``Transpose(0,2,1,3)``, or dynamo's ``Reshape[B,N,H,S] ∘ Transpose(0,2,1) ∘ Reshape[B·N,S,H]``
of ``Transpose(0,2,1,3)``. It becomes::

    y = com.microsoft.Attention(x, Concat(Wq, Wk, Wv), Concat(bq, bk, bv), Cast(attention_mask, int32);
                                num_heads=N [, scale when the product of the c's is not 1/√H])

The weights are concatenated by graph nodes that ONNX Runtime folds when it loads the program:
the pass reads no weight bytes and the program keeps the export's weight file. A projection
without bias gets a zero bias.

The mask must be a *key padding mask* — what Attention's raw ``[batch, seq]`` mask_index
applies: 0 where ``attention_mask`` is 1 and ≤ -1e4 where it is 0, whatever the query position.
That is checked numerically, once per mask tensor: the subgraph computing it from
``attention_mask`` (and shapes; shapes of weight-dependent tensors come from ONNX shape
inference) is run by ONNX Runtime on a probe mask with right padding, left padding and a hole,
over more positions than any integer constant in that subgraph (so a sliding window shows). A
mask that reads weights (a relative position bias), differs with the query (causal, sliding
window) or cannot be probed leaves its layers as they are, with the reason in ``stats``; so does
anything else outside the pattern (rotary embeddings, probabilities used elsewhere). The only
difference from the decomposed graph is a row whose ``attention_mask`` is all 0: Attention
averages its values instead of returning 0 — no embedding loop feeds such a row.

SkipLayerNormalization / BiasGelu are not emitted: ONNX Runtime fuses Gelu and BiasGelu itself
when it loads the graph, and its SkipLayerNormalization measured ~5 % slower than
LayerNormalization + Add on the 2-core AVX-512 CI machine (all-MiniLM-L6-v2, batch 32 × 128).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import common

from qeff_graph.errors import PreconditionError
from qeff_graph.ir.analysis import is_weight
from qeff_graph.ir.build import Builder
from qeff_graph.passes.registry import register

__all__ = ["MASK_FILL_MAX", "MS_DOMAIN", "ORTFuseEncoder"]

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
HIDDEN = "last_hidden_state"
MASK_FILL_MAX = -1e4  # a masked score at or below this adds nothing after Softmax (exp(-1e4) == 0)
_TAG = "ort-fuse-encoder"
_SMALL = 4096  # constants up to this many elements may feed a mask (fills, shape pieces, index tables)
_PROBE_BATCH = 3
_PROBE_MIN_SEQ = 7
_PROBE_MAX_SEQ = 1024  # a window wider than this cannot be told from padding: refused


class _Miss(Exception):
    """This Softmax is not a fusable self-attention; the message says why (one line)."""


@dataclasses.dataclass
class _Site:
    x: ir.Value
    weights: tuple[ir.Value, ir.Value, ir.Value]
    biases: tuple[ir.Value | None, ir.Value | None, ir.Value | None]
    mask: ir.Value | None
    num_heads: int
    head_size: int
    scale: float | None  # None: Attention's default 1/sqrt(head_size)
    output: ir.Value


# ---- small matchers ---------------------------------------------------------------------------
def _node(value: ir.Value | None, *op_types: str) -> ir.Node:
    node = value.producer() if value is not None else None
    if node is None or node.op_type not in op_types or node.domain not in ("", "ai.onnx"):
        got = "a graph input or constant" if node is None else node.op_type
        raise _Miss(f"expected {'/'.join(op_types)} but found {got}")
    return node


def _scalar(value: ir.Value | None) -> float | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    if tensor is None or tensor.size != 1:
        return None
    return float(np.asarray(tensor.numpy()).reshape(()))


def _perm(node: ir.Node) -> tuple[int, ...] | None:
    perm = node.attributes.get_ints("perm")
    return tuple(perm) if perm is not None else None


def _only_use(value: ir.Value, what: str) -> ir.Node:
    """The one consumer of ``value`` (Shape nodes, which read only its shape, aside)."""
    uses = [u for u in value.uses() if u.node.op_type != "Shape"]
    if len(uses) != 1 or value.is_graph_output():
        raise _Miss(f"the {what} is used elsewhere too")
    return uses[0].node


def _scaled(value: ir.Value) -> tuple[ir.Value, float]:
    """Look through ``Mul``/``Div`` by a scalar constant: (the operand, the factor)."""
    node = value.producer()
    if node is not None and node.op_type in ("Mul", "Div") and node.domain in ("", "ai.onnx"):
        a, b = node.inputs
        if _scalar(b) is not None:
            c = _scalar(b)
            return a, (1.0 / c if node.op_type == "Div" else c)
        if node.op_type == "Mul" and _scalar(a) is not None:
            return b, _scalar(a)
    return value, 1.0


def _is_constant(value: ir.Value | None) -> bool:
    """An initializer or Constant, possibly behind Identity/Transpose/Cast (folded by ORT at load)."""
    return is_weight(value, through=frozenset({"Identity", "Transpose", "Cast"}))


def _dims(value: ir.Value) -> tuple | None:
    for _ in range(4):
        if value.shape is not None:
            return tuple(value.shape.dims)
        if value.const_value is not None:
            return tuple(value.const_value.shape.dims)
        node = value.producer()
        if node is None or node.op_type != "Identity":
            return None
        value = node.inputs[0]
    return None


def _projection(value: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value | None, int]:
    """``Add(MatMul(x, W), b)`` (either order) or ``MatMul(x, W)``: (x, W, b or None, out features)."""
    node = _node(value, "Add", "MatMul")
    bias = None
    if node.op_type == "Add":
        a, b = node.inputs
        if a.producer() is not None and a.producer().op_type == "MatMul" and _is_constant(b):
            matmul, bias = a.producer(), b
        elif b.producer() is not None and b.producer().op_type == "MatMul" and _is_constant(a):
            matmul, bias = b.producer(), a
        else:
            raise _Miss(f"projection {value.name} is not MatMul + constant bias")
    else:
        matmul = node
    x, weight = matmul.inputs
    if not _is_constant(weight):
        raise _Miss(f"projection weight of {value.name} is not a constant")
    dtype = weight.dtype or (weight.const_value.dtype if weight.const_value is not None else None)
    if dtype not in (None, ir.DataType.FLOAT):
        raise _Miss(f"projection weights are {dtype.name}; ONNX Runtime's CPU Attention takes float32")
    wdims = _dims(weight)
    if wdims is None or len(wdims) != 2 or not all(isinstance(d, int) for d in wdims):
        raise _Miss(f"projection weight of {value.name} is not a 2-D tensor of known shape")
    if bias is not None:
        bdims = _dims(bias)
        if bdims is None or bdims[-1:] != (wdims[1],) or any(d != 1 for d in bdims[:-1]):
            raise _Miss(f"projection bias of {value.name} is not one value per output feature")
    return x, weight, bias, wdims[1]


def _heads(value: ir.Value, perm: tuple[int, ...]) -> tuple[ir.Value, int, int]:
    """``Transpose(perm)(Reshape(proj, [B, S, N, H]))``: (proj, N, H)."""
    transpose = _node(value, "Transpose")
    if _perm(transpose) != perm:
        raise _Miss(f"{transpose.name or 'Transpose'} has perm {_perm(transpose)}, expected {perm}")
    reshape = _node(transpose.inputs[0], "Reshape")
    n, h = _split_dims(reshape)
    return reshape.inputs[0], n, h


def _split_dims(reshape: ir.Node) -> tuple[int | None, int | None]:
    """The last two dims a ``Reshape`` to rank 4 asks for (None: computed, -1 or unknown)."""
    out = reshape.outputs[0].shape
    if out is not None and out.rank() == 4 and all(isinstance(d, int) for d in out.dims[2:]):
        return out.dims[2], out.dims[3]
    target = reshape.inputs[1]
    tensor = ir.convenience.get_const_tensor(target)
    if tensor is not None:
        dims = np.asarray(tensor.numpy()).reshape(-1).tolist()
        if len(dims) != 4:
            raise _Miss(f"{reshape.name or 'Reshape'} is not to [B, S, N, H]")
        return (dims[2] if dims[2] > 0 else None), (dims[3] if dims[3] > 0 else None)
    concat = _node(target, "Concat")
    if len(concat.inputs) != 4:
        raise _Miss(f"{reshape.name or 'Reshape'} is not to [B, S, N, H]")
    parts = [_scalar(v) for v in concat.inputs[2:]]
    return tuple(int(p) if p is not None and p > 0 else None for p in parts)


def _target_rank(reshape: ir.Node) -> int | None:
    """The rank a ``Reshape`` produces, from its output shape or its target (constant or Concat)."""
    if reshape.outputs[0].shape is not None:
        return reshape.outputs[0].shape.rank()
    tensor = ir.convenience.get_const_tensor(reshape.inputs[1])
    if tensor is not None:
        return tensor.size
    concat = reshape.inputs[1].producer()
    if concat is None or concat.op_type != "Concat":
        return None
    rank = 0
    for part in concat.inputs:
        tensor = ir.convenience.get_const_tensor(part)
        dims = _dims(part)
        if tensor is not None:
            rank += tensor.size
        elif dims is not None and len(dims) == 1 and isinstance(dims[0], int):
            rank += dims[0]
        elif part.producer() is not None and part.producer().op_type == "Unsqueeze" and \
                _is_scalar(part.producer().inputs[0]):
            rank += 1
        else:
            return None
    return rank


def _is_scalar(value: ir.Value) -> bool:
    """A rank-0 value: known so, or one element of a Shape picked by a scalar index (TorchScript)."""
    if _dims(value) == ():
        return True
    node = value.producer()
    if node is None or node.op_type != "Gather" or node.inputs[0].producer() is None:
        return False
    index = ir.convenience.get_const_tensor(node.inputs[1])
    return index is not None and index.shape.rank() == 0 and node.inputs[0].producer().op_type == "Shape"


def _key_transposed(value: ir.Value) -> tuple[ir.Value, int | None, int | None]:
    """Kᵀ ``[B, N, H, S]`` in one of the three exported forms: (k projection, N, H)."""
    node = _node(value, "Transpose", "Reshape")
    if node.op_type == "Transpose" and _perm(node) == (0, 2, 3, 1):  # TorchScript: straight from [B,S,N,H]
        return _heads(value, (0, 2, 3, 1))
    if node.op_type == "Transpose" and _perm(node) == (0, 1, 3, 2):
        return _heads(node.inputs[0], (0, 2, 1, 3))
    if node.op_type == "Reshape":  # dynamo: [B,N,S,H] -> [B*N,S,H] -> [B*N,H,S] -> [B,N,H,S]
        swap = _node(node.inputs[0], "Transpose")
        inner = _node(swap.inputs[0], "Reshape")
        k4 = inner.inputs[0]
        if _perm(swap) != (0, 2, 1) or not _shape_of(node.inputs[1], k4) or not _shape_of(inner.inputs[1], k4):
            raise _Miss("key transposition is not Reshape ∘ Transpose(0,2,1) ∘ Reshape of the key heads")
        return _heads(k4, (0, 2, 1, 3))
    raise _Miss(f"key transposition {node.name or node.op_type} has perm {_perm(node)}")


def _shape_of(target: ir.Value, source: ir.Value, budget: int = 24) -> bool:
    """True when the shape tensor ``target`` is computed only from ``Shape(source)`` and constants."""
    stack, seen = [target], 0
    while stack:
        v = stack.pop()
        seen += 1
        if seen > budget:
            return False
        if ir.convenience.get_const_tensor(v) is not None:
            continue
        node = v.producer()
        if node is None:
            return False
        if node.op_type == "Shape":
            if node.inputs[0] is not source:
                return False
            continue
        if node.op_type not in ("Slice", "Concat", "Gather", "Unsqueeze", "Squeeze", "Mul", "Cast", "Identity",
                                "Constant"):
            return False
        stack.extend(i for i in node.inputs if i is not None)
    return True


def _match(softmax: ir.Node) -> _Site:
    """The self-attention around ``softmax`` (see the module docstring), or :class:`_Miss`."""
    axis = softmax.attributes.get_int("axis", -1)
    if axis not in (-1, 3):
        raise _Miss(f"Softmax over axis {axis}, not the key axis")
    # scores: [scaled] MatMul(Q, Kᵀ) [+ mask]
    scores, mask = softmax.inputs[0], None
    add = scores.producer()
    if add is not None and add.op_type == "Add" and add.domain in ("", "ai.onnx"):
        misses = []
        for side in (0, 1):
            try:
                q4, k_t, scale = _scores(add.inputs[side])
            except _Miss as miss:
                misses.append(miss)
                continue
            mask = add.inputs[1 - side]
            break
        else:
            raise _Miss(f"no side of the Add before Softmax is MatMul(Q, Kᵀ): {misses[0]}")
    else:
        q4, k_t, scale = _scores(scores)
    q_proj, n_q, h_q = _heads(q4, (0, 2, 1, 3))
    k_proj, n_k, h_k = _key_transposed(k_t)

    # probabilities: [Where(IsNaN(p), 0, p)] -> MatMul(p, V) -> [B, S, N·H]
    probs = softmax.outputs[0]
    uses = {u.node.op_type: u.node for u in probs.uses()}
    if set(uses) == {"IsNaN", "Where"} and len(probs.uses()) == 2:  # SDPA's guard for fully masked rows
        isnan, where = uses["IsNaN"], uses["Where"]
        if list(where.inputs) != [isnan.outputs[0], where.inputs[1], probs] or _scalar(where.inputs[1]) != 0.0:
            raise _Miss("probabilities pass a Where that is not Where(IsNaN(p), 0, p)")
        _only_use(isnan.outputs[0], "IsNaN result")
        probs = where.outputs[0]
    pv = _only_use(probs, "attention probabilities")
    if pv.op_type != "MatMul" or pv.inputs[0] is not probs:
        raise _Miss(f"probabilities feed {pv.op_type}, not MatMul(p, V)")
    v4 = pv.inputs[1]
    v_proj, n_v, h_v = _heads(v4, (0, 2, 1, 3))
    context = pv.outputs[0]
    back = _only_use(context, "attention context")
    if back.op_type == "Reshape":  # TorchScript: a Reshape to the same [B, N, S, H] first
        if not _same_heads(back, (context, q4, v4), n_v if n_v is not None else n_q):
            raise _Miss("the context is reshaped to something other than [B, N, S, H]")
        back = _only_use(back.outputs[0], "attention context")
    if back.op_type != "Transpose" or _perm(back) != (0, 2, 1, 3):
        raise _Miss("the context is not transposed back to [B, S, N, H]")
    merge = _only_use(back.outputs[0], "transposed context")
    if merge.op_type != "Reshape" or _target_rank(merge) != 3:
        raise _Miss("the context heads are not merged by a Reshape to [B, S, N·H]")

    # projections and heads
    (x, wq, bq, dq), (xk, wk, bk, dk), (xv, wv, bv, dv) = (_projection(p) for p in (q_proj, k_proj, v_proj))
    if not (x is xk is xv):
        raise _Miss("query, key and value are projections of different inputs (cross-attention)")
    if not dq == dk == dv:
        raise _Miss(f"query/key/value widths differ ({dq}, {dk}, {dv})")
    heads = {n for n in (n_q, n_k, n_v) if n is not None}
    sizes = {h for h in (h_q, h_k, h_v) if h is not None}
    if len(heads) > 1 or len(sizes) > 1:
        raise _Miss(f"query/key/value are split into different heads ({n_q, n_k, n_v} x {h_q, h_k, h_v})")
    if not heads and not sizes:
        raise _Miss("the number of heads is not a constant of the head Reshape")
    num_heads = heads.pop() if heads else dq // sizes.pop()
    if num_heads <= 0 or dq % num_heads or (sizes and sizes.pop() != dq // num_heads):
        raise _Miss(f"{dq} features do not split into {num_heads} heads of the head Reshape")
    head_size = dq // num_heads
    default = 1.0 / math.sqrt(head_size)
    return _Site(x, (wq, wk, wv), (bq, bk, bv), mask, num_heads, head_size,
                 None if math.isclose(scale, default, rel_tol=1e-6) else scale, merge.outputs[0])


def _same_heads(reshape: ir.Node, sources: tuple[ir.Value, ...], num_heads: int | None) -> bool:
    """A Reshape to ``[B, N, S, H]`` whose target takes dim ``i`` from dim ``i`` of one of
    ``sources`` (all ``[B, N, S, H]``) — ``Unsqueeze(Gather(Shape(src), i))`` — except one dim that
    may be -1 (then inferred as the same) and dim 1, which may be the constant ``num_heads``: a
    Reshape that changes nothing (TorchScript's)."""
    concat = reshape.inputs[1].producer()
    if concat is None or concat.op_type != "Concat" or len(concat.inputs) != 4:
        return False
    inferred = 0
    for i, part in enumerate(concat.inputs):
        if ir.convenience.get_const_tensor(part) is not None:
            value = _scalar(part)
            inferred += value == -1
            if inferred > 1 or not (value == -1 or (i == 1 and num_heads is not None and value == num_heads)):
                return False
            continue
        unsqueeze = part.producer()
        gather = unsqueeze.inputs[0].producer() if unsqueeze is not None and unsqueeze.op_type == "Unsqueeze" else None
        shape = gather.inputs[0].producer() if gather is not None and gather.op_type == "Gather" else None
        index = _scalar(gather.inputs[1]) if shape is not None else None
        if shape is None or shape.op_type != "Shape" or shape.inputs[0] not in sources or index not in (i, i - 4):
            return False
    return True


def _scores(value: ir.Value) -> tuple[ir.Value, ir.Value, float]:
    """``[Mul|Div c](MatMul([Mul|Div c] Q, [Mul|Div c] Kᵀ))``: (Q, Kᵀ, the product of the c's)."""
    inner, qk_scale = _scaled(value)
    matmul = _node(inner, "MatMul")
    _only_use(matmul.outputs[0], "raw attention scores")
    q, q_scale = _scaled(matmul.inputs[0])
    k, k_scale = _scaled(matmul.inputs[1])
    return q, k, q_scale * k_scale * qk_scale


# ---- the mask probe ---------------------------------------------------------------------------
def _probe_masks(batch: int, seq: int) -> np.ndarray:
    """Right padding, left padding with a trailing hole, and no padding."""
    masks = np.ones((batch, seq), np.int64)
    masks[0, seq // 2:] = 0
    masks[1, : seq // 3] = 0
    masks[1, -1] = 0
    return masks


class _MaskProbe:
    """Is a mask tensor the key padding mask of ``attention_mask``? (see the module docstring)"""

    def __init__(self, model: ir.Model, attention_mask: ir.Value):
        self.model = model
        self.attention_mask = attention_mask
        self.inputs = {v.name for v in model.graph.inputs}
        self._mask_only: dict[int, bool] = {}
        self._shapes: dict[int, dict[str, list[int]]] = {}

    def problem(self, mask: ir.Value) -> str | None:
        try:
            nodes, cuts, seq = self._cone(mask)
            result = self._run(mask, nodes, cuts, seq)
        except _Miss as miss:
            return str(miss)
        keep = _probe_masks(_PROBE_BATCH, seq).astype(bool)
        if result.dtype == np.bool_ or result.ndim != 4 or result.shape[0] not in (1, _PROBE_BATCH) \
                or result.shape[-1] != seq or result.shape[-2] not in (1, seq):
            return f"the mask is {result.dtype} {list(result.shape)}, not additive [B, 1|N, S, S]"
        full = np.broadcast_to(result, (_PROBE_BATCH, result.shape[1], seq, seq))
        kept = np.broadcast_to(keep[:, None, None, :], full.shape)
        if np.any(full[kept] != 0) or np.any(full[~kept] > MASK_FILL_MAX):
            return "the mask is not a key padding mask (it depends on the query position or on more than padding)"
        return None

    def _cone(self, mask: ir.Value) -> tuple[list[ir.Node], dict[ir.Node, ir.Value], int]:
        graph = self.model.graph
        order = {id(n): i for i, n in enumerate(graph)}
        nodes, cuts, seen, stack = {}, {}, set(), [mask]
        widest = 0
        while stack:
            v = stack.pop()
            if v is None or id(v) in seen or v is self.attention_mask:
                continue
            seen.add(id(v))
            node = v.producer()
            if node is None:
                if v.name in self.inputs:
                    raise _Miss(f"the mask reads the graph input {v.name}")
                tensor = v.const_value
                if tensor is None or tensor.size > _SMALL:
                    raise _Miss(f"the mask reads the weight {v.name}")
                widest = max(widest, _widest_int(tensor))
                continue
            if id(node) not in order:
                raise _Miss("the mask is computed inside a subgraph")
            if node.domain not in ("", "ai.onnx") or any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                                                        for a in node.attributes.values()):
                raise _Miss(f"the mask goes through {node.domain}::{node.op_type}")
            if node.op_type == "Shape" and not self._reads_mask_only(node.inputs[0]):
                cuts[node] = node.inputs[0]  # replaced by its value on the probe
                nodes[id(node)] = node
                continue
            if node.op_type == "Constant":
                tensor = ir.convenience.get_const_tensor(node.outputs[0])
                if tensor is None or tensor.size > _SMALL:
                    raise _Miss("the mask reads a large constant")
                widest = max(widest, _widest_int(tensor))
            nodes[id(node)] = node
            stack.extend(node.inputs)
        if widest + 2 > _PROBE_MAX_SEQ:
            raise _Miss(f"the mask has an integer constant {widest}: a window that wide cannot be probed")
        seq = max(_PROBE_MIN_SEQ, widest + 2)
        return sorted(nodes.values(), key=lambda n: order[id(n)]), cuts, seq

    def _reads_mask_only(self, value: ir.Value, budget: list[int] | None = None) -> bool:
        """True when ``value`` depends only on attention_mask, small constants and shapes."""
        budget = budget if budget is not None else [256]
        if id(value) in self._mask_only:
            return self._mask_only[id(value)]
        budget[0] -= 1
        node = value.producer()
        if value is self.attention_mask:
            ok = True
        elif budget[0] <= 0:
            return False
        elif node is None:
            ok = value.name not in self.inputs and value.const_value is not None and value.const_value.size <= _SMALL
        elif node.op_type == "Constant":
            tensor = ir.convenience.get_const_tensor(node.outputs[0])
            ok = tensor is not None and tensor.size <= _SMALL
        elif node.op_type == "Shape":  # computed on the probe, or replaced by its value there
            ok = True
        else:
            ok = all(i is None or self._reads_mask_only(i, budget) for i in node.inputs)
        self._mask_only[id(value)] = ok
        return ok

    def _concrete_shapes(self, seq: int) -> dict[str, list[int]]:
        """Shapes of every value for inputs ``[_PROBE_BATCH, seq]`` (ONNX shape inference, no weights)."""
        if seq in self._shapes:
            return self._shapes[seq]
        proto = _graph_only_proto(self.model)
        for value in proto.graph.input:
            if value.name in self.inputs:
                dims = value.type.tensor_type.shape.dim
                if len(dims) == 2:
                    for d, n in zip(dims, (_PROBE_BATCH, seq)):
                        d.Clear()
                        d.dim_value = n
        del proto.graph.value_info[:]
        try:
            inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
        except Exception as exc:  # noqa: BLE001 - any failure just means: cannot probe
            raise _Miss(f"shape inference failed on the probe shapes: {str(exc).splitlines()[0]}") from None
        shapes = {}
        for info in (*inferred.graph.value_info, *inferred.graph.input):
            dims = info.type.tensor_type.shape.dim
            if all(d.HasField("dim_value") for d in dims):
                shapes[info.name] = [d.dim_value for d in dims]
        self._shapes[seq] = shapes
        return shapes

    def _run(self, mask: ir.Value, nodes: list[ir.Node], cuts: dict[ir.Node, ir.Value], seq: int) -> np.ndarray:
        import onnxruntime as ort

        probe_nodes, initializers = [], {}
        shapes = None
        for node in nodes:
            if node in cuts:
                source = cuts[node]
                if source.name in self.inputs:
                    dims = [_PROBE_BATCH, seq]
                else:
                    shapes = shapes if shapes is not None else self._concrete_shapes(seq)
                    if source.name not in shapes:
                        raise _Miss(f"the shape of {source.name} on the probe is not known")
                    dims = shapes[source.name]
                start = node.attributes.get_int("start", 0)
                end = node.attributes.get_int("end", len(dims))
                value = onnx.numpy_helper.from_array(np.array(dims[start:end], np.int64))
                probe_nodes.append(onnx.helper.make_node("Constant", [], [node.outputs[0].name], value=value))
                continue
            probe_nodes.append(ir.serde.serialize_node(node))
            for v in node.inputs:
                if v is not None and v.producer() is None and v is not self.attention_mask:
                    initializers[v.name] = ir.serde.serialize_tensor(v.const_value)
                    initializers[v.name].name = v.name
        dtype = (self.attention_mask.dtype or ir.DataType.INT64).value
        graph = onnx.helper.make_graph(
            probe_nodes, "mask_probe",
            [onnx.helper.make_tensor_value_info(self.attention_mask.name, dtype, [_PROBE_BATCH, seq])],
            [onnx.ValueInfoProto(name=mask.name)], list(initializers.values()))
        opsets = [onnx.helper.make_opsetid(d, v) for d, v in self.model.opset_imports.items() if d in ("", "ai.onnx")]
        probe = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=self.model.ir_version or 8)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = 1
        feed = _probe_masks(_PROBE_BATCH, seq).astype(onnx.helper.tensor_dtype_to_np_dtype(dtype))
        try:
            session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
            return np.asarray(session.run(None, {self.attention_mask.name: feed})[0])
        except Exception as exc:  # noqa: BLE001 - any failure just means: cannot probe
            raise _Miss(f"the mask subgraph does not run on its own: {str(exc).splitlines()[0][:160]}") from None


def _widest_int(tensor: ir.TensorProtocol) -> int:
    """The largest |integer constant| below 1e6 (window sizes; not INT64_MAX slice ends)."""
    array = np.asarray(tensor.numpy())
    if array.dtype.kind not in "iu" or array.size == 0:
        return 0
    small = np.abs(array[np.abs(array) < 1_000_000].astype(np.int64))
    return int(small.max()) if small.size else 0


def _graph_only_proto(model: ir.Model) -> onnx.ModelProto:
    from qeff_graph.passes.manager import _graph_only_proto as graph_only

    return graph_only(model)


# ---- the pass ---------------------------------------------------------------------------------
@register(_TAG)
class ORTFuseEncoder(ir.passes.InPlacePass):
    """Fuse an encoder's self-attention into ONNX Runtime's com.microsoft.Attention (ort backend).

    Expects:
        An encoder graph: inputs ``input_ids`` and ``attention_mask`` ``[batch, sequence]``, output
        ``last_hidden_state``. Attentions that do not match the pattern in the module docstring,
        or whose mask is not a key padding mask of ``attention_mask``, are left as they are (a
        graph with none that match: ``modified=False``).
    Guarantees:
        Every matched self-attention is one ``com.microsoft.Attention`` node (``num_heads``,
        ``scale`` when not 1/√H) reading ``Cast(attention_mask, int32)`` as its raw mask, with the
        same ``last_hidden_state`` at every position ``attention_mask`` keeps (within float
        rounding); the nodes it replaced are removed (unless something else reads them); ONNX
        Runtime loads the graph (checked with the weights as inputs: no weight is read). ``stats``:
        ``attention_fused``, ``attention_left`` and ``left_because`` (reason → count).
    """

    def __init__(self) -> None:
        super().__init__()
        self.stats: dict = {}

    def requires(self, model: ir.Model) -> None:
        inputs = {v.name: v for v in model.graph.inputs}
        outputs = {v.name for v in model.graph.outputs}
        missing = [n for n in ("input_ids", "attention_mask") if n not in inputs] + \
                  ([HIDDEN] if HIDDEN not in outputs else [])
        if missing:
            raise PreconditionError(f"not an encoder graph: needs inputs input_ids, attention_mask and output "
                                    f"{HIDDEN} (missing: {', '.join(missing)})")
        mask = inputs["attention_mask"]
        if mask.dtype not in (None, ir.DataType.INT64, ir.DataType.INT32) or \
                (mask.shape is not None and mask.shape.rank() != 2):
            raise PreconditionError(f"attention_mask is {mask.dtype} of rank {mask.shape.rank() if mask.shape else '?'},"
                                    " expected integer [batch, sequence]")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        attention_mask = next(v for v in graph.inputs if v.name == "attention_mask")
        probe = _MaskProbe(model, attention_mask)
        verdicts: dict[int, str | None] = {}
        sites, left = [], Counter()
        for node in list(graph):
            if node.op_type != "Softmax" or node.domain not in ("", "ai.onnx"):
                continue
            try:
                site = _match(node)
                if site.mask is not None:
                    if id(site.mask) not in verdicts:
                        verdicts[id(site.mask)] = probe.problem(site.mask)
                    if verdicts[id(site.mask)]:
                        raise _Miss(verdicts[id(site.mask)])
                sites.append(site)
            except _Miss as miss:
                logger.info("ort-fuse-encoder: %s left as it is: %s", node.name, miss)
                left[str(miss)] += 1
        if sites:
            self._fuse(model, sites, attention_mask)
        self.stats = {"attention_fused": len(sites), "attention_left": sum(left.values())}
        if left:
            self.stats["left_because"] = dict(left)
        logger.info("ort-fuse-encoder: %d attention fused, %d left", len(sites), sum(left.values()))
        return ir.passes.PassResult(model, modified=bool(sites))

    def _fuse(self, model: ir.Model, sites: list[_Site], attention_mask: ir.Value) -> None:
        graph = model.graph
        b = Builder(graph, _TAG)
        masked = any(s.mask is not None for s in sites)
        mask_index = b.op("Cast", attention_mask, to=ir.DataType.INT32) if masked else None
        for site in sites:
            width = site.num_heads * site.head_size
            weights = b.op("Concat", *site.weights, axis=1)
            biases = [v if v is not None else b.const(np.zeros(width, np.float32)) for v in site.biases]
            bias = b.op("Concat", *biases, axis=0)
            attributes = {"num_heads": site.num_heads}
            if site.scale is not None:
                attributes["scale"] = float(site.scale)
            inputs = [site.x, weights, bias] + ([mask_index] if site.mask is not None else [])
            fused = b.op("Attention", *inputs, domain=MS_DOMAIN, **attributes)
            fused.dtype = site.output.dtype or site.x.dtype or ir.DataType.FLOAT
            if site.output.shape is not None:
                fused.shape = site.output.shape
            ir.convenience.replace_all_uses_with(site.output, fused)
            if site.output.is_graph_output():
                index = list(graph.outputs).index(site.output)
                fused.name, site.output.name = site.output.name, None
                graph.outputs[index] = fused
        b.commit()
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        graph.sort()
        common.RemoveUnusedNodesPass()(model)

    def ensures(self, model: ir.Model) -> None:
        fused = [n for n in model.graph if n.op_type == "Attention" and n.domain == MS_DOMAIN
                 and (n.name or "").startswith(f"qeff/{_TAG}/")]
        if len(fused) != self.stats.get("attention_fused", 0):
            raise ir.passes.PostconditionError(f"{len(fused)} fused Attention nodes, stats say "
                                               f"{self.stats.get('attention_fused')}")
        if not fused:
            return
        import onnxruntime as ort

        # weights become graph inputs: ORT checks the types, shapes and kernels without reading them
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        try:
            ort.InferenceSession(_graph_only_proto(model).SerializeToString(), options,
                                 providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ir.passes.PostconditionError(f"ONNX Runtime cannot load the fused graph: "
                                               f"{str(exc).splitlines()[0]}") from exc
