"""Read back what ``matmul-nbits`` wrote: the float weight each MatMulNBits computes with.

Only the program's own initializers are used: ``B`` codes, ``scales``, ``zero_points`` (ORT's
default ``2^(bits-1)`` when absent), the 8-bit-as-two-4-bit-halves form (``Add`` of two
``MatMulNBits`` over the same A) and the ``Q4_1`` block-minimum correction (``Add(MatMulNBits, MatMul(A @ E,
mins))``), in the order ORT's definition gives: ``(q - zero_point) * scale (+ min)`` in float32.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qeff_graph.ir.io import read_tensor


def _array(value: ir.Value) -> np.ndarray:
    return read_tensor(value.const_value)


def unpack(b: np.ndarray, bits: int) -> np.ndarray:
    """``B`` ``[N, nb, blob]`` → codes ``[N, nb, block]`` (4-bit: even index in the low nibble)."""
    if bits == 8:
        return b
    return np.stack([b & 15, b >> 4], axis=-1).reshape(*b.shape[:-1], -1)


def zero_points(node: ir.Node, n: int, nb: int, bits: int) -> np.ndarray:
    if len(node.inputs) < 4 or node.inputs[3] is None:
        return np.full((n, nb), 2 ** (bits - 1), np.float32)
    zp = _array(node.inputs[3]).reshape(n, -1)
    if bits == 4:
        zp = np.stack([zp & 15, zp >> 4], axis=-1).reshape(n, -1)
    return zp[:, :nb].astype(np.float32)


def _codes_weight(node: ir.Node) -> np.ndarray:
    """``[N, K]``: ``(q - zero_point) * scale`` of one MatMulNBits, in float32."""
    b, scales = node.inputs[1:3]
    k, n = node.attributes["K"].value, node.attributes["N"].value
    bits = node.attributes["bits"].value
    q = unpack(_array(b), bits).astype(np.float32)
    nb = q.shape[1]
    w = (q - zero_points(node, n, nb, bits)[..., None]) * _array(scales).astype(np.float32).reshape(n, nb, 1)
    return w.reshape(n, -1)[:, :k]


def _halves_sum(node: ir.Node) -> tuple[ir.Node, ir.Node] | None:
    """``(Add, the other MatMulNBits)`` when ``node`` is one of two 4-bit halves of an 8-bit weight:
    ``Add(MatMulNBits(A, hi), MatMulNBits(A, lo))``."""
    for use in node.outputs[0].uses():
        user = use.node
        other = user.inputs[1 - use.idx].producer() if user.op_type == "Add" else None
        if other is not None and other is not node and other.op_type == "MatMulNBits" \
                and other.inputs[0] is node.inputs[0]:
            return user, other
    return None


def effective_weight(node: ir.Node) -> np.ndarray:
    """The ``[K, N]`` float32 weight a ``MatMulNBits`` node (with its other half and its
    correction) multiplies by; for halves, ``node`` is the first (high-nibble) one."""
    block = node.attributes["block_size"].value
    w = _codes_weight(node)
    result = node
    halves = _halves_sum(node)
    if halves is not None:  # high-nibble blocks + low-nibble blocks
        result, other = halves
        w = w + _codes_weight(other)
    correction = _correction(result)
    if correction is not None:
        w = w + np.repeat(correction[1].T, block, axis=1)[:, :w.shape[1]]
    return np.ascontiguousarray(w.T)


def _correction(node: ir.Node) -> tuple[ir.Node, np.ndarray] | None:
    """``(Add, mins [nb, N])`` of the block-minimum correction of ``node``'s output, if it has one."""
    for use in node.outputs[0].uses():
        user = use.node
        if user.op_type != "Add":
            continue
        other = user.inputs[1 - use.idx].producer()
        if other is not None and other.op_type == "MatMul" and other.inputs[1].const_value is not None:
            return user, _array(other.inputs[1])
    return None


def effective_weights(model: ir.Model) -> dict[str, np.ndarray]:
    """``{output name of the MatMul it replaced: [K, N] weight}`` for every MatMulNBits (a pair
    of 8-bit halves counts once); a packed one (several weights stacked along N, then a
    ``Split``) gives each part under its own name."""
    out = {}
    seconds = set()
    for node in model.graph:
        if node.op_type != "MatMulNBits" or node in seconds:
            continue
        halves = _halves_sum(node)
        result = node
        if halves is not None:
            seconds.add(halves[1])
            result = halves[0]
        correction = _correction(result)
        result = (correction[0] if correction else result).outputs[0]
        weight = effective_weight(node)
        split = [u.node for u in result.uses() if u.node.op_type == "Split"]
        if not split:
            out[result.name] = weight
            continue
        sizes = np.cumsum(ir.convenience.get_const_tensor(split[0].inputs[1]).numpy())[:-1]
        for value, part in zip(split[0].outputs, np.split(weight, sizes, axis=1)):
            out[value.name] = part
    return out


# bytes per block, values per block, byte offsets of the float16 scale (and minimum) fields
GGUF_LAYOUTS = {"Q5_0": (22, 32, (0,)), "Q5_1": (24, 32, (0, 2)), "Q4_K": (144, 256, (0, 2)),
                "Q5_K": (176, 256, (0, 2)), "Q6_K": (210, 256, (208,))}


def random_gguf_rows(rng, type_name: str, n: int, k: int) -> np.ndarray:
    """Random ggml blocks of ``type_name`` (``[n, bytes]``) with small positive float16 scales
    (gguf writes no K-quants itself)."""
    size, per, fields = GGUF_LAYOUTS[type_name]
    raw = rng.integers(0, 256, (n, k // per, size), dtype=np.uint8)
    for off in fields:
        raw[..., off:off + 2] = (rng.random((n, k // per)) * 0.01 + 1e-3).astype(np.float16).view(np.uint8).reshape(
            n, k // per, 2)
    return raw.reshape(n, -1)
