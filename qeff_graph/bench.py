"""``qeff-graph bench``: prefill/decode speed of program variants and their peers, side by side.

Every variant is built once (programs through the cache, like ``infer``; the peers' models
through ``<cache>/<model>/bench/``) before anything is measured. Then, for each batch size and
each ctx_len (``ctx_len`` may list several, e.g. 256 and 2048), every variant is loaded into its
own worker process (:mod:`qeff_graph.bench_peers`: spawn, one process per variant and ctx_len
that stays alive across the rounds; one batch size at a time) and the runs are interleaved
round-robin over all variants and ctx_lens of the batch size — repeat 1 of every one, then
repeat 2, ... — and each number is the median over repeats (the samples are in ``bench.json``),
so machine noise hits all variants and ctx_lens alike and the ratios come from one run. Ratios (``× first``) are taken against the first
variant at the same batch size and ctx_len. Greedy tokens are compared with fp32's (the first
variant's when fp32 is not run) at the same batch size and ctx_len (``agree``: the mean fraction
of each row's tokens before the first difference). Each row also reports its worker's peak RSS
(loading included) and its peak resident memory during the measured rounds, and
whether its KV cache is ``fixed`` (allocated for ctx_len: our programs, GenAI's ``max_length``
buffer, llama.cpp's ``n_ctx``) or ``dynamic`` (grows with the sequence: torch, plain ORT; their
ctx_len is only the bound the run was checked against).

Our variants (``--variants``): ``fp32`` (the retained-KV program), ``numpy`` (same program,
numpy feeds instead of IO binding), ``kv-fp16`` (float16 KV cache), ``int8`` (``--mxfp6`` on
ort: 8-bit MatMulNBits weights), ``int4`` (4-bit weights), ``int4-l4`` (4-bit weights with
int8 compute, ``--accuracy-level 4``: the program ``self-int4`` drafts with), ``fp32-valid``/``int4-valid`` (the same
programs lowered without GroupQueryAttention: ``ort_lowering=1``), and speculative decoding with the
fp32 program compiled with ``--num-speculative-tokens K``: ``spec-lookup`` (prompt lookup),
``spec-int4`` (self-speculation: the int4 program drafts) and ``spec-draft`` (the draft given
with ``--draft PATH_OR_ID``: a program dir or a model with the same tokenizer). Speculative rows
also report the acceptance rate and the tokens each target step produced per row.

Peers, in the same list (:mod:`qeff_graph.bench_peers`): ``torch`` (transformers), ``ort-plain``
(plain ONNX Runtime on the unmodified export), ``genai-fp32`` / ``genai-int4`` (ONNX Runtime
GenAI), ``llama.cpp`` (llama-cpp-python on the same GGUF); ``peers`` = all of them that are
installed and can run the model (the others are listed as skipped, with the command that
installs them). A peer named explicitly that is not installed or cannot run the model is an
error, in one line, before any work.

Prompts (``--prompt-set``): ``text`` — ``--prompt-tokens`` tokens of an English text per row,
run to ``--generation-len`` tokens; ``code-rewrite`` — an input-grounded task (an instruct
model, chat template: "Rewrite this code with the variable X renamed to Y:" and a Python
function, a different one per row), stopped at EOS or ``--generation-len``.
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

__all__ = ["VARIANTS", "BenchRow", "format_table", "run_bench", "save_plot"]

# variant -> (compile options, session options, drafter); a drafter needs the program's verify
# step: its compile options get num_speculative_tokens
VARIANTS: dict[str, tuple[dict, dict, str | None]] = {
    "fp32": ({}, {}, None),
    "numpy": ({}, {"io_binding": False}, None),
    "kv-fp16": ({"kv_dtype": "float16"}, {}, None),
    "int8": ({"mxfp6_matmul": True}, {}, None),
    "int4": ({"weight_bits": 4}, {}, None),
    "int4-l4": ({"weight_bits": 4, "accuracy_level": 4}, {}, None),  # int8 compute: self-int4's draft program
    "fp32-valid": ({"ort_lowering": 1}, {}, None),  # attention over the valid length, no GroupQueryAttention
    "int4-valid": ({"weight_bits": 4, "ort_lowering": 1}, {}, None),
    "spec-lookup": ({}, {}, "prompt-lookup"),
    "spec-int4": ({}, {}, "self-int4"),
    "spec-draft": ({}, {}, "--draft"),  # the draft given to run_bench(draft=...)
}
PROMPT_SETS = ("text", "code-rewrite")

# code-rewrite prompts: (function, variable, new name); row r takes CODE[r % len(CODE)]
CODE = [
    ("""def count_words(text):
    counts = {}
    for word in text.split():
        word = word.lower()
        counts[word] = counts.get(word, 0) + 1
    return counts
