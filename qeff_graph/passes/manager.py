"""The pass manager: runs passes in order and carries the cross-cutting concerns.

Built on ``onnx_ir.passes.PassManager`` (so it is itself a pass and can be nested), it adds:

* instrumentation — per pass: wall time, node count before/after, ``modified``, the pass's
  ``stats`` and constructor parameters, collected in :attr:`PassManager.log` (written into the
  program manifest ``qeff_graph.json``);
* verification between passes (skipped when a pass changed nothing): ``"checker"`` runs the
  ONNX checker and strict-free shape inference on the graph (no weight bytes are read);
  ``"ort"`` additionally builds an ONNX Runtime session from the model;
* dumps of the graph (text, without initializers) before/after named passes, and of the graph
  before a pass that failed.

Each pass's ``requires``/``ensures`` (onnx_ir's hooks) run around it: a failed ``requires`` is
the graph's fault and becomes a one-line :class:`QeffGraphError` naming the pass; a failed
``ensures`` is a bug of the pass and raises ``PassError`` with a dump. A failing pass raises with
its name; user-facing problems (:class:`QeffGraphError`) pass through unchanged so the CLI can
print them as one line.
"""

from __future__ import annotations

import inspect
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import onnx
import onnx_ir as ir

from qeff_graph.errors import QeffGraphError

__all__ = ["PassManager", "VerificationError", "format_log", "pass_name", "pass_params"]

logger = logging.getLogger(__name__)


class VerificationError(QeffGraphError):
    """The graph failed verification after a pass."""


def pass_name(p: ir.passes.PassBase) -> str:
    return getattr(p, "pass_name", None) or type(p).__name__


def pass_params(p: ir.passes.PassBase) -> dict:
    """Constructor parameters of ``p`` read back from same-named attributes."""
    params = {}
    for name in inspect.signature(type(p).__init__).parameters:
        if name != "self" and hasattr(p, name):
            value = getattr(p, name)
            if isinstance(value, (int, float, str, bool, type(None), list, tuple)):
                params[name] = list(value) if isinstance(value, tuple) else value
    return params


def format_log(log: list[dict], indent: str = "") -> str:
    """A pass log (``PassManager.log`` or a manifest's ``pipeline``) as a table."""
    lines = [f"{indent}{'pass':<22} {'time (s)':>9} {'nodes':>13}  stats"]
    for e in log:
        delta = f"{e['nodes_before']}->{e['nodes_after']}"
        stats = ", ".join(f"{k}={v}" for k, v in e["stats"].items())
        lines.append(f"{indent}{e['pass']:<22} {e['seconds']:>9.3f} {delta:>13}  {stats}")
    return "\n".join(lines)


def _node_count(model: ir.Model) -> int:
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))


# ONNX Runtime contrib ops that ORT registers in the default ONNX domain (custom-rmsnorm's "ort" target)
ORT_ONNX_DOMAIN_OPS = frozenset({"SimplifiedLayerNormalization"})


def check_onnx(model: onnx.ModelProto | str | os.PathLike, *, shapes: bool = False) -> None:
    """The ONNX checker (and with ``shapes`` strict-type shape inference) on a graph or a program's
    ``model.onnx`` (its external data is not read), with the ONNX Runtime kernels that ORT
    registers in the ONNX domain (:data:`ORT_ONNX_DOMAIN_OPS`) checked as the contrib ops they
    are: an ORT-lowered program is valid ONNX for ONNX Runtime, not for other runtimes."""
    if isinstance(model, onnx.ModelProto):
        checked = onnx.ModelProto()
        checked.CopyFrom(model)
    else:  # the graph only: weights become typed inputs (their bytes are not read)
        checked = onnx.load(os.fspath(model), load_external_data=False)
        _initializers_as_inputs(checked.graph)
    for node in checked.graph.node:
        if node.domain in ("", "ai.onnx") and node.op_type in ORT_ONNX_DOMAIN_OPS:
            node.domain = "com.microsoft"  # the checker leaves contrib domains to their runtime
            if not any(o.domain == node.domain for o in checked.opset_import):
                checked.opset_import.append(onnx.helper.make_opsetid(node.domain, 1))
    onnx.checker.check_model(checked)
    if shapes:
        onnx.shape_inference.infer_shapes(checked, check_type=True, strict_mode=False)


def _graph_only_proto(model: ir.Model) -> onnx.ModelProto:
    """The model's proto with initializers turned into typed graph inputs (no weight bytes)."""
    proto = ir.to_proto(model)
    _initializers_as_inputs(proto.graph)
    return proto


def _initializers_as_inputs(graph: onnx.GraphProto) -> None:
    existing = {i.name for i in graph.input}
    for tensor in graph.initializer:
        if tensor.name not in existing:
            graph.input.append(
                onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
            )
    del graph.initializer[:]


