"""``qeff-graph compile``: an export (or a program) ──▶ a program dir for a backend (ort | qaic).

Given a plain dynamic-KV export (no ``qeff_graph.json`` beside it) it runs ``optimize`` first;
given a program dir it reuses it, re-optimizing from the manifest's source when the shape
options differ. Tokenizer/config files beside the source are copied so ``execute`` finds them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from qeff_graph.cli.options import HelpFormatter, add, add_compression_options, add_qaic_options, positive_int

HELP = "build a program directory for a backend (ort: runnable by `execute`; qaic: qaic-exec)"
_SHAPE_DEFAULTS = {"ctx_len": 128, "prompt_len": 32, "batch_size": 1, "kv_dtype": "float32",
                   "full_batch_size": None, "weight_bits": None}


def add_parser(sub) -> None:
    p = sub.add_parser("compile", help=HELP, description=HELP + ". Shape options left out are "
                       "taken from an input program's manifest (else ctx_len 128, prompt_len 32, "
                       "batch_size 1, float32 KV).", formatter_class=HelpFormatter)
    p.add_argument("source", metavar="PROGRAM_DIR|MODEL.onnx",
                   help="a program dir from `optimize`/`compile`, or a dynamic-KV ONNX export")
    add(p, "-o", "--output-dir", required=True, metavar="DIR", help="program directory to write")
    add(p, "--backend", choices=["ort", "qaic"], default="ort", help="target backend (default: ort)")
    add(p, "--batch-size", type=positive_int, default=None, help="rows run together")
    add(p, "--prompt-len", type=positive_int, default=None, help="prefill chunk length")
    add(p, "--ctx-len", type=positive_int, default=None, help="KV cache length")
    add(p, "--full-batch-size", type=positive_int, default=None,
        help="continuous batching: cache rows (adds batch_index)")
    add(p, "--kv-dtype", choices=["float32", "float16"], default=None, help="precision of the KV IO")
    add(p, "--model-name", default=None,
        help="model name recorded in the manifest (default: the export's source)")
    add_compression_options(p)
    q = p.add_argument_group("qaic options (--backend qaic)")
    add_qaic_options(q, num_cores_help="qaic: -aic-num-cores (default 16)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(run=run)


def _resolve_source(source: str) -> tuple[Path, Path | None]:
    """(onnx file or program dir, program dir if the source is a program else None)."""
    from qeff_graph.errors import QeffGraphError
    from qeff_graph.program import MANIFEST

    path = Path(source)
    if not path.exists():
        raise QeffGraphError(f"{source} does not exist; pass a program dir or a .onnx export")
    if path.is_dir():
        if (path / MANIFEST).exists():
            return path, path
        if (path / "model.onnx").exists():
            return path / "model.onnx", None
        raise QeffGraphError(f"{source} has neither {MANIFEST} nor model.onnx; pass a program dir or a .onnx export")
    if (path.parent / MANIFEST).exists() and path.name == "model.onnx":
        return path.parent, path.parent
    return path, None


def _export_model_name(onnx_dir: Path) -> str | None:
    info = onnx_dir / "export.json"
    if info.exists():
        try:
            src = json.loads(info.read_text()).get("source")
        except (OSError, ValueError):
            return None
        return str(src) if src else None
    return None


def _write_manifest(out: Path, manifest: dict) -> None:
    from qeff_graph.program import MANIFEST

    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)


def run(args) -> int:
    from qeff_graph.errors import QeffGraphError
    from qeff_graph.program import copy_side_files, optimize, read_manifest

    qaic_only = [f for f, v in (("--num-cores", args.num_cores), ("--mos", args.mos),
                                ("--aic-enable-depth-first", args.aic_enable_depth_first),
                                ("--device-group", args.device_group and len(args.device_group) > 1))
                 if v]
    if args.backend != "qaic" and qaic_only:
        raise QeffGraphError(f"{', '.join(qaic_only)} only apply to --backend qaic")
    if args.backend == "qaic" and args.weight_bits:
        raise QeffGraphError("--weight-bits applies to --backend ort; qaic compresses weights with --mxfp6")
    given = {k: getattr(args, k) for k in _SHAPE_DEFAULTS if getattr(args, k) is not None}
    if args.backend == "ort":
        from qeff_graph.backends.ort.options import ort_program_options

        lowered, notes = ort_program_options(mxfp6=args.mxfp6, mxint8=args.mxint8,
                                             weight_bits=args.weight_bits,
                                             kv_dtype=given.get("kv_dtype", "float32"))
        if args.mxint8:
            given["kv_dtype"] = lowered["kv_dtype"]
        if lowered["weight_bits"] is not None:
            given["weight_bits"] = lowered["weight_bits"]
        for note in notes if not args.quiet else ():
            print(f"note: {note}", file=sys.stderr)
    else:
        given["weight_bits"] = None  # MatMulNBits is an ONNX Runtime op: qaic gets float weights
    source, program = _resolve_source(args.source)
    out = Path(args.output_dir)
    progress = not args.quiet and sys.stderr.isatty()
    if program is not None:
        manifest = read_manifest(program)
        options = {**_SHAPE_DEFAULTS, **manifest.get("options", {})}
        options = {k: options[k] for k in _SHAPE_DEFAULTS}
        model_name = args.model_name or manifest.get("model_name")
        src_onnx = Path(manifest.get("source", {}).get("path", ""))
        if any(options[k] != v for k, v in given.items()):
            if not src_onnx.is_file():
                raise QeffGraphError(f"{program} was built for {options} and its source "
                                     f"{src_onnx} is gone; compile from the .onnx export instead")
            options.update(given)
            action = "re-optimized"
            optimize(src_onnx, out, **options, progress=progress,
                     extra_manifest={"model_name": model_name} if model_name else None)
            copy_side_files(program, out)
        else:
            action = "copied"
            if out.resolve() != program.resolve():
                from qeff_graph import ir as qir

                with qir.atomic_dir(out) as tmp:
                    shutil.copytree(program, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("qpc", "compile.sh", "mdp.json"))
            else:
                action = "reused"
        copy_side_files(src_onnx.parent, out)
    else:
        options = {**_SHAPE_DEFAULTS, **given}
        model_name = args.model_name or _export_model_name(source.parent)
        action = "optimized"
        optimize(source, out, **options, progress=progress,
                 extra_manifest={"model_name": model_name} if model_name else None)
        copy_side_files(source.parent, out)
    manifest = read_manifest(out)
    if model_name:
        manifest["model_name"] = model_name
    if args.backend == "ort":
        manifest["backend"] = {"name": "ort"}
        _write_manifest(out, manifest)
        if not args.quiet:
            print(f"{action} {args.source} -> {out} (backend ort; run it with "
                  f"`qeff-graph execute --qpc-path {out}`)")
        return 0
    _write_manifest(out, manifest)
    from qeff_graph.backends.qaic import compile_qaic

    result = compile_qaic(out, num_cores=args.num_cores or 16, mxfp6=args.mxfp6, mxint8=args.mxint8,
                          mos=args.mos, aic_enable_depth_first=args.aic_enable_depth_first,
                          device_group=args.device_group, hw_version=args.aic_hw_version)
    if result.executed:
        print(f"compiled {out} with {result.qaic_exec}; binaries in {out / 'qpc'}")
    else:
        print(f"qaic-exec not found (Cloud AI 100 SDK not installed); the command is in {result.script}")
    return 0
