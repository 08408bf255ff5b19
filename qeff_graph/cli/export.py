"""``qeff-graph export``: Hugging Face dir | hub id | .gguf ──▶ unmodified ONNX (dynamic KV)."""

from __future__ import annotations

from qeff_graph.cli.options import HelpFormatter, add, positive_int

HELP = "export a Hugging Face causal LM to an unmodified ONNX graph with a dynamic KV cache"


def add_parser(sub) -> None:
    p = sub.add_parser("export", help=HELP, description=HELP + ". Writes model.onnx, config, "
                       "tokenizer files and export.json (every file's size and SHA-256) into OUT_DIR as one atomic "
                       "folder (OUT_DIR must be new, empty or an earlier export); feed it to "
                       "`qeff-graph optimize` or `qeff-graph compile`.",
                       formatter_class=HelpFormatter)
    p.add_argument("model", metavar="MODEL", help="local HF model dir, .gguf file or hub id")
    add(p, "-o", "--output-dir", default=None, metavar="OUT_DIR",
        help="directory to write (default: ./<model-slug>-onnx)")
    add(p, "--exporter", choices=["dynamo", "torchscript"], default="dynamo", help="torch ONNX exporter")
    add(p, "--opset", type=positive_int, default=None,
        help="ONNX opset (default: 18 for dynamo, 17 for torchscript)")
    add(p, "--gguf-file", default=None, help="GGUF file name inside the model dir")
    add(p, "--cache-dir", default=None, help="Hugging Face download cache dir")
    add(p, "--hf-token", default=None, help="Hugging Face token for gated hub models")
    add(p, "--trust-remote-code", action="store_true",
        help="allow running Python code shipped with the model (custom architectures); off by default")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(run=run)


def default_output_dir(model: str, gguf_file: str | None = None) -> str:
    from qeff_graph.cache import model_slug

    name = gguf_file.removesuffix(".gguf") if gguf_file else model.removesuffix(".gguf")
    return f"{model_slug(name)}-onnx"


def run(args) -> int:
    from qeff_graph.export import export_causal_lm

    out = args.output_dir or default_output_dir(args.model, args.gguf_file)
    result = export_causal_lm(args.model, out, exporter=args.exporter, opset=args.opset,
                              gguf_file=args.gguf_file, hf_token=args.hf_token,
                              cache_dir=args.cache_dir, progress=not args.quiet,
                              trust_remote_code=args.trust_remote_code)
    print(result.onnx_path)
    return 0
