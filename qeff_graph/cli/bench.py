"""``qeff-graph bench``: decode/prefill speed of program variants and their peers, side by side in one run.

``qeff-graph bench --variants fp32,int4,int8,torch,ort-plain,genai-fp32,genai-int4,llama.cpp
--ctx-len 256,2048 --batch-sizes 1`` (or ``--variants fp32,int4,peers``: every peer installed
here); see :mod:`qeff_graph.bench` and :mod:`qeff_graph.bench_peers`.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from qeff_graph.cli.options import HelpFormatter, add, positive_int, positive_ints

HELP = "measure speed side by side: decode/prefill of causal-LM program variants, or embedding throughput"


def add_parser(sub) -> None:
    from qeff_graph.bench import VARIANTS
    from qeff_graph.bench_peers import PEERS, PEERS_KEYWORD

    p = sub.add_parser("bench", help=HELP, formatter_class=HelpFormatter, description=HELP + ". "
                       "Each variant is compiled once (cached like `infer`); runs are interleaved "
                       "round-robin and each number is the median over --repeats. Variants: "
                       "fp32 (retained-KV program, IO binding), numpy (numpy feeds, no IO binding), "
                       "kv-fp16 (float16 KV cache), int8 (--mxfp6: 8-bit MatMulNBits), int4, and speculative "
                       "decoding on the fp32 program compiled with --num-speculative-tokens: spec-lookup (prompt "
                       "lookup), spec-int4 (the int4 program drafts) and spec-draft (--draft), with their acceptance rate "
                       "and tokens per target step. Peers in the same list, measured in the same run: "
                       "torch (transformers, DynamicCache), ort-plain (plain ONNX Runtime on the unmodified export, "
                       "dynamic KV, IO binding), genai-fp32 / genai-int4 (ONNX Runtime GenAI, its model builder's "
                       "fp32/int4 CPU models, built once into the cache), llama.cpp (llama-cpp-python on the same "
                       "GGUF, batch 1); 'peers' = every peer installed here (the others are listed as skipped); a "
                       "peer named that is not installed is an error. Every variant runs in its own worker process: "
                       "rows report its peak RSS (loading included) and its peak during the measured rounds, per "
                       "batch size and --ctx-len. "
                       "--task embed: sentences/s of an encoder program (default: all-MiniLM-L6-v2) beside plain "
                       "ONNX Runtime on its unmodified export and sentence-transformers on torch, every text "
                       "exactly --seq-len tokens (bench-embed.json).")
    add(p, "--task", choices=["generate", "embed"], default="generate",
        help="generate: causal-LM program variants; embed: encoder throughput against peers")
    add(p, "--model-name", "-m", default=None,
        help="hub id, local HF dir or .gguf file (default: the embedded SmolLM2-135M-Instruct; with --task "
        "embed the embedded all-MiniLM-L6-v2)")
    add(p, "--gguf-file", default=None, help="GGUF file name inside the model dir")
    add(p, "--cache-dir", default=None, help="cache root (default: $QEFF_HOME, ...)")
    add(p, "--variants", default="fp32,numpy,kv-fp16,int8,int4",
        help=f"comma-separated, the first is the reference for ratios, fp32 (else the first) for token "
        f"agreement: ours ({', '.join(VARIANTS)}), peers ({', '.join(PEERS)}) or {PEERS_KEYWORD} (every peer "
        "installed here that can run the model)")
    add(p, "--batch-sizes", type=positive_ints, default=None, metavar="1,4",
        help="batch sizes (default: 1,4; --task embed: 1,32)")
    add(p, "--prompt-len", type=positive_int, default=32, help="prefill chunk length")
    add(p, "--ctx-len", type=positive_ints, default=[256], metavar="256,2048",
        help="KV cache length(s): each is measured (programs compiled for it; GenAI max_length, llama.cpp "
        "n_ctx; torch and ort-plain grow their cache as needed) (default: 256)")
    add(p, "--prompt-tokens", type=positive_int, default=64, help="prompt length of every row")
    add(p, "--generation-len", type=positive_int, default=64, help="tokens generated per row")
    add(p, "--repeats", type=positive_int, default=3, help="rounds over all variants")
    add(p, "--prompt-set", choices=["text", "code-rewrite"], default="text",
        help="text: --prompt-tokens of English text per row, run to --generation-len; code-rewrite: an "
        "input-grounded task (chat template: rewrite a Python function with a variable renamed, a different "
        "function per row), stopped at EOS or --generation-len")
    add(p, "--num-speculative-tokens", type=positive_int, default=4, metavar="K",
        help="K of the spec-* variants (drafted tokens per step; K+1 <= --prompt-len)")
    add(p, "--lookup-ngram", type=positive_int, default=None, metavar="N",
        help="spec-lookup: longest n-gram matched, then fewer down to 2 (default: 3)")
    add(p, "--draft", default=None, metavar="PATH_OR_ID",
        help="the spec-draft variant's draft: a program dir, or a model dir / .gguf / hub id (same tokenizer)")
    add(p, "--seq-len", type=positive_int, default=128, help="--task embed: tokens of every text")
    add(p, "--texts", type=positive_int, default=256, help="--task embed: texts embedded per measurement")
    add(p, "--peers", default="qeff-graph,qeff-graph-int8,ort-export,sentence-transformers",
        help="--task embed: systems to measure (qeff-graph, qeff-graph-int8: the program with int8 MatMuls, "
        "ort-export, sentence-transformers)")
    add(p, "--threads", type=positive_int, default=None,
        help="intra-op threads of every variant and peer (default: the cores this process may use)")
    add(p, "-o", "--output-dir", default="bench-out",
        help="folder for bench.json and bench.png (created if missing; those two files are replaced)")
    add(p, "--no-plot", action="store_true", help="skip the plot (no matplotlib needed)")
    p.set_defaults(run=run)


def run(args) -> int:
    from qeff_graph import __version__
    from qeff_graph.bench import format_table, run_bench, save_plot, write_results
    from qeff_graph.bench_peers import omp_wait_policy, peer_versions
    from qeff_graph.errors import QeffGraphError

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    out_dir = Path(args.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise QeffGraphError(f"--output-dir {out_dir} is a file; give a folder for bench.json and bench.png")
    if args.task == "embed":
        return _run_embed(args, out_dir)
    args.batch_sizes = args.batch_sizes or [1, 4]
    load_before = os.getloadavg()[0]
    skipped: list[str] = []
    rows = run_bench(args.model_name, gguf_file=args.gguf_file, variants=variants,
                     batch_sizes=args.batch_sizes, prompt_len=args.prompt_len, ctx_len=args.ctx_len,
                     prompt_tokens=args.prompt_tokens, generation_len=args.generation_len,
                     repeats=args.repeats, threads=args.threads, cache_dir=args.cache_dir,
                     progress=True, num_speculative_tokens=args.num_speculative_tokens,
                     prompt_set=args.prompt_set, lookup_ngram=args.lookup_ngram, draft=args.draft,
                     skipped=skipped)
    model = args.model_name or "SmolLM2-135M-Instruct (embedded)"
    machine = f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores"
    ran = list(dict.fromkeys(r.variant for r in rows))
    meta = {"model": model, "machine": machine, "prompt_len": args.prompt_len, "ctx_len": args.ctx_len,
            "prompt_tokens": args.prompt_tokens, "generation_len": args.generation_len,
            "repeats": args.repeats, "prompt_set": args.prompt_set, "variants": ran,
            "agree_with": "fp32" if "fp32" in ran else ran[0],
            "threads": args.threads or len(os.sched_getaffinity(0)), "omp_wait_policy": omp_wait_policy(),
            "versions": {"qeff-graph": __version__, **peer_versions(["ort-plain", *ran])},
            "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    if skipped:
        meta["skipped"] = skipped
    if any(v.startswith("spec-") for v in variants):
        meta["num_speculative_tokens"] = args.num_speculative_tokens
    if args.draft:
        meta["draft"] = args.draft
    prompt = (f"prompt {args.prompt_tokens} tokens" if args.prompt_set == "text"
              else "code-rewrite prompts (chat template, stop at EOS)")
    spec = f", K={args.num_speculative_tokens}" if "num_speculative_tokens" in meta else ""
    ctx = ",".join(str(c) for c in args.ctx_len)
    print(f"{model} | {machine}, {meta['threads']} threads (load average {meta['loadavg_1min'][0]:.1f} before, "
          f"{meta['loadavg_1min'][1]:.1f} after) | {prompt}, {args.generation_len} generated, "
          f"ctx_len {ctx}{spec}, median of {args.repeats}")
    for note in skipped:
        print(f"skipped {note}")
    print(format_table(rows))
    out = write_results(rows, args.output_dir, meta)
    print(f"wrote {out}")
    if not args.no_plot:
        plot = save_plot(rows, Path(args.output_dir) / "bench.png",
                         f"{model} ({machine}, {prompt}, {args.generation_len} generated, median of {args.repeats})")
        print(f"wrote {plot}")
    return 0


def _run_embed(args, out_dir: Path) -> int:
    import dataclasses
    import json
    import os

    from qeff_graph.bench_embed import format_embed_table, run_embed_bench
    from qeff_graph.fs import write_atomic

    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    rows = run_embed_bench(args.model_name, peers=peers, batch_sizes=args.batch_sizes or [1, 32],
                           seq_len=args.seq_len, texts=args.texts, repeats=args.repeats, threads=args.threads,
                           cache_dir=args.cache_dir)
    model = args.model_name or "all-MiniLM-L6-v2 (embedded)"
    machine = f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores"
    print(f"{model} | {machine} | {args.texts} texts of {args.seq_len} tokens, median of {args.repeats}")
    print(format_embed_table(rows))
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"model": model, "machine": machine, "seq_len": args.seq_len, "texts": args.texts, "repeats": args.repeats}
    path = write_atomic(out_dir / "bench-embed.json",
                        json.dumps({"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}, indent=2) + "\n")
    print(f"wrote {path}")
    return 0
