"""``qeff-graph inspect``: IO, op histogram, KV layout and weight bytes (weights are not read)."""

from __future__ import annotations

import collections
import os
from pathlib import Path

import onnx_ir as ir

from qeff_graph import ir as qir
from qeff_graph.errors import QeffGraphError
from qeff_graph.program.build import _io_contract

__all__ = ["inspect_model"]


def inspect_model(model: str | os.PathLike) -> dict:
    """IO, op histogram, KV layout, attention sites and weight bytes of an ONNX model (weights are
    not read)."""
    graph = qir.load(model)
    ops = collections.Counter(
        f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        for n in ir.traversal.RecursiveGraphIterator(graph.graph)
    )
    try:
        found = qir.find_kv_cache(graph)
        kv = found.summary()
    except QeffGraphError as exc:
        found, kv = None, {"error": str(exc)}
    attention: list[dict] | dict = []
    if found is not None:
        from qeff_graph.ir.attention import find_attention_sites

        try:  # what position-mask would rewrite, or why it would refuse
            attention = [site.describe() for site in find_attention_sites(graph, found)]
        except QeffGraphError as exc:
            attention = {"error": str(exc)}
    external = qir.external_files(graph)
    base = Path(model).parent if Path(model).is_file() else Path(model)
    return {
        "path": str(model),
        "opset_imports": dict(graph.opset_imports),
        "producer": f"{graph.producer_name or ''} {graph.producer_version or ''}".strip(),
        "io": _io_contract(graph),
        "nodes": sum(ops.values()),
        "ops": dict(ops.most_common()),
        "kv_cache": kv,
        "attention": attention,
        "weight_bytes": qir.weight_bytes(graph),
        "initializers": len(graph.graph.initializers),
        "external_data_files": [os.path.relpath(f, base) for f in external],
    }
