"""``qeff-graph bench``: prefill/decode speed of program variants, measured side by side.

Every variant is compiled once (through the cache, like ``infer``), then the runs are
interleaved round-robin — repeat 1 of every variant, then repeat 2, ... — and each number is the
median over repeats, so machine noise hits all variants alike. Ratios are taken against the
first variant at the same batch size. Greedy tokens are compared with the first variant's
(``agree``: the mean fraction of each row's tokens before the first difference).

Variants (``--variants``): ``fp32`` (the retained-KV program), ``numpy`` (same program, numpy
feeds instead of IO binding), ``kv-fp16`` (float16 KV cache), ``int8`` (``--mxfp6`` on ort:
8-bit MatMulNBits weights) and ``int4`` (4-bit weights).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
from pathlib import Path

import numpy as np

from qeff_graph import progress as _progress
from qeff_graph.errors import QeffGraphError

__all__ = ["VARIANTS", "BenchRow", "run_bench", "format_table", "save_plot"]

# variant -> (compile options, session options)
VARIANTS: dict[str, tuple[dict, dict]] = {
    "fp32": ({}, {}),
    "numpy": ({}, {"io_binding": False}),
    "kv-fp16": ({"kv_dtype": "float16"}, {}),
    "int8": ({"mxfp6_matmul": True}, {}),
    "int4": ({"weight_bits": 4}, {}),
}

TEXT = ("The history of the city begins with a small settlement on the river, where traders met "
        "to exchange grain, salt and cloth. Over the centuries it grew into a busy port with "
        "markets, churches and a university, and its people became known for their skill in "
        "building ships, printing books and making clocks that were sold across the continent.")


@dataclasses.dataclass
class BenchRow:
    variant: str
    batch_size: int
    weights_mb: float
    prefill_tok_s: float
    decode_tok_s: float
    ttft_s: float
    decode_ratio: float = 1.0  # decode tok/s over the first variant's at this batch size
    agree: float = 1.0  # token agreement with the first variant


def _prompts(model, batch: int, prompt_tokens: int, vocab: int) -> list[list[int]]:
    """``batch`` different prompts of ``prompt_tokens`` ids (real text when there is a tokenizer)."""
    try:
        ids = model.tokenizer()(TEXT * 4, add_special_tokens=False)["input_ids"]
    except QeffGraphError:
        ids = np.random.default_rng(0).integers(1, vocab, size=4 * prompt_tokens + batch).tolist()
    if len(ids) < prompt_tokens + batch:
        raise QeffGraphError(f"--prompt-tokens {prompt_tokens} is longer than the benchmark text")
    return [ids[r: r + prompt_tokens] for r in range(batch)]


def run_bench(model_name: str | None = None, *, gguf_file: str | None = None,
              variants: list[str] = ("fp32", "int8"), batch_sizes: list[int] = (1, 4),
              prompt_len: int = 32, ctx_len: int = 256, prompt_tokens: int = 64,
              generation_len: int = 64, repeats: int = 3, threads: int | None = None,
              cache_dir=None, progress: bool = True) -> list[BenchRow]:
    """Compile every variant for every batch size, run them interleaved, return one row each."""
    from qeff_graph.generation import generate_ids

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise QeffGraphError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if prompt_tokens + generation_len > ctx_len:
        raise QeffGraphError(f"--prompt-tokens + --generation-len ({prompt_tokens + generation_len}) "
                             f"exceed --ctx-len {ctx_len}; raise --ctx-len")
    rows: list[BenchRow] = []
    tokens: dict[tuple[str, int], list] = {}
    with _progress.quiet(not progress):
        for batch in batch_sizes:  # one batch size at a time: only its sessions are in memory
            runs = _prepare(model_name, gguf_file, variants, batch, prompt_len, ctx_len, prompt_tokens,
                            threads, cache_dir)
            samples: dict[str, list] = {variant: [] for variant, *_ in runs}
            for r in range(repeats):
                _progress.say(f"bench: batch {batch}, round {r + 1}/{repeats}")
                for variant, session, prompts, _ in runs:
                    result = generate_ids(session, prompts, prompt_len=prompt_len, generation_len=generation_len)
                    samples[variant].append(result.perf)
                    tokens[(variant, batch)] = result.generated_ids
            for variant, _, prompts, weights_mb in runs:
                perfs = samples[variant]
                prefill = statistics.median(p["prefill_s"] for p in perfs)
                rows.append(BenchRow(variant, batch, round(weights_mb, 1),
                                     round(batch * prompt_tokens / prefill, 1),
                                     round(statistics.median(p["decode_tok_s"] for p in perfs), 2),
                                     round(statistics.median(p["ttft_s"] for p in perfs), 4)))
            del runs
    for row in rows:
        base = next(r for r in rows if r.batch_size == row.batch_size)
        row.decode_ratio = round(row.decode_tok_s / base.decode_tok_s, 2)
        row.agree = round(_agreement(tokens[(row.variant, row.batch_size)],
                                     tokens[(base.variant, base.batch_size)]), 3)
    return rows


def _prepare(model_name, gguf_file, variants, batch, prompt_len, ctx_len, prompt_tokens, threads, cache_dir):
    """``[(variant, session, prompts, weights MB)]`` for one batch size; variants built from the
    same program (fp32 and numpy) share one ONNX Runtime session (and its weights in memory)."""
    from qeff_graph.backends.ort import RetainedStateSession
    from qeff_graph.backends.ort.session import cpu_session
    from qeff_graph.generation import generate_ids
    from qeff_graph.models import QEFFAutoModelForCausalLM

    runs, shared = [], {}
    for variant in variants:
        compile_options, session_options = VARIANTS[variant]
        model = QEFFAutoModelForCausalLM.from_pretrained(model_name, gguf_file=gguf_file, cache_dir=cache_dir)
        program = model.compile(prefill_seq_len=prompt_len, ctx_len=ctx_len, batch_size=batch, **compile_options)
        weights = sum(f.stat().st_size for f in program.glob("*.data")) or (program / "model.onnx").stat().st_size
        n = threads or model.spec.threads()
        if (program, n) not in shared:
            shared[(program, n)] = cpu_session(program / "model.onnx", n)
        session = RetainedStateSession(program, batch_size=batch, ctx_len=ctx_len,
                                       session=shared[(program, n)], **session_options)
        vocab = model.program.manifest["io"]["outputs"][0]["shape"][-1]
        prompts = _prompts(model, batch, prompt_tokens, vocab if isinstance(vocab, int) else 2)
        generate_ids(session, prompts, prompt_len=prompt_len, generation_len=4)  # warm-up
        runs.append((variant, session, prompts, weights / 1e6))
    return runs


def _agreement(got: list[list[int]], ref: list[list[int]]) -> float:
    fractions = []
    for a, b in zip(got, ref):
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        fractions.append(same / max(len(b), 1))
    return float(np.mean(fractions))


def format_table(rows: list[BenchRow]) -> str:
    head = ["variant", "batch", "weights MB", "prefill tok/s", "TTFT s", "decode tok/s", "× first", "agree"]
    body = [[r.variant, str(r.batch_size), f"{r.weights_mb:.0f}", f"{r.prefill_tok_s:.0f}",
             f"{r.ttft_s:.3f}", f"{r.decode_tok_s:.1f}", f"{r.decode_ratio:.2f}", f"{r.agree:.2f}"]
            for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(head, widths)),
             "-|-".join("-" * w for w in widths)]
    lines += [" | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(b, widths)))
              for b in body]
    return "\n".join(lines)


def save_plot(rows: list[BenchRow], path: str | os.PathLike, title: str) -> Path:
    """Grouped bars: decode tok/s per variant, one group per batch size (matplotlib, Agg)."""
    try:
        import matplotlib
    except ImportError:
        raise QeffGraphError("the plot needs matplotlib: pip install 'qeff-graph[bench]' "
                             "(or pass --no-plot)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r.variant for r in rows))
    batches = list(dict.fromkeys(r.batch_size for r in rows))
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(batches) * len(variants) / 2, 4))
    for i, variant in enumerate(variants):
        values = [next((r.decode_tok_s for r in rows if r.variant == variant and r.batch_size == b), 0)
                  for b in batches]
        bars = ax.bar([x + i * width for x in range(len(batches))], values, width, label=variant)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks([x + width * (len(variants) - 1) / 2 for x in range(len(batches))],
                  [f"batch {b}" for b in batches])
    ax.set_ylabel("decode tokens/s (all rows)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(rows: list[BenchRow], out_dir: str | os.PathLike, meta: dict) -> Path:
    from qeff_graph.fs import write_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return write_atomic(out / "bench.json",
                        json.dumps({"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}, indent=2) + "\n")
