"""Small helpers to add nodes to an onnx_ir graph.

:class:`Builder` records new nodes on an onnx_ir tape with readable, unique names
(``qeff/<tag>/<Op>_<n>``) and appends them to the graph in one go; passes then restore
topological order with ``graph.sort()``.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx_ir as ir

__all__ = ["Builder", "QEFF_PREFIX", "add_initializer", "is_qeff_node"]

QEFF_PREFIX = "qeff/"
_counter = itertools.count()


def is_qeff_node(node: ir.Node) -> bool:
    """True for nodes that qeff-graph passes created."""
    return (node.name or "").startswith(QEFF_PREFIX)


def add_initializer(graph: ir.Graph, name: str, data: np.ndarray) -> ir.Value:
    """Register ``data`` as a new initializer of ``graph`` named ``name`` (``name_1``, ... when taken)."""
    base, i = name, 0
    while name in graph.initializers:
        i += 1
        name = f"{base}_{i}"
    value = ir.Value(name=name, shape=ir.Shape(data.shape), type=ir.TensorType(ir.DataType.from_numpy(data.dtype)),
                     const_value=ir.tensor(data, name=name))
    graph.register_initializer(value)
    return value


class Builder:
    """Create nodes for ``graph``; call :meth:`commit` to append them."""

    def __init__(self, graph: ir.Graph, tag: str):
        self.graph = graph
        self.tag = tag
        self.tape = ir.tape.Tape()

    def _name(self, op_type: str) -> str:
        return f"{QEFF_PREFIX}{self.tag}/{op_type}_{next(_counter)}"

    def op(self, op_type: str, *inputs: ir.Value | None, domain: str = "", name: str | None = None,
           **attributes) -> ir.Value:
        value = self.tape.op(op_type, list(inputs), attributes or None, domain=domain,
                             name=self._name(op_type))
        if name:
            value.name = name
        return value

    def op_multi(self, op_type: str, *inputs: ir.Value | None, num_outputs: int, domain: str = "",
                 **attributes):
        return self.tape.op_multi_out(op_type, list(inputs), attributes or None,
                                      num_outputs=num_outputs, domain=domain,
                                      name=self._name(op_type))

    def const(self, array, dtype=None) -> ir.Value:
        array = np.asarray(array, dtype=dtype)
        value = self.op("Constant", value=ir.tensor(array))
        value.dtype = ir.DataType.from_numpy(array.dtype)
        value.shape = ir.Shape(array.shape)
        return value

    def i64(self, *values: int) -> ir.Value:
        """A 1-D int64 constant."""
        return self.const(np.array(values, dtype=np.int64))

    def commit(self) -> list[ir.Node]:
        nodes = list(self.tape.nodes)
        self.graph.extend(nodes)
        self.tape = ir.tape.Tape()
        return nodes
