"""The program directory: what ``optimize`` (and ``compile``) write, and how it is read back.

::

    model.onnx (+ external data)   the rewritten graph
    specializations.json           prefill (seq_len=prompt_len) and decode (seq_len=1) shapes
    custom_io.yaml                 KV IO name -> precision
    qeff_graph.json                manifest: tool version, source + hash, IO contract,
                                   pipeline log, options

:func:`optimize` is the Python API behind ``qeff-graph optimize``; :func:`inspect_model`
behind ``qeff-graph inspect``. Writes are atomic (temp dir beside the target, then rename).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import onnx_ir as ir
import yaml

from qeff_graph import __version__
from qeff_graph import ir as qir
from qeff_graph.errors import QeffGraphError
from qeff_graph.passes import PassManager, build_pipeline, pipeline_names
from qeff_graph.passes.kv_retention import KV_DTYPES

__all__ = [
    "Program",
    "optimize",
    "inspect_model",
    "specializations",
    "custom_io",
    "read_manifest",
    "copy_side_files",
    "MANIFEST",
]

MANIFEST = "qeff_graph.json"
# Files that travel with a program: tokenizer and model config (execute needs them).
SIDE_FILES = ("tokenizer", "special_tokens", "vocab", "merges", "config", "generation_config",
              "chat_template", "added_tokens", "export.json")
_PRECISION = {"float32": "float", "float16": "float16"}


@dataclasses.dataclass
class Program:
    path: Path
    manifest: dict

    @property
    def onnx_path(self) -> Path:
        return self.path / "model.onnx"


def _check_options(ctx_len: int, prompt_len: int, batch_size: int, kv_dtype: str,
                   full_batch_size: int | None) -> None:
    if batch_size < 1:
        raise QeffGraphError(f"--batch-size must be >= 1, got {batch_size}")
    if prompt_len < 1:
        raise QeffGraphError(f"--prompt-len must be >= 1, got {prompt_len}")
    if ctx_len < prompt_len:
        raise QeffGraphError(
            f"--ctx-len ({ctx_len}) is smaller than --prompt-len ({prompt_len}); the prefill "
            "chunk must fit in the cache: raise --ctx-len or lower --prompt-len"
        )
    if kv_dtype not in KV_DTYPES:
        raise QeffGraphError(f"--kv-dtype {kv_dtype!r} is not supported; use float32 or float16")
    if full_batch_size is not None and full_batch_size < 1:
        raise QeffGraphError(f"--full-batch-size must be >= 1, got {full_batch_size}")


def specializations(*, ctx_len: int, prompt_len: int, batch_size: int,
                    full_batch_size: int | None = None) -> dict:
    """QEfficient's classic specializations: prefill first, decode second (values as strings)."""
    if full_batch_size:
        prefill = {"batch_size": "1", "seq_len": str(prompt_len), "ctx_len": str(ctx_len),
                   "full_batch_size": str(full_batch_size)}
        decode = {"batch_size": str(full_batch_size), "seq_len": "1", "ctx_len": str(ctx_len),
                  "full_batch_size": str(full_batch_size)}
    else:
        prefill = {"batch_size": str(batch_size), "seq_len": str(prompt_len), "ctx_len": str(ctx_len)}
        decode = {"batch_size": str(batch_size), "seq_len": "1", "ctx_len": str(ctx_len)}
    return {"specializations": [prefill, decode]}


def custom_io(model: ir.Model, kv_dtype: str) -> list[dict]:
    """``- IOName: past_key.0 / Precision: float16`` entries for every KV input and output."""
    precision = _PRECISION[kv_dtype]
    names = [v.name for v in model.graph.inputs if v.name.startswith(("past_key.", "past_value."))]
    names += [v.name for v in model.graph.outputs if v.name.endswith("_RetainedState")]
    return [{"IOName": n, "Precision": precision} for n in names]


def config_sliding_window(directory: str | os.PathLike, ctx_len: int) -> int | None:
    """The sliding window of the HF ``config.json`` in ``directory`` if it is shorter than
    ``ctx_len`` (a longer one never masks anything), else None.

    Raises when only some layers slide (``layer_types``): one window for all layers would be wrong.
    """
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    window = config.get("sliding_window")
    if not isinstance(window, int) or window >= ctx_len or config.get("use_sliding_window") is False:
        return None
    kinds = set(config.get("layer_types") or ["sliding_attention"])
    if kinds != {"sliding_attention"}:
        raise QeffGraphError(f"{path}: only some layers use a sliding window ({window}) and it is "
                             f"shorter than ctx_len {ctx_len}; mixed sliding/full attention is not "
                             f"supported yet: use --ctx-len <= {window}")
    return window


