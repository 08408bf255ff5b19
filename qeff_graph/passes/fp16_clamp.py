"""Clip float32/float64 constants into the finite float16 range (``fp16-clamp``).

Like QEfficient's ``FP16ClipTransform``, so that a graph compiled with ``-convert-to-fp16`` does
not turn large weights or mask fill values (``torch.finfo(float32).min``) into ``-inf`` — which
then produce NaN in ``Softmax`` for fully masked rows. Besides initializers (main graph and
subgraphs) it clips the tensors that exporters use for mask fills: ``Constant`` nodes (``value``,
``value_float``, ``value_floats``) and ``ConstantOfShape`` ``value`` attributes, in the graph, its
subgraphs and model-local functions.

External-data initializers are scanned in chunks straight from their file; only a tensor that
needs clipping is loaded and replaced (by an in-memory tensor of the same name).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qeff_graph.passes.registry import register

__all__ = ["FP16Clamp", "FP16_MAX"]

logger = logging.getLogger(__name__)

FP16_MAX = float(np.finfo(np.float16).max)  # 65504.0
_FLOATS = (ir.DataType.FLOAT, ir.DataType.DOUBLE)
_ONNX = ("", "ai.onnx")


@register("fp16-clamp")
class FP16Clamp(ir.passes.InPlacePass):
    """Clip fp32/fp64 initializers and constants (incl. mask fills) into the fp16 range ±65504.

    Finite values beyond ±65504 become ±65504. Genuine ±inf are kept when ``keep_inf`` (the
    default: QEfficient keeps them so ``-inf`` masks survive) and clipped otherwise; NaN is left
    alone. ``chunk_bytes`` is the read size when scanning external-data tensors.

    Expects:
        Nothing; graphs without float32/float64 constants are left unchanged.
    Guarantees:
        Every float32/float64 initializer, ``Constant`` and ``ConstantOfShape`` value in the model
        (subgraphs and functions included) lies in [-65504, 65504], or is ±inf (``keep_inf``) or
        NaN. Initializer names are kept; external tensors with nothing to clip stay external and
        unread. ``stats``: ``tensors_changed``, ``values_clipped``.
    """

    def __init__(self, *, keep_inf: bool = True, chunk_bytes: int = 64 << 20):
        super().__init__()
        self.keep_inf = keep_inf
        self.chunk_bytes = chunk_bytes
        self.stats: dict[str, int] = {}

    # -- what needs clipping ---------------------------------------------------------------
    def _mask(self, array: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            out = np.abs(array) > FP16_MAX  # False for NaN
        if self.keep_inf:
            out &= np.isfinite(array)
        return out

    def _clip(self, array: np.ndarray) -> tuple[np.ndarray, int]:
        mask = self._mask(array)
        n = int(np.count_nonzero(mask))
        if n:
            array = np.array(array, copy=True)
            array[mask] = np.copysign(FP16_MAX, array[mask])
        return array, n

    def _external_needs_clip(self, tensor: ir.ExternalTensor) -> bool:
        """Scan the tensor's bytes in chunks without loading it whole."""
        dtype = np.dtype(tensor.dtype.numpy()).newbyteorder("<")
        remaining = tensor.size * dtype.itemsize
        step = max(dtype.itemsize, self.chunk_bytes // dtype.itemsize * dtype.itemsize)
        with open(tensor.path, "rb") as f:
            f.seek(tensor.offset or 0)
            while remaining > 0:
                data = f.read(min(step, remaining))
                if not data:
                    break
                remaining -= len(data)
                if self._mask(np.frombuffer(data, dtype=dtype)).any():
                    return True
        return False

    def _clipped_tensor(self, tensor: ir.TensorProtocol) -> tuple[ir.Tensor | None, int]:
        """A clipped copy of ``tensor`` (same name), or ``(None, 0)`` if nothing to clip."""
        if tensor.dtype not in _FLOATS or tensor.size == 0:
            return None, 0
        if isinstance(tensor, ir.ExternalTensor) and tensor.raw is None:
            if not self._external_needs_clip(tensor):
                return None, 0
        array, n = self._clip(tensor.numpy())
        if not n:
            return None, 0
        return ir.tensor(array, dtype=tensor.dtype, name=tensor.name), n

    # -- rewriting ---------------------------------------------------------------------------
    def _count(self, n: int) -> None:
        if n:
            self.stats["tensors_changed"] += 1
            self.stats["values_clipped"] += n

    def _fix_initializers(self, graph: ir.Graph) -> None:
        for value in graph.initializers.values():
            if value.const_value is None:
                continue
            new, n = self._clipped_tensor(value.const_value)
            if new is not None:
                value.const_value = new
                self._count(n)

    def _fix_node(self, node: ir.Node) -> None:
        if node.op_type not in ("Constant", "ConstantOfShape") or node.domain not in _ONNX:
            return
        for name, attr in list(node.attributes.items()):
            if attr.is_ref():
                continue
            new_attr, n = None, 0
            if name == "value" and attr.type == ir.AttributeType.TENSOR:
                new, n = self._clipped_tensor(attr.as_tensor())
                if new is not None:
                    new_attr = ir.AttrTensor(name, new)
            elif node.op_type == "Constant" and name in ("value_float", "value_floats"):
                array, n = self._clip(np.asarray(attr.value, dtype=np.float32))
                if n:
                    new_attr = (ir.AttrFloat32(name, float(array)) if name == "value_float"
                                else ir.AttrFloat32s(name, array.tolist()))
            if new_attr is None:
                continue
            node.attributes[name] = new_attr
            self._count(n)
            out = node.outputs[0]
            if node.op_type == "Constant" and out.const_value is not None:
                out.const_value = new_attr.value if name == "value" else ir.tensor(
                    np.asarray(new_attr.value, dtype=np.float32))

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.stats = {"tensors_changed": 0, "values_clipped": 0}
        for graph in model.graphs():
            self._fix_initializers(graph)
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            self._fix_node(node)
        for function in model.functions.values():
            for node in ir.traversal.RecursiveGraphIterator(function):
                self._fix_node(node)
        logger.info("fp16-clamp: %d tensors changed, %d values clipped",
                    self.stats["tensors_changed"], self.stats["values_clipped"])
        return ir.passes.PassResult(model, modified=self.stats["tensors_changed"] > 0)
