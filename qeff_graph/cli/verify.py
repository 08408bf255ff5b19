"""``qeff-graph verify``: compare a program with the graph it came from, numerically."""

from __future__ import annotations

import json

from qeff_graph.cli.options import HelpFormatter, add, positive_int

HELP = "check numerically that a program computes what its source export (or transformers) computes"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "verify", help=HELP, formatter_class=HelpFormatter,
        description=HELP + ". Runs the same prompts (token ids of lengths 5, 2*prompt_len+3, 3, 10, ...) "
        "through the reference — the SOURCE graph with its dynamic KV cache, one prompt at a time, or "
        "Hugging Face transformers with --reference (or when the export's export.json names a local "
        "model folder that still exists) — and through the PROGRAM as one right-padded batch with "
        "chunked prefill. Reports per prompt the share of greedy tokens before the first difference "
        "and the largest logit difference over the steps both runs shared. Exit 0 when every token "
        "is equal and the logits are within --tolerance, 1 otherwise, 2 on bad input.")
    p.add_argument("source", metavar="SOURCE.onnx", help="the dynamic-KV ONNX export the program was built from")
    p.add_argument("program", metavar="PROGRAM_DIR", help="a program directory from optimize/compile")
    add(p, "--prompts", type=positive_int, default=4, metavar="N",
        help="number of prompts, run as one padded batch in the program")
    add(p, "--new-tokens", type=positive_int, default=8, metavar="N", help="greedy tokens per prompt")
    add(p, "--reference", default=None, metavar="HF_DIR|onnx",
        help="a transformers model folder (or .gguf) to compare with instead of the source graph; "
        "`onnx` forces the source graph even when the export recorded its model folder")
    add(p, "--tolerance", type=float, default=1e-4,
        help="largest allowed logit difference (1e-4 suits fp32; quantized or fp16-cache programs need more)")
    add(p, "--bisect", action="store_true",
        help="rebuild the program's pipeline from SOURCE pass by pass and name the first pass after "
        "which the outputs differ (checkpoints: before the retained-state rewrite, and after every "
        "pass once past-shape, position-mask and kv-retention have run)")
    add(p, "--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=run)


def run(args) -> int:
    from qeff_graph.program.verify import bisect_pipeline, verify_program

    options = dict(prompts=args.prompts, new_tokens=args.new_tokens, reference=args.reference,
                   tolerance=args.tolerance)
    report = verify_program(args.source, args.program, **options)
    result = {"report": report.to_dict()}
    if args.bisect:
        culprit, steps = bisect_pipeline(args.source, args.program, **options)
        result["bisect"] = {"culprit": culprit,
                            "steps": [{"passes": s.passes, "contract": s.contract, **s.report.to_dict()}
                                      for s in steps]}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"verify {args.program}: {report.summary()}")
        if args.bisect:
            for s in steps:
                mean = sum(s.report.agreement) / len(s.report.agreement)
                print(f"  after {s.passes[-1]:<20} ({s.contract:<7}) agreement {mean:.3f}, "
                      f"max logit diff {s.report.max_logit_diff:.3g} {'ok' if s.report.passed else 'DIFFERS'}")
            print(f"bisect: outputs first differ after pass {culprit}" if culprit
                  else "bisect: no pass changes the outputs")
    return 0 if report.passed and not (args.bisect and culprit) else 1
