"""``qeff-graph execute``: run prompts through a compiled (``--backend ort``) program dir.

QEfficient's ``QEfficient.cloud.execute`` counterpart: the tokenizer is read from the program
dir (``compile`` copies it there), batch size / prompt_len / ctx_len from its manifest.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from qeff_graph.cli.options import HelpFormatter, add, positive_int

HELP = "run prompts through a compiled program directory (backend ort)"


def add_parser(sub) -> None:
    p = sub.add_parser("execute", help=HELP, description=HELP + "; shapes come from its manifest "
                       "and the tokenizer from its files.",
                       formatter_class=HelpFormatter)
    add(p, "--model-name", "-m", default=None,
        help="model the program should have been compiled from (checked against the manifest)")
    add(p, "--qpc-path", required=True, metavar="DIR", help="program dir from `qeff-graph compile`")
    group = p.add_mutually_exclusive_group()
    add(group, "--prompt", default=None, help="prompt text; `|` separates several prompts")
    add(group, "--prompts-txt-file-path", default=None, help="file with one prompt per line")
    add(p, "--generation-len", type=positive_int, default=None,
        help="max new tokens (default: until EOS or ctx_len)")
    add(p, "--threads", type=positive_int, default=None, help="ONNX Runtime intra-op threads")
    add(p, "--chat-template", action="store_true",
        help="wrap each prompt as a user turn with the tokenizer's chat template (instruct models)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    add(p, "--output-json", default=None, help="write prompts, texts, ids and perf stats to this file")
    add(p, "--write-io-dir", default=None, metavar="DIR",
        help="write the first prefill and decode step's inputs/outputs as raw files + aic_batch_io.json")
    p.set_defaults(run=run)


def _norm(name: str) -> str:
    from qeff_graph.cache import model_slug

    slug = model_slug(str(name).split("::")[0]).lower()
    return re.split(r"--", slug)[-1].removesuffix(".gguf")


def _same_model(a: str, b: str) -> bool:
    from qeff_graph.cache import model_slug

    return model_slug(a).lower() == model_slug(b).lower() or _norm(a) == _norm(b)


def run(args) -> int:
    from qeff_graph.cli.infer import print_output, read_prompts
    from qeff_graph.errors import QeffGraphError
    from qeff_graph.models.causal_lm import generate_text, load_tokenizer
    from qeff_graph.program import read_manifest

    qpc = Path(args.qpc_path)
    if not qpc.is_dir():
        raise QeffGraphError(f"{qpc} is not a directory; pass the -o DIR of `qeff-graph compile`")
    manifest = read_manifest(qpc)
    backend = (manifest.get("backend") or {}).get("name", "ort")
    if backend != "ort":
        raise QeffGraphError(f"{qpc} was compiled for --backend {backend}; execute runs --backend ort "
                             "programs (compile it again with --backend ort)")
    compiled_from = manifest.get("model_name")
    if args.model_name and compiled_from and not _same_model(args.model_name, compiled_from):
        raise QeffGraphError(f"qpc dir {qpc} was compiled from {compiled_from}, not {args.model_name}")
    prompts = read_prompts(args.prompt, args.prompts_txt_file_path)
    tokenizer = load_tokenizer(qpc)
    opts = manifest["options"]
    out = generate_text(qpc, opts, tokenizer, prompts, generation_len=args.generation_len,
                        stream=args.stream, threads=args.threads, chat_template=args.chat_template,
                        write_io_dir=args.write_io_dir)
    print_output(out, ctx_len=opts["ctx_len"], stream=args.stream)
    if args.output_json:
        data = out.to_json()
        data["qpc_path"] = str(qpc)
        data["model_name"] = compiled_from
        Path(args.output_json).write_text(json.dumps(data, indent=2) + "\n")
    return 0