class PassManager(ir.passes.PassManager):
    """Run ``passes`` in order with timing, node deltas, optional verification and dumps.

    Args:
        passes: pass instances (or registered names, created with ``options``).
        verify: ``None``/``False``, ``"checker"`` (or ``True``) or ``"ort"``.
        dump_dir: where dumps go (default: ``<tmp>/qeff-graph-dumps``; never the current folder).
        dump_before / dump_after: pass names whose input/output graph is dumped as text.
        options: constructor options for passes given by name.
    """

    def __init__(
        self,
        passes: Sequence[ir.passes.PassBase | str],
        *,
        verify: bool | str | None = None,
        dump_dir: str | os.PathLike | None = None,
        dump_before: Iterable[str] = (),
        dump_after: Iterable[str] = (),
        progress: bool = False,
        **options,
    ):
        from qeff_graph.passes import registry

        built = [registry.create(p, **options) if isinstance(p, str) else p for p in passes]
        super().__init__(built)
        self.verify = "checker" if verify is True else (verify or None)
        if self.verify not in (None, "checker", "ort"):
            raise QeffGraphError(f"verify={verify!r} is not one of checker, ort")
        self.dump_dir = Path(dump_dir) if dump_dir else Path(tempfile.gettempdir()) / "qeff-graph-dumps"
        self.dump_before = set(dump_before)
        self.dump_after = set(dump_after)
        self.progress = progress
        self.log: list[dict] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified_any = False
        self.log = []
        passes = self.passes
        from qeff_graph import progress

        bar = progress.bar(len(passes), "optimize") if self.progress else None
        for p in passes:
            name = pass_name(p)
            progress.checkpoint(f"pass:{name}")
            if bar is not None:
                bar.set_postfix_str(name)
            if name in self.dump_before:
                self._dump(model, f"before-{name}")
            before = _node_count(model)
            start = time.perf_counter()
            try:
                result = p(model)
            except ir.passes.PreconditionError as exc:
                raise QeffGraphError(f"pass {name!r} cannot run on this graph: {exc}") from exc
            except QeffGraphError:
                raise
            except ir.passes.PostconditionError as exc:  # a pass broke its own guarantee: a bug
                dump = self._dump(model, f"broken-{name}")
                raise ir.passes.PassError(f"pass {name!r} did not ensure what it promises: {exc} "
                                          f"(graph dumped to {dump})") from exc
            except Exception as exc:
                dump = self._dump(model, f"failed-{name}")
                raise ir.passes.PassError(
                    f"pass {name!r} failed: {type(exc).__name__}: {exc} (graph dumped to {dump})"
                ) from exc
            seconds = time.perf_counter() - start
            model = result.model
            modified_any |= result.modified
            entry = {
                "pass": name,
                "params": pass_params(p),
                "seconds": round(seconds, 4),
                "nodes_before": before,
                "nodes_after": _node_count(model),
                "modified": bool(result.modified),
                "stats": dict(getattr(p, "stats", {}) or {}),
            }
            if self.verify and result.modified:
                vstart = time.perf_counter()
                self._verify(model, name)
                entry["verify_seconds"] = round(time.perf_counter() - vstart, 4)
            self.log.append(entry)
            logger.info("%s: %.3fs, nodes %d -> %d, %s", name, seconds, before,
                        entry["nodes_after"], entry["stats"])
            if name in self.dump_after:
                self._dump(model, f"after-{name}")
            if bar is not None:
                bar.update()
        if bar is not None:
            bar.close()
        return ir.passes.PassResult(model, modified_any)

    def report(self) -> str:
        """A table of the last run: pass, seconds, node delta, stats."""
        return format_log(self.log)

    def _dump(self, model: ir.Model, tag: str) -> Path:
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        path = self.dump_dir / f"{tag}.onnx.txt"
        try:
            path.write_text(ir.to_onnx_text(model, exclude_initializers=True))
        except Exception as exc:  # the graph may be broken: dump what the IR prints
            path.write_text(f"# to_onnx_text failed: {exc}\n{model}")
        return path

    def _verify(self, model: ir.Model, name: str) -> None:
        proto = _graph_only_proto(model)
        try:
            check_onnx(proto, shapes=True)
        except Exception as exc:
            dump = self._dump(model, f"invalid-after-{name}")
            raise VerificationError(
                f"graph is invalid after pass {name!r}: {str(exc).splitlines()[0]} "
                f"(dumped to {dump})"
            ) from exc
        if self.verify == "ort":
            import onnxruntime as ort

            # Weights are graph inputs here: ORT checks types and kernels without reading bytes.
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            options.log_severity_level = 3
            try:
                ort.InferenceSession(proto.SerializeToString(), options,
                                     providers=["CPUExecutionProvider"])
            except Exception as exc:
                raise VerificationError(
                    f"ONNX Runtime cannot load the graph after pass {name!r}: "
                    f"{str(exc).splitlines()[0]}"
                ) from exc
