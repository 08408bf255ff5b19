"""``qeff-graph passes``: list registered passes and the default pipeline."""

from __future__ import annotations

HELP = "list the registered graph passes with their one-line docs"


def add_parser(sub) -> None:
    p = sub.add_parser("passes", help=HELP, description=HELP + ", and the default pipeline.")
    p.add_argument("--verbose-doc", action="store_true", help="print each pass's full docstring")
    p.set_defaults(run=run)


def run(args) -> int:
    import inspect

    from qeff_graph.passes import PIPELINES, registry

    entries = registry.available()
    width = max(len(n) for n, _ in entries)
    for name, doc in entries:
        print(f"{name:<{width}}  {doc}")
        if args.verbose_doc:
            body = inspect.getdoc(registry.get(name)) or ""
            print("\n".join("    " + line for line in body.splitlines()[1:]).rstrip() + "\n")
    notes = {"retained-kv": "fp16-clamp only with --kv-dtype float16; matmul-nbits only with --mxfp6 / "
                            "--weight-bits; ort-skip-norm and ort-gqa only on the ort backend with --ort-lowering 2 "
                            "(the default), ort-valid-attention with 1 or 2",
             "encoder": "pooling only with a pooling mode; ort-fuse-encoder only on the ort backend"}
    for pipeline, names in PIPELINES.items():
        print(f"\npipeline {pipeline}: " + " -> ".join(names) + f" ({notes.get(pipeline, '')})")
    return 0
