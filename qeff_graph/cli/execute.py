"""``qeff-graph execute``: run prompts through a compiled (``--backend ort``) program dir.

QEfficient's ``QEfficient.cloud.execute`` counterpart: the tokenizer is read from the program
dir (``optimize``/``compile`` copy it there), batch size / prompt_len / ctx_len from its manifest.
"""

from __future__ import annotations

import re

from qeff_graph.cli.options import HelpFormatter, add, add_run_options, check_run_outputs, read_prompts

HELP = "run prompts through a compiled program directory (backend ort)"


def add_parser(sub) -> None:
    p = sub.add_parser("execute", help=HELP, description=HELP + "; shapes come from its manifest "
                       "and the tokenizer from its files. The program is checked against its manifest "
                       "first (--verify-cache: every file's hash).",
                       formatter_class=HelpFormatter)
    add(p, "--model-name", "-m", default=None,
        help="model the program should have been compiled from (checked against the manifest)")
    add(p, "--qpc-path", required=True, metavar="DIR", help="program dir from `qeff-graph compile`")
    add_run_options(p)
    add(p, "--verify-cache", action="store_true", help="hash every file of the program before running it")
    p.set_defaults(run=run)


def _norm(name: str) -> str:
    from qeff_graph.cache import model_slug

    slug = model_slug(str(name).split("::")[0]).lower()
    return re.split(r"--", slug)[-1].removesuffix(".gguf")


def _same_model(a: str, b: str) -> bool:
    from qeff_graph.cache import model_slug

    return model_slug(a).lower() == model_slug(b).lower() or _norm(a) == _norm(b)


def run(args) -> int:
    from qeff_graph.cli.infer import print_output, write_output_json
    from qeff_graph.errors import QeffGraphError
    from qeff_graph.models.causal_lm import check_draft_options, generate_text, load_tokenizer, resolve_draft
    from qeff_graph.program import Program

    prompts = read_prompts(args.prompt, args.prompts_txt_file_path)
    check_run_outputs(args)
    program = Program.open(args.qpc_path, hashes=args.verify_cache)
    spec = program.spec
    if spec.kind != "causal-lm":
        raise QeffGraphError(f"{args.qpc_path} is an {spec.kind} program; embed texts with `qeff-graph embed` "
                             "(execute runs causal-LM programs)")
    if spec.backend != "ort":
        raise QeffGraphError(f"{args.qpc_path} was compiled for --backend {spec.backend}; execute runs --backend "
                             "ort programs (compile it again with --backend ort)")
    compiled_from = program.manifest.get("model_name")
    if args.model_name and compiled_from and not _same_model(args.model_name, compiled_from):
        raise QeffGraphError(f"qpc dir {args.qpc_path} was compiled from {compiled_from}, not {args.model_name}")
    check_draft_options(args.draft, args.lookup_ngram, spec)
    draft = resolve_draft(args.draft, program)
    tokenizer = load_tokenizer(program.path)
    out = generate_text(program, tokenizer, prompts, generation_len=args.generation_len, stream=args.stream,
                        threads=args.threads or spec.threads(), chat_template=args.chat_template,
                        write_io_dir=args.write_io_dir, draft=draft, lookup_ngram=args.lookup_ngram)
    print_output(out, ctx_len=spec.ctx_len, stream=args.stream)
    if args.output_json:
        write_output_json(args.output_json, {**out.to_json(), "qpc_path": str(args.qpc_path),
                                             "model_name": compiled_from})
    return 0
