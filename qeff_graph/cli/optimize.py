"""``qeff-graph optimize``: rewrite a dynamic-KV ONNX export into a retained-state program."""

from __future__ import annotations

import argparse
import sys

from qeff_graph.cli.options import HelpFormatter, add, add_program_options, positive_int

HELP = "rewrite an exported ONNX causal LM into the retained-KV program directory"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "optimize", help=HELP, description=HELP + ". Writes model.onnx, specializations.json, "
        "custom_io.yaml and qeff_graph.json (manifest with the pass log) into OUT_DIR, atomically.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("model", metavar="MODEL.onnx", help="ONNX export with a dynamic KV cache "
                   "(past_key_values.* inputs, present.* outputs), from any exporter")
    add(p, "-o", "--output-dir", required=True, metavar="OUT_DIR", help="program directory to write")
    add_program_options(p)
    add(p, "--full-batch-size", type=positive_int, default=None,
        help="continuous batching: cache rows; adds the batch_index input")
    add(p, "--weight-bits", type=int, choices=[4, 8], default=None,
        help="add matmul-nbits: weight-only 4/8-bit MatMulNBits for ONNX Runtime (what --mxfp6 "
        "means on the ort backend)")
    add(p, "--passes", default=None, metavar="a,b,c",
        help="comma-separated registered pass names replacing the default pipeline "
        "(see `qeff-graph passes`)")
    add(p, "--verify", nargs="?", const="checker", choices=["checker", "ort"], default=None,
        help="verify the graph after every pass that changed it (checker: ONNX checker + shape "
        "inference; ort: also load it in ONNX Runtime)")
    add(p, "--dump-before", action="append", default=[], metavar="PASS",
        help="dump the graph (text, no weights) before this pass; repeatable")
    add(p, "--dump-after", action="append", default=[], metavar="PASS",
        help="dump the graph (text, no weights) after this pass; repeatable")
    add(p, "--dump-dir", default=None, help="where dumps go (default: OUT_DIR.dumps)")
    add(p, "--hardlink-data", action="store_true",
        help="hard-link the source's external data into OUT_DIR instead of copying it (no copy "
        "for huge models; ONNX Runtime loads it, but onnx.load/onnx.checker refuse hard links)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(run=run)


def run(args) -> int:
    from qeff_graph.passes.manager import format_log
    from qeff_graph.program import optimize

    passes = [s.strip() for s in args.passes.split(",") if s.strip()] if args.passes else None
    dump_dir = args.dump_dir or (f"{args.output_dir.rstrip('/')}.dumps"
                                 if (args.dump_before or args.dump_after) else None)
    program = optimize(
        args.model, args.output_dir, ctx_len=args.ctx_len, prompt_len=args.prompt_len,
        batch_size=args.batch_size, kv_dtype=args.kv_dtype, full_batch_size=args.full_batch_size,
        passes=passes, verify=args.verify, dump_dir=dump_dir, dump_before=args.dump_before,
        dump_after=args.dump_after, progress=not args.quiet and sys.stderr.isatty(),
        hardlink_data=args.hardlink_data, weight_bits=args.weight_bits,
    )
    if not args.quiet:
        m = program.manifest
        kv = m["kv_cache"]
        print(f"optimized {args.model} -> {program.path} in {m['seconds']:.2f}s")
        print(f"kv cache: {kv['layers']} layers, {kv['kv_heads']} kv heads, head_dim {kv['head_dim']}, "
              f"ctx_len {args.ctx_len}, {args.kv_dtype}")
        print(format_log(m["pipeline"], indent="  "))
        print("wrote: " + ", ".join(sorted(p.name for p in program.path.iterdir())))
    return 0

