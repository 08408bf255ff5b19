"""``qeff-graph optimize``: rewrite a dynamic-KV ONNX export into a retained-state program."""

from __future__ import annotations

from qeff_graph.cli.options import (
    HelpFormatter,
    add,
    add_accuracy_level,
    add_program_options,
    spec_options,
)

HELP = "rewrite an exported ONNX causal LM into the retained-KV program directory"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "optimize", help=HELP, description=HELP + ". Writes model.onnx (+ data), specializations.json, "
        "custom_io.yaml, the tokenizer/config files found beside the model and qeff_graph.json (manifest: "
        "options, pass log, every file's size and SHA-256) into OUT_DIR as one atomic folder. OUT_DIR must "
        "be new, empty or an earlier program (which is replaced whole); anything else is refused.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("model", metavar="MODEL.onnx", help="ONNX export with a dynamic KV cache "
                   "(past_key_values.* inputs, present.* outputs), from any exporter, or its folder")
    add(p, "-o", "--output-dir", required=True, metavar="OUT_DIR", help="program directory to write")
    add_program_options(p)
    add(p, "--weight-bits", type=int, choices=[4, 8], default=None,
        help="add matmul-nbits: weight-only 4/8-bit MatMulNBits for ONNX Runtime (what --mxfp6 "
        "means on the ort backend); 4 on an export of a GGUF model carries the GGUF's own blocks")
    add_accuracy_level(p)
    add(p, "--passes", default=None, metavar="a,b,c",
        help="comma-separated registered pass names replacing the default pipeline "
        "(see `qeff-graph passes`)")
    add(p, "--verify", nargs="?", const="checker", choices=["checker", "ort", "numeric"], default=None,
        help="verify the graph after every pass that changed it (checker: ONNX checker + shape "
        "inference; ort: also load it in ONNX Runtime); numeric: checker, then run the finished "
        "program against the source export on 4 prompts × 8 tokens (as `qeff-graph verify`) and "
        "write nothing unless every token is equal and logits are within 1e-4")
    add(p, "--dump-before", action="append", default=[], metavar="PASS",
        help="dump the graph (text, no weights) before this pass of the pipeline; repeatable")
    add(p, "--dump-after", action="append", default=[], metavar="PASS",
        help="dump the graph (text, no weights) after this pass of the pipeline; repeatable")
    add(p, "--dump-dir", default=None, help="where dumps go (default: OUT_DIR.dumps)")
    add(p, "--hardlink-data", action="store_true",
        help="hard-link the source's external data into OUT_DIR instead of copying it (no copy "
        "for huge models; ONNX Runtime loads it, but onnx.load/onnx.checker refuse hard links)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(run=run)


def run(args) -> int:
    from qeff_graph.passes.manager import format_log
    from qeff_graph.program import optimize

    program = optimize(args.model, args.output_dir, verify=args.verify, dump_dir=args.dump_dir,
                       dump_before=args.dump_before, dump_after=args.dump_after,
                       hardlink_data=args.hardlink_data, **spec_options(args))
    spec = program.spec
    if not args.quiet:
        m = program.manifest
        kv = m["kv_cache"]
        print(f"optimized {args.model} -> {program.path} in {m['seconds']:.2f}s")
        print(f"kv cache: {kv['layers']} layers, {kv['kv_heads']} kv heads, head_dim {kv['head_dim']}, "
              f"ctx_len {spec.ctx_len}, {spec.kv_dtype}")
        print(format_log(m["pipeline"], indent="  "))
        print("wrote: " + ", ".join(sorted([*m["files"], "qeff_graph.json"])))
    return 0
