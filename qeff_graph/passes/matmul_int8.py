"""Lower float32 MatMuls with a constant weight to int8 compute: ``com.microsoft::DynamicQuantizeMatMul``.

``MatMul(A, W)`` with ``W`` a rank-2 float32 constant ``[K, N]`` (and A of rank >= 2), followed
or not by ``Add(·, b)`` with ``b`` a float32 constant ``[N]``, becomes::

    DynamicQuantizeMatMul(A, Wq, scales[, , b])      Wq int8 [K, N], scales float32 [N]

``W`` is quantized here, symmetric per output column (``scale[n] = max|W[:, n]| / 127``,
``Wq = round(W / scale)``, no zero point); ONNX Runtime quantizes ``A`` to uint8 per tensor at
run time (asymmetric, from its min and max) and multiplies in integers (VNNI where the CPU has
it). It is the form ONNX Runtime's own dynamic quantization gives a BERT model, and what
sentence-transformers' int8 ONNX exports run: an approximation, not an exact rewrite — the
encoder program that uses it (``--mxfp6`` / ``weight_bits=8`` on the ort backend) states its
distance from the float program (all-MiniLM-L6-v2's normalized embeddings, measured in
tests/e2e/test_encoder.py).

**Per row of the batch.** "Per tensor" over a whole batch would let one text's activations set
the scale of every other text in it: the same text embedded alone and in a batch then differed
(cosine 0.988 on all-MiniLM-L6-v2). With ``A`` of rank >= 3 each op therefore runs inside a
``Scan`` over the batch axis (its body reads the weights from the outer graph), so every row is
quantized on its own: a text's vector does not depend on its neighbours (measured: 0 difference),
and the Scan costs ~4 % (one 32x128x384 @ 384x1536 product: 6.93 against 6.66 ms).

Other MatMuls (two activations, a weight of another dtype or rank, a graph input as the weight)
are left alone. The one pass besides ``matmul-nbits`` that reads weight bytes: one matrix at a
time, through ``const_value.numpy()``; the float weight is dropped once nothing else reads it.
Whatever changes what this pass writes must bump ``qeff_graph.program.spec.WEIGHT_SCHEME`` (an
encoder program with ``weight_bits=8`` is keyed by it too).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qeff_graph.ir.build import QEFF_PREFIX, Builder, add_initializer
from qeff_graph.ir.io import read_tensor
from qeff_graph.passes.registry import register

__all__ = ["MatMulInt8", "quantize_columns"]

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
_OWN = f"{QEFF_PREFIX}matmul-int8/"


def quantize_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(Wq int8 [K, N], scales float32 [N])``: symmetric per column, ``W ≈ Wq * scales``; an
    all-zero column gets scale 1."""
    scales = (np.abs(w).max(axis=0) / 127.0).astype(np.float32)
    scales[scales == 0] = 1.0
    q = np.clip(np.rint(w / scales), -127, 127).astype(np.int8)
    return q, scales


def _weight(node: ir.Node) -> ir.Value | None:
    """The constant float32 ``[K, N]`` weight of a plain ``MatMul(A, W)``, else None."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    a, w = node.inputs
    if a is None or w is None or w.is_graph_input() or (a.shape is not None and a.shape.rank() < 2):
        return None
    if a.dtype not in (None, ir.DataType.FLOAT):
        return None
    tensor = ir.convenience.get_const_tensor(w)
    if tensor is None or tensor.dtype != ir.DataType.FLOAT or len(tensor.shape) != 2:
        return None
    return w


def _bias(node: ir.Node, n: int) -> tuple[ir.Node, ir.Value] | None:
    """``(Add, b)`` when the MatMul's only use is ``Add(y, b)`` with ``b`` a float32 constant ``[N]``."""
    y = node.outputs[0]
    uses = y.uses()
    if len(uses) != 1 or y.is_graph_output():
        return None
    add, idx = uses[0].node, uses[0].idx
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None
    b = add.inputs[1 - idx]
    tensor = ir.convenience.get_const_tensor(b) if b is not None else None
    if tensor is None or tensor.dtype != ir.DataType.FLOAT or tuple(tensor.shape) != (n,):
        return None
    return add, b


