"""``qeff-graph compile``: an export (or a program) ──▶ a program dir for a backend (ort | qaic).

Given a plain dynamic-KV export it builds the program; given a program dir it keeps that
program's options except the flags given, reusing its graph when only shapes or backend
options change and rebuilding from its recorded source otherwise. Everything goes through
:func:`qeff_graph.program.build_program` (one atomic write, tokenizer/config included).
"""

from __future__ import annotations

from pathlib import Path

from qeff_graph.cli.options import (
    HelpFormatter,
    add,
    add_compression_options,
    add_program_options,
    add_qaic_options,
    positive_ints,
    spec_options,
)

HELP = "build a program directory for a backend (ort: runnable by `execute`; qaic: qaic-exec)"
# kept from an input program when the backend changes: what the program is, not how it is compiled
_PORTABLE = ("ctx_len", "prompt_len", "batch_size", "full_batch_size", "kv_dtype", "passes", "sliding_window", "kind",
             "seq_lens", "pooling", "normalize", "num_speculative_tokens")


def add_parser(sub) -> None:
    p = sub.add_parser("compile", help=HELP, description=HELP + ". Options left out are taken from an "
                       "input program's manifest, else from the defaults. DIR must be new, empty or an "
                       "earlier program (replaced whole); anything else is refused.",
                       formatter_class=HelpFormatter)
    p.add_argument("source", metavar="PROGRAM_DIR|MODEL.onnx",
                   help="a program dir from `optimize`/`compile`, or a dynamic-KV ONNX export (file or folder)")
    add(p, "-o", "--output-dir", required=True, metavar="DIR", help="program directory to write")
    add(p, "--backend", choices=["ort", "qaic"], default=None, help="target backend (default: ort)")
    add_program_options(p, inherit="or the input program's")
    add(p, "--model-name", default=None,
        help="model name recorded in the manifest (default: the export's source)")
    add_compression_options(p)
    add(p, "--hardlink-data", action="store_true",
        help="hard-link the weight file instead of copying it (ONNX Runtime loads it; onnx.load refuses)")
    e = p.add_argument_group("encoder options (an encoder export or program)")
    add(e, "--seq-len", type=positive_ints, default=None, metavar="128",
        help="sequence-length specializations, e.g. 32,128 (default: 128, or the input program's)")
    add(e, "--pooling", choices=["mean", "cls", "max"], default=None, help="append pooling to the graph")
    add(e, "--normalize", action="store_true", help="L2-normalize the pooled vectors")
    q = p.add_argument_group("backend options")
    add_qaic_options(q, num_cores_help="qaic: -aic-num-cores (default 16); ort: CPU threads the program "
                     "runs with, capped at the cores available")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(run=run)


def _export_kind(directory: Path) -> str | None:
    from qeff_graph.artifact import read_json
    from qeff_graph.errors import QeffGraphError

    try:
        return read_json(directory / "export.json", "export manifest").get("kind")
    except QeffGraphError:
        return None


def _export_model_name(directory: Path) -> str | None:
    from qeff_graph.artifact import read_json
    from qeff_graph.errors import QeffGraphError

    try:
        src = read_json(directory / "export.json", "export manifest").get("source")
    except QeffGraphError:
        return None
    return str(src) if src else None


def run(args) -> int:
    from qeff_graph import progress
    from qeff_graph.program import ProgramSpec, build_program, resolve_source

    src = resolve_source(args.source)
    given = spec_options(args)
    encoder = {k: v for k, v in (("seq_lens", args.seq_len), ("pooling", args.pooling),
                                 ("normalize", args.normalize or None)) if v is not None}
    base = {}
    if src.program is not None:
        base = src.program.spec.to_dict()
        if given.get("backend", "ort") != base["backend"]:
            base = {k: base[k] for k in _PORTABLE}
    elif encoder or _export_kind(src.side_dir) == "encoder":
        base = {"kind": "encoder"}
    given.update(encoder)
    spec = ProgramSpec.from_dict({**base, **given})
    for note in spec.notes():
        progress.say(f"note: {note}")
    model_name = args.model_name or (None if src.program else _export_model_name(src.side_dir))
    program = build_program(args.source, spec, args.output_dir, model_name=model_name,
                            hardlink_data=args.hardlink_data)
    out = Path(args.output_dir)
    if spec.backend == "ort":
        if not args.quiet:
            how = (f"run it with `qeff-graph execute --qpc-path {out}`" if spec.kind == "causal-lm"
                   else "an encoder program: EncoderSession runs it; `qeff-graph embed` builds the same in its cache")
            print(f"{program.action} {args.source} -> {out} (backend ort; {how})")
        return 0
    backend = program.manifest["backend"]
    if backend["executed"]:
        print(f"compiled {out} with {backend['qaic_exec']}; binaries in {out / 'qpc'}")
    else:
        print(f"qaic-exec not found (Cloud AI 100 SDK not installed); the command is in "
              f"{out.resolve() / 'compile.sh'}")
    return 0