""", "word", "token"),
    ("""def average(values):
    total = 0
    for value in values:
        total += value
    if len(values) == 0:
        return 0
    return total / len(values)
""", "total", "running_sum"),
    ("""def find_longest(lines):
    longest = ""
    for line in lines:
        line = line.strip()
        if len(line) > len(longest):
            longest = line
    return longest
""", "line", "row"),
    ("""def merge_dicts(first, second):
    result = dict(first)
    for key, value in second.items():
        if key in result:
            result[key] = result[key] + value
        else:
            result[key] = value
    return result
""", "result", "merged"),
]

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
    decode_ratio: float = 1.0  # decode tok/s over the first variant's at this batch size and ctx_len
    agree: float = 1.0  # token agreement with fp32 (else the first variant) at this batch size and ctx_len
    acceptance_rate: float | None = None  # speculative: accepted / proposed draft tokens
    tokens_per_step: float | None = None  # speculative: tokens per target step per row
    ctx_len: int | None = None  # the ctx_len it was run for (see kv: whether it bounds the work)
    kv: str = ""  # KV cache: "fixed <dtype>" (allocated for ctx_len) or "dynamic" (grows; ctx_len unused)
    peak_rss_mb: float | None = None  # its worker process's peak resident memory (loading included), MB
    run_rss_mb: float | None = None  # peak resident memory during the measured rounds, MB
    decode_tok_s_rounds: list[float | None] | None = None  # each round's decode tok/s (the median's samples)


def code_rewrite_prompts(batch: int) -> list[str]:
    """``batch`` input-grounded prompts: rewrite a function with one variable renamed."""
    return [f"Rewrite this code with the variable `{old}` renamed to `{new}`:\n\n```python\n{code}```"
            for code, old, new in (CODE[r % len(CODE)] for r in range(batch))]


def _prompts(model, batch: int, prompt_tokens: int, vocab: int, prompt_set: str = "text") -> list[list[int]]:
    """``batch`` different prompts: ``prompt_tokens`` ids of text (real text when there is a
    tokenizer), or the code-rewrite task as chat-template ids."""
    if prompt_set == "code-rewrite":
        from qeff_graph.models.causal_lm import encode_prompt

        tokenizer = model.tokenizer()
        return [encode_prompt(tokenizer, p, chat_template=True) for p in code_rewrite_prompts(batch)]
    try:
        ids = model.tokenizer()(TEXT * 4, add_special_tokens=False)["input_ids"]
    except QeffGraphError:
        ids = np.random.default_rng(0).integers(1, vocab, size=4 * prompt_tokens + batch).tolist()
    if len(ids) < prompt_tokens + batch:
        raise QeffGraphError(f"--prompt-tokens {prompt_tokens} is longer than the benchmark text")
    return [ids[r: r + prompt_tokens] for r in range(batch)]


def run_bench(model_name: str | None = None, *, gguf_file: str | None = None,
              variants: list[str] = ("fp32", "int8"), batch_sizes: list[int] = (1, 4),
              prompt_len: int = 32, ctx_len: int | list[int] = 256, prompt_tokens: int = 64,
              generation_len: int = 64, repeats: int = 3, threads: int | None = None,
              cache_dir=None, progress: bool = True, num_speculative_tokens: int = 4,
              prompt_set: str = "text", lookup_ngram: int | None = None, draft: str | None = None,
              skipped: list[str] | None = None) -> list[BenchRow]:
    """Build every variant (programs through the cache, the peers' models through the bench
    cache), then for each batch size and ctx_len run them interleaved, each in its own worker
    process; one row per variant, batch size and ctx_len. ``ctx_len``: one or several.
    ``skipped``: a list that receives a note for each peer ``peers`` left out."""
    from qeff_graph import bench_peers
    from qeff_graph.models import QEFFAutoModelForCausalLM

    ctx_lens = [ctx_len] if isinstance(ctx_len, int) else list(dict.fromkeys(ctx_len))
    if not ctx_lens or any(not isinstance(c, int) or c < 1 for c in ctx_lens):
        raise QeffGraphError(f"ctx_len must be integers >= 1, got {ctx_len!r}")
    if prompt_set not in PROMPT_SETS:
        raise QeffGraphError(f"unknown prompt set {prompt_set!r}; choose from {', '.join(PROMPT_SETS)}")
    source = bench_peers.Source.of(model_name, gguf_file)
    variants, left_out = bench_peers.select_variants(list(variants), VARIANTS, source, batch_sizes, prompt_set)
    if skipped is not None:
        skipped.extend(left_out)
    if ("spec-draft" in variants) != (draft is not None):
        raise QeffGraphError("the spec-draft variant and --draft PATH_OR_ID go together: give both or neither")
    if prompt_set == "text" and prompt_tokens + generation_len > min(ctx_lens):
        raise QeffGraphError(f"--prompt-tokens + --generation-len ({prompt_tokens + generation_len}) "
                             f"exceed --ctx-len {min(ctx_lens)}; raise --ctx-len")
    if any(VARIANTS[v][2] for v in variants if v in VARIANTS):  # the spec's own check, before any compile
        from qeff_graph.program import ProgramSpec

        for c in ctx_lens:
            ProgramSpec(ctx_len=c, prompt_len=prompt_len, num_speculative_tokens=num_speculative_tokens)
    threads = threads or len(os.sched_getaffinity(0))
    common = {"model_name": source.name, "gguf_file": source.gguf_file, "cache_dir": cache_dir,
              "prompt_len": prompt_len, "threads": threads, "num_speculative_tokens": num_speculative_tokens,
              "lookup_ngram": lookup_ngram, "draft": draft, "generation_len": generation_len}
    rows: list[BenchRow] = []
    tokens: dict[tuple[str, int, int], list] = {}
    with _progress.quiet(not progress):
        # everything is built (or found in the cache) before the first measurement
        model = QEFFAutoModelForCausalLM.from_pretrained(source.name, gguf_file=source.gguf_file, cache_dir=cache_dir)
        model.export()
        vocab = _vocab_size(model)
        prompts, eos = {}, None
        for batch in batch_sizes:
            prompts[batch] = _prompts(model, batch, prompt_tokens, vocab, prompt_set)
        if prompt_set == "code-rewrite":
            eos = model.tokenizer().eos_token_id
            longest = max(len(p) for ps in prompts.values() for p in ps)
            if longest + generation_len > min(ctx_lens):
                raise QeffGraphError(f"the code-rewrite prompts ({longest} tokens) + --generation-len "
                                     f"({generation_len}) exceed --ctx-len {min(ctx_lens)}; raise --ctx-len")
        for batch in batch_sizes:
            for c in ctx_lens:
                for variant in variants:
                    if variant in VARIANTS:
                        _build_ours(variant, {**common, "batch_size": batch, "ctx_len": c}, open_sessions=False)
        peer_options = {v: bench_peers.prepare_peer(v, source, model, cache_dir)
                        for v in variants if v in bench_peers.PEERS}
        for batch in batch_sizes:  # one batch size at a time: only its workers are in memory
            rows += _measure(variants, ctx_lens, {**common, "batch_size": batch, "prompts": prompts[batch], "eos": eos},
                             peer_options, repeats, tokens)
    reference = "fp32" if "fp32" in variants else variants[0]
    for row in rows:
        group = [r for r in rows if r.batch_size == row.batch_size and r.ctx_len == row.ctx_len]
        base = group[0]
        row.decode_ratio = round(row.decode_tok_s / base.decode_tok_s, 2) if base.decode_tok_s else 0.0
        row.agree = round(_agreement(tokens[(row.variant, row.batch_size, row.ctx_len)],
                                     tokens[(reference, row.batch_size, row.ctx_len)]), 3)
    return rows


def _vocab_size(model) -> int:
    from qeff_graph.artifact import read_json

    try:
        return int(read_json(model.export_path / "export.json", "export manifest")["vocab_size"])
    except (QeffGraphError, KeyError, TypeError, ValueError):
        return 2


def _measure(variants, ctx_lens, options: dict, peer_options: dict, repeats: int, tokens: dict) -> list[BenchRow]:
    """One batch size: a worker per variant and ctx_len (all alive together), ``repeats`` rounds
    interleaved over all of them (so ratios and the ctx_len comparison come from the same
    rounds), medians; rows ordered by ctx_len, then variant."""
    from qeff_graph.bench_peers import Worker

    batch = options["batch_size"]
    workers: dict[tuple[int, str], Worker] = {}
    samples: dict[tuple[int, str], list] = {}
    rss = {}
    try:
        for c in ctx_lens:
            for variant in variants:
                _progress.say(f"bench: batch {batch}, ctx_len {c}: loading {variant}")
                workers[(c, variant)] = Worker(variant, {**options, "ctx_len": c, **peer_options.get(variant, {})})
                samples[(c, variant)] = []
        for r in range(repeats):
            _progress.say(f"bench: batch {batch}, round {r + 1}/{repeats}")
            for (c, variant), w in workers.items():
                generated, perf, rss[(c, variant)] = w.run()
                samples[(c, variant)].append(perf)
                tokens[(variant, batch, c)] = generated
    finally:
        for w in workers.values():
            w.close()
    rows = []
    for (c, variant), w in workers.items():
        perfs = samples[(c, variant)]
        prefill = statistics.median(p["prefill_s"] for p in perfs)
        row = BenchRow(variant, batch, round(w.info["weights_mb"], 1), round(perfs[0]["prompt_tokens"] / prefill, 1),
                       round(statistics.median(p["decode_tok_s"] or 0.0 for p in perfs), 2),
                       round(statistics.median(p["ttft_s"] for p in perfs), 4), ctx_len=c, kv=w.info["kv"],
                       peak_rss_mb=rss[(c, variant)]["peak_rss_mb"], run_rss_mb=rss[(c, variant)]["run_rss_mb"],
                       decode_tok_s_rounds=[p["decode_tok_s"] for p in perfs])
        if "acceptance_rate" in perfs[-1]:  # speculative: the same tokens every round, these do not vary
            row.acceptance_rate = perfs[-1]["acceptance_rate"]
            row.tokens_per_step = perfs[-1]["tokens_per_target_step"]
        rows.append(row)
    return rows


def _build_ours(variant: str, o: dict, *, open_sessions: bool):
    """Compile (or find in the cache) the program of one of our variants, with its draft; with
    ``open_sessions``, also open it: ``(session, drafter, weights MB, kv dtype)``."""
    from qeff_graph.models import QEFFAutoModelForCausalLM
    from qeff_graph.models.causal_lm import make_drafter, resolve_draft

    compile_options, session_options, draft = VARIANTS[variant]
    draft = o["draft"] if draft == "--draft" else draft
    if draft is not None:
        compile_options = {**compile_options, "num_speculative_tokens": o["num_speculative_tokens"]}
    model = QEFFAutoModelForCausalLM.from_pretrained(o["model_name"], gguf_file=o["gguf_file"],
                                                     cache_dir=o["cache_dir"])
    program = model.compile(prefill_seq_len=o["prompt_len"], ctx_len=o["ctx_len"], batch_size=o["batch_size"],
                            **compile_options)
    found = resolve_draft(draft, model.program, model=model) if draft is not None else None
    if not open_sessions:
        return None
    from qeff_graph.backends.ort import RetainedStateSession

    n = o["threads"]
    session = RetainedStateSession(program, batch_size=o["batch_size"], ctx_len=o["ctx_len"], threads=n,
                                   **session_options)
    drafter = None
    if draft is not None:
        drafter = make_drafter(model.program, found, threads=n, lookup_ngram=o["lookup_ngram"])
    weights = sum(f.stat().st_size for f in program.glob("*.data")) or (program / "model.onnx").stat().st_size
    return session, drafter, weights / 1e6, model.spec.kv_dtype


class OurRunner:
    """One of our program variants inside a bench worker (:mod:`qeff_graph.bench_peers`)."""

    def __init__(self, variant: str, o: dict):
        self.session, self.drafter, self.weights_mb, kv_dtype = _build_ours(variant, o, open_sessions=True)
        self.prompt_len = o["prompt_len"]
        self.kv = f"fixed {'fp16' if kv_dtype == 'float16' else 'fp32'}"

    def run(self, prompts, generation_len, eos):
        from qeff_graph.generation import generate_ids

        result = generate_ids(self.session, prompts, prompt_len=self.prompt_len, generation_len=generation_len,
                              eos_token_id=eos, drafter=self.drafter)
        return result.generated_ids, result.perf


def _agreement(got: list[list[int]], ref: list[list[int]]) -> float:
    fractions = []
    for a, b in zip(got, ref):
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        fractions.append(same / max(len(b), 1))
    return float(np.mean(fractions))


def format_table(rows: list[BenchRow]) -> str:
    """The rows as a text table (``× first``: decode speed over the first variant's at the same
    batch size and ctx_len; ``agree``: with fp32, else the first variant)."""
    def mb(value):
        return f"{value:.0f}" if value is not None else "-"

    head = ["variant", "batch", "ctx_len", "KV cache", "weights MB", "peak RSS MB", "run RSS MB", "prefill tok/s",
            "TTFT s", "decode tok/s", "× first", "agree"]
    spec = any(r.acceptance_rate is not None or r.tokens_per_step is not None for r in rows)
    if spec:
        head += ["accepted", "tok/step"]
    body = [[r.variant, str(r.batch_size), str(r.ctx_len) if r.ctx_len is not None else "-", r.kv or "-",
             f"{r.weights_mb:.0f}", mb(r.peak_rss_mb), mb(r.run_rss_mb), f"{r.prefill_tok_s:.0f}",
             f"{r.ttft_s:.3f}", f"{r.decode_tok_s:.1f}", f"{r.decode_ratio:.2f}", f"{r.agree:.2f}"]
            + ([f"{r.acceptance_rate:.2f}" if r.acceptance_rate is not None else "-",
                f"{r.tokens_per_step:.2f}" if r.tokens_per_step is not None else "-"] if spec else [])
            for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(head, widths)),
             "-|-".join("-" * w for w in widths)]
    left = {0, 3}  # variant and KV cache: text
    lines += [" | ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(b, widths)))
              for b in body]
    return "\n".join(lines)


def save_plot(rows: list[BenchRow], path: str | os.PathLike, title: str) -> Path:
    """Grouped bars, one group per batch size and ctx_len, a bar per variant: decode tok/s, TTFT
    and peak RSS side by side (matplotlib, Agg)."""
    try:
        import matplotlib
    except ImportError:
        raise QeffGraphError("the plot needs matplotlib: pip install 'qeff-graph[bench]' "
                             "(or pass --no-plot)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r.variant for r in rows))
    groups = list(dict.fromkeys((r.batch_size, r.ctx_len) for r in rows))
    width = 0.8 / len(variants)
    panels = [("decode_tok_s", "decode tokens/s (all rows)", "%.0f"), ("ttft_s", "TTFT s", "%.3f"),
              ("peak_rss_mb", "peak RSS MB (worker process)", "%.0f")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels) + 1.2 * len(groups) * len(variants) / 2, 4.2))
    for ax, (field, label, fmt) in zip(axes, panels):
        for i, variant in enumerate(variants):
            values = [next((getattr(r, field) or 0 for r in rows if r.variant == variant
                            and (r.batch_size, r.ctx_len) == g), 0) for g in groups]
            bars = ax.bar([x + i * width for x in range(len(groups))], values, width, label=variant)
            ax.bar_label(bars, fmt=fmt, fontsize=6, rotation=90, padding=2)
        ax.set_xticks([x + width * (len(variants) - 1) / 2 for x in range(len(groups))],
                      [f"batch {b}\nctx {c}" for b, c in groups], fontsize=8)
        ax.set_ylabel(label, fontsize=8)
        ax.margins(y=0.2)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
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
