"""Tidy the graph with onnx_ir's common passes after a rewrite.

Runs, in order: identity elimination, common-subexpression elimination, removal of unused
nodes/initializers, functions and opsets, and a topological sort. None of these reads weight
bytes (initializer deduplication, which would, is deliberately not included).
"""

from __future__ import annotations

import logging

import onnx_ir as ir
from onnx_ir.passes import common

from qeff_graph.passes.registry import register

__all__ = ["Cleanup"]

logger = logging.getLogger(__name__)


@register("cleanup")
class Cleanup(ir.passes.InPlacePass):
    """Remove dead nodes, duplicate subexpressions and unused functions/opsets; sort.

    Expects: any valid graph.
    Guarantees: same outputs; no node whose outputs are unused; topologically sorted; graph
    inputs/outputs and their names unchanged.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = sum(1 for _ in model.graph)
        initializers = len(model.graph.initializers)
        result = ir.passes.Sequential(
            common.IdentityEliminationPass(),
            common.CommonSubexpressionEliminationPass(),
            common.RemoveUnusedNodesPass(),
            common.RemoveUnusedFunctionsPass(),
            common.RemoveUnusedOpsetsPass(),
            common.TopologicalSortPass(),
        )(model)
        after = sum(1 for _ in model.graph)
        self.stats = {
            "nodes_removed": before - after,
            "initializers_removed": initializers - len(model.graph.initializers),
        }
        return ir.passes.PassResult(model, modified=result.modified)