@register("matmul-int8")
class MatMulInt8(ir.passes.InPlacePass):
    """Float32 MatMuls with a constant weight (and their bias Add) → DynamicQuantizeMatMul
    (int8 weights per column, activations quantized at run time).

    Expects:
        Main-graph ``MatMul(A, W)`` with ``W`` a rank-2 float32 constant and A float32 of rank
        >= 2; other MatMuls (and subgraphs) are left alone.
    Guarantees:
        No such MatMul is left; each became one ``DynamicQuantizeMatMul`` (in a ``Scan`` over the
        batch axis when A has one) writing the value the MatMul (or its bias ``Add``) wrote, with
        an int8 ``[K, N]`` weight and ``[N]`` scales (checked on shapes); float weights nothing
        else reads are removed; ``com.microsoft`` v1 is imported. ``stats``: ``quantized``,
        ``with_bias``, ``bytes_before``, ``bytes_after``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stats: dict[str, int] = {}

    def ensures(self, model: ir.Model) -> None:
        left = [n.name for n in model.graph if _weight(n) is not None]
        if left:
            raise ir.passes.PostconditionError(f"matmul-int8 left {len(left)} MatMul(s) in float: {left[:3]}")
        for node in ir.traversal.RecursiveGraphIterator(model.graph):  # the Scan bodies too
            if node.op_type != "DynamicQuantizeMatMul" or not (node.name or "").startswith(_OWN):
                continue
            w, scales = node.inputs[1], node.inputs[2]
            dims = tuple(w.shape.numpy()) if w.shape is not None else ()
            if w.dtype != ir.DataType.INT8 or len(dims) != 2 or scales.shape is None \
                    or tuple(scales.shape.numpy()) != (dims[1],):
                raise ir.passes.PostconditionError(f"DynamicQuantizeMatMul {node.name}: weight {w.dtype} {dims}, "
                                                   f"scales {scales.shape}: need int8 [K, N] and [N]")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.stats = {"quantized": 0, "with_bias": 0, "bytes_before": 0, "bytes_after": 0}
        graph = model.graph
        b = Builder(graph, "matmul-int8")
        made: dict[int, tuple[ir.Value, ir.Value]] = {}  # id(W) -> (Wq, scales): a shared weight once
        for node in list(graph):
            w = _weight(node)
            if w is None:
                continue
            if id(w) not in made:
                array = read_tensor(ir.convenience.get_const_tensor(w))
                q, scales = quantize_columns(np.asarray(array, np.float32))
                made[id(w)] = (self._init(graph, f"{w.name or 'weight'}_int8", q),
                               self._init(graph, f"{w.name or 'weight'}_int8_scales", scales))
                self.stats["bytes_before"] += array.nbytes
            wq, scales = made[id(w)]
            bias = _bias(node, int(scales.shape[0]))
            y = self._per_row(b, node.inputs[0], [wq, scales] + ([None, bias[1]] if bias else []))
            last = bias[0] if bias else node  # the node whose output y takes over
            old = last.outputs[0]
            y.dtype, y.shape = ir.DataType.FLOAT, old.shape
            b.commit()
            ir.convenience.replace_all_uses_with(old, y, replace_graph_outputs=True)
            graph.remove([last, node] if bias else [node], safe=True)
            y.name = old.name
            self.stats["quantized"] += 1
            self.stats["with_bias"] += bool(bias)
            if not w.uses() and w.is_initializer() and not w.is_graph_output():
                graph.initializers.pop(w.name)
        if made:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            graph.sort()
        logger.info("matmul-int8: %d MatMuls (%d with their bias), %d -> %d bytes", self.stats["quantized"],
                    self.stats["with_bias"], self.stats["bytes_before"], self.stats["bytes_after"])
        return ir.passes.PassResult(model, modified=bool(made))

    def _per_row(self, b: Builder, a: ir.Value, rest: list) -> ir.Value:
        """``DynamicQuantizeMatMul(a, *rest)``, inside a Scan over ``a``'s first axis when ``a`` has
        a batch axis (rank >= 3, or unknown rank: refused by the Scan's body at load otherwise)."""
        rank = a.shape.rank() if a.shape is not None else None
        if rank == 2:
            return b.op("DynamicQuantizeMatMul", a, *rest, domain=MS_DOMAIN)
        row = ir.Value(name=f"{_OWN}row_{self.stats['quantized']}", type=ir.TensorType(ir.DataType.FLOAT))
        body = ir.tape.Tape()
        out = body.op("DynamicQuantizeMatMul", [row, *rest], domain=MS_DOMAIN,
                      name=f"{_OWN}DynamicQuantizeMatMul_{self.stats['quantized']}")
        out.name, out.dtype = f"{_OWN}row_out_{self.stats['quantized']}", ir.DataType.FLOAT
        graph = ir.Graph([row], [out], nodes=body.nodes, name=f"matmul_int8_row_{self.stats['quantized']}")
        return b.op("Scan", a, body=graph, num_scan_inputs=1)

    def _init(self, graph: ir.Graph, name: str, data: np.ndarray) -> ir.Value:
        self.stats["bytes_after"] += data.nbytes
        return add_initializer(graph, name, data)