def _io_contract(model: ir.Model) -> dict:
    def describe(v: ir.Value) -> dict:
        shape = [d if isinstance(d, int) else str(d) for d in v.shape.dims] if v.shape is not None else None
        return {"name": v.name, "dtype": v.dtype.name if v.dtype is not None else None, "shape": shape}

    return {"inputs": [describe(v) for v in model.graph.inputs],
            "outputs": [describe(v) for v in model.graph.outputs]}


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def optimize(
    model: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    ctx_len: int = 128,
    prompt_len: int = 32,
    batch_size: int = 1,
    kv_dtype: str = "float32",
    full_batch_size: int | None = None,
    passes: Sequence[str] | None = None,
    verify: bool | str | None = None,
    dump_dir: str | os.PathLike | None = None,
    dump_before: Sequence[str] = (),
    dump_after: Sequence[str] = (),
    progress: bool = False,
    extra_manifest: dict | None = None,
    hardlink_data: bool = False,
    weight_bits: int | None = None,
    sliding_window: int | str | None = "auto",
) -> Program:
    """Rewrite a dynamic-KV ONNX export into a retained-state program directory.

    ``passes`` overrides the default ``retained-kv`` pipeline by registered names.
    ``weight_bits`` (4 or 8) adds ``matmul-nbits``: weight-only block-quantized MatMuls for
    ONNX Runtime (what ``--mxfp6`` maps to on the ort backend). ``sliding_window`` (tokens)
    windows the position mask; ``"auto"`` reads it from a ``config.json`` beside the model and
    applies it only when it is shorter than ``ctx_len``. The source's
    external data files are cloned (reflink or hole-preserving copy); ``hardlink_data`` hard-links
    them instead (no copy; ONNX Runtime loads them, but ``onnx.load`` refuses hard-linked data). Every
    problem with the input raises :class:`QeffGraphError` before anything is written.
    """
    _check_options(ctx_len, prompt_len, batch_size, kv_dtype, full_batch_size)
    if weight_bits not in (None, 4, 8):
        raise QeffGraphError(f"--weight-bits must be 4 or 8, got {weight_bits}")
    names = list(passes) if passes else pipeline_names(kv_dtype=kv_dtype, weight_bits=weight_bits)
    source = Path(model)
    onnx_file = source if source.suffix == ".onnx" else source / "model.onnx"
    options = dict(ctx_len=ctx_len, prompt_len=prompt_len, batch_size=batch_size,
                   kv_dtype=kv_dtype, continuous_batching=bool(full_batch_size))
    if weight_bits is not None:
        options["weight_bits"] = weight_bits
    if sliding_window == "auto":
        sliding_window = config_sliding_window(onnx_file.parent, ctx_len)
    if sliding_window is not None:
        options["sliding_window"] = int(sliding_window)
    # unknown pass names and bad pass options fail here, before any work
    manager = PassManager(build_pipeline(names, **options), verify=verify,
                          dump_dir=dump_dir, dump_before=dump_before, dump_after=dump_after,
                          progress=progress)
    started = time.perf_counter()
    graph = qir.load(source)
    kv = qir.find_kv_cache(graph)  # says clearly when there is no KV cache
    graph = manager(graph).model
    layout = qir.find_kv_cache(graph).summary()
    manifest = {
        "tool": "qeff-graph",
        "version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": {"path": str(onnx_file.resolve()), "sha256": _file_sha256(onnx_file),
                   "kv_form": "retained" if kv.retained else "dynamic"},
        "options": {"ctx_len": ctx_len, "prompt_len": prompt_len, "batch_size": batch_size,
                    "kv_dtype": kv_dtype, "full_batch_size": full_batch_size,
                    "weight_bits": weight_bits, "sliding_window": options.get("sliding_window")},
        "kv_cache": layout,
        "io": _io_contract(graph),
        "pipeline": manager.log,
        "weight_bytes": qir.weight_bytes(graph),
    }
    manifest.update(extra_manifest or {})
    spec = specializations(ctx_len=ctx_len, prompt_len=prompt_len, batch_size=batch_size,
                           full_batch_size=full_batch_size)
    out = Path(output_dir)
    with qir.atomic_dir(out) as tmp:
        try:
            qir.write_model_files(graph, tmp, hardlink=hardlink_data)
            (tmp / "specializations.json").write_text(json.dumps(spec, indent=2) + "\n")
            (tmp / "custom_io.yaml").write_text(yaml.safe_dump(custom_io(graph, kv_dtype), sort_keys=False))
            manifest["seconds"] = round(time.perf_counter() - started, 3)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        except OSError as exc:
            raise QeffGraphError(f"cannot write {out} ({exc.strerror}); choose a writable output directory") from None
    return Program(out, manifest)


def copy_side_files(src_dir: str | os.PathLike, out: str | os.PathLike) -> list[str]:
    """Copy tokenizer/config files from ``src_dir`` (an export) into program dir ``out``."""
    src_dir, out = Path(src_dir), Path(out)
    copied = []
    if not src_dir.is_dir():
        return copied
    for f in sorted(src_dir.iterdir()):
        if f.is_file() and f.name.startswith(SIDE_FILES) and not (out / f.name).exists():
            shutil.copyfile(f, out / f.name)
            copied.append(f.name)
    return copied


def read_manifest(program_dir: str | os.PathLike) -> dict:
    path = Path(program_dir) / MANIFEST
    if not path.exists():
        raise QeffGraphError(f"{program_dir} is not a qeff-graph program directory (no {MANIFEST}); run `qeff-graph optimize` first")
    return json.loads(path.read_text())


def inspect_model(model: str | os.PathLike) -> dict:
    """IO, op histogram, KV layout and weight bytes of an ONNX model (weights are not read)."""
    graph = qir.load(model)
    ops = collections.Counter(
        f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        for n in ir.traversal.RecursiveGraphIterator(graph.graph)
    )
    try:
        kv = qir.find_kv_cache(graph).summary()
    except QeffGraphError as exc:
        kv = {"error": str(exc)}
    external = qir.external_files(graph)
    return {
        "path": str(model),
        "opset_imports": dict(graph.opset_imports),
        "producer": f"{graph.producer_name or ''} {graph.producer_version or ''}".strip(),
        "io": _io_contract(graph),
        "nodes": sum(ops.values()),
        "ops": dict(ops.most_common()),
        "kv_cache": kv,
        "weight_bytes": qir.weight_bytes(graph),
        "initializers": len(graph.graph.initializers),
        "external_data_files": [os.path.relpath(f, Path(model).parent if Path(model).is_file() else model) for f in external],
    }
