"""``qeff-graph bench``: prefill/decode speed of program variants, measured side by side.

Every variant is compiled once (through the cache, like ``infer``), then the runs are
interleaved round-robin — repeat 1 of every variant, then repeat 2, ... — and each number is the
median over repeats, so machine noise hits all variants alike. Ratios are taken against the
first variant at the same batch size. Greedy tokens are compared with the first variant's
(``agree``: the mean fraction of each row's tokens before the first difference).

Variants (``--variants``): ``fp32`` (the retained-KV program), ``numpy`` (same program, numpy
feeds instead of IO binding), ``kv-fp16`` (float16 KV cache), ``int8`` (``--mxfp6`` on ort:
8-bit MatMulNBits weights), ``int4`` (4-bit weights), and speculative decoding with the fp32
program compiled with ``--num-speculative-tokens K``: ``spec-lookup`` (prompt lookup),
``spec-int4`` (self-speculation: the int4 program drafts) and ``spec-draft`` (the draft given
with ``--draft PATH_OR_ID``: a program dir or a model with the same tokenizer). Speculative rows
also report the acceptance rate and the tokens each target step produced per row.

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

__all__ = ["VARIANTS", "BenchRow", "run_bench", "format_table", "save_plot"]

# variant -> (compile options, session options, drafter); a drafter needs the program's verify
# step: its compile options get num_speculative_tokens
VARIANTS: dict[str, tuple[dict, dict, str | None]] = {
    "fp32": ({}, {}, None),
    "numpy": ({}, {"io_binding": False}, None),
    "kv-fp16": ({"kv_dtype": "float16"}, {}, None),
    "int8": ({"mxfp6_matmul": True}, {}, None),
    "int4": ({"weight_bits": 4}, {}, None),
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
    decode_ratio: float = 1.0  # decode tok/s over the first variant's at this batch size
    agree: float = 1.0  # token agreement with the first variant
    acceptance_rate: float | None = None  # speculative: accepted / proposed draft tokens
    tokens_per_step: float | None = None  # speculative: tokens per target step per row


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
              prompt_len: int = 32, ctx_len: int = 256, prompt_tokens: int = 64,
              generation_len: int = 64, repeats: int = 3, threads: int | None = None,
              cache_dir=None, progress: bool = True, num_speculative_tokens: int = 4,
              prompt_set: str = "text", lookup_ngram: int | None = None, draft: str | None = None) -> list[BenchRow]:
    """Compile every variant for every batch size, run them interleaved, return one row each."""
    from qeff_graph.generation import generate_ids

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise QeffGraphError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if ("spec-draft" in variants) != (draft is not None):
        raise QeffGraphError("the spec-draft variant and --draft PATH_OR_ID go together: give both or neither")
    if prompt_set not in PROMPT_SETS:
        raise QeffGraphError(f"unknown prompt set {prompt_set!r}; choose from {', '.join(PROMPT_SETS)}")
    if prompt_set == "text" and prompt_tokens + generation_len > ctx_len:
        raise QeffGraphError(f"--prompt-tokens + --generation-len ({prompt_tokens + generation_len}) "
                             f"exceed --ctx-len {ctx_len}; raise --ctx-len")
    if any(VARIANTS[v][2] for v in variants):  # the spec's own check, before any compile
        from qeff_graph.program import ProgramSpec

        ProgramSpec(ctx_len=ctx_len, prompt_len=prompt_len, num_speculative_tokens=num_speculative_tokens)
    rows: list[BenchRow] = []
    tokens: dict[tuple[str, int], list] = {}
    eos = None
    with _progress.quiet(not progress):
        for batch in batch_sizes:  # one batch size at a time: only its sessions are in memory
            runs, eos = _prepare(model_name, gguf_file, variants, batch, prompt_len, ctx_len, prompt_tokens,
                                 threads, cache_dir, num_speculative_tokens, prompt_set, generation_len,
                                 lookup_ngram, draft)
            samples: dict[str, list] = {variant: [] for variant, *_ in runs}
            for r in range(repeats):
                _progress.say(f"bench: batch {batch}, round {r + 1}/{repeats}")
                for variant, session, prompts, _, drafter in runs:
                    result = generate_ids(session, prompts, prompt_len=prompt_len, generation_len=generation_len,
                                          eos_token_id=eos, drafter=drafter)
                    samples[variant].append(result.perf)
                    tokens[(variant, batch)] = result.generated_ids
            for variant, _, prompts, weights_mb, drafter in runs:
                perfs = samples[variant]
                prefill = statistics.median(p["prefill_s"] for p in perfs)
                row = BenchRow(variant, batch, round(weights_mb, 1), round(perfs[0]["prompt_tokens"] / prefill, 1),
                               round(statistics.median(p["decode_tok_s"] for p in perfs), 2),
                               round(statistics.median(p["ttft_s"] for p in perfs), 4))
                if drafter is not None:  # the same tokens every round: these do not vary
                    row.acceptance_rate = perfs[-1]["acceptance_rate"]
                    row.tokens_per_step = perfs[-1]["tokens_per_target_step"]
                rows.append(row)
            del runs
    for row in rows:
        base = next(r for r in rows if r.batch_size == row.batch_size)
        row.decode_ratio = round(row.decode_tok_s / base.decode_tok_s, 2)
        row.agree = round(_agreement(tokens[(row.variant, row.batch_size)],
                                     tokens[(base.variant, base.batch_size)]), 3)
    return rows


def _prepare(model_name, gguf_file, variants, batch, prompt_len, ctx_len, prompt_tokens, threads, cache_dir,
             num_speculative_tokens, prompt_set, generation_len, lookup_ngram, draft_path=None):
    """``([(variant, session, prompts, weights MB, drafter)], eos)`` for one batch size; variants
    built from the same program (fp32 and numpy; int4 and spec-int4's draft) share one ONNX
    Runtime session (and its weights in memory)."""
    from qeff_graph.backends.ort import RetainedStateSession
    from qeff_graph.backends.ort.session import cpu_session
    from qeff_graph.generation import generate_ids
    from qeff_graph.models import QEFFAutoModelForCausalLM
    from qeff_graph.models.causal_lm import make_drafter, resolve_draft

    runs, shared, eos = [], {}, None

    def ort_session(program, n):
        if (program, n) not in shared:
            shared[(program, n)] = cpu_session(program / "model.onnx", n)
        return shared[(program, n)]

    for variant in variants:
        compile_options, session_options, draft = VARIANTS[variant]
        draft = draft_path if draft == "--draft" else draft
        if draft is not None:
            compile_options = {**compile_options, "num_speculative_tokens": num_speculative_tokens}
        model = QEFFAutoModelForCausalLM.from_pretrained(model_name, gguf_file=gguf_file, cache_dir=cache_dir)
        program = model.compile(prefill_seq_len=prompt_len, ctx_len=ctx_len, batch_size=batch, **compile_options)
        weights = sum(f.stat().st_size for f in program.glob("*.data")) or (program / "model.onnx").stat().st_size
        n = threads or model.spec.threads()
        session = RetainedStateSession(program, batch_size=batch, ctx_len=ctx_len,
                                       session=ort_session(program, n), **session_options)
        drafter = None
        if draft is not None:
            found = resolve_draft(draft, model.program, model=model)
            drafter = make_drafter(model.program, found, threads=n, lookup_ngram=lookup_ngram,
                                   session=None if isinstance(found, str) else ort_session(found.path, n))
        vocab = model.program.manifest["io"]["outputs"][0]["shape"][-1]
        prompts = _prompts(model, batch, prompt_tokens, vocab if isinstance(vocab, int) else 2, prompt_set)
        if prompt_set == "code-rewrite":
            eos = model.tokenizer().eos_token_id
            longest = max(len(p) for p in prompts)
            if longest + generation_len > ctx_len:
                raise QeffGraphError(f"the code-rewrite prompts ({longest} tokens) + --generation-len "
                                     f"({generation_len}) exceed --ctx-len {ctx_len}; raise --ctx-len")
        generate_ids(session, prompts, prompt_len=prompt_len, generation_len=4, drafter=drafter)  # warm-up
        runs.append((variant, session, prompts, weights / 1e6, drafter))
    return runs, eos


def _agreement(got: list[list[int]], ref: list[list[int]]) -> float:
    fractions = []
    for a, b in zip(got, ref):
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        fractions.append(same / max(len(b), 1))
    return float(np.mean(fractions))


def format_table(rows: list[BenchRow]) -> str:
    head = ["variant", "batch", "weights MB", "prefill tok/s", "TTFT s", "decode tok/s", "× first", "agree"]
    spec = any(r.acceptance_rate is not None or r.tokens_per_step is not None for r in rows)
    if spec:
        head += ["accepted", "tok/step"]
    body = [[r.variant, str(r.batch_size), f"{r.weights_mb:.0f}", f"{r.prefill_tok_s:.0f}",
             f"{r.ttft_s:.3f}", f"{r.decode_tok_s:.1f}", f"{r.decode_ratio:.2f}", f"{r.agree:.2f}"]
            + ([f"{r.acceptance_rate:.2f}" if r.acceptance_rate is not None else "-",
                f"{r.tokens_per_step:.2f}" if r.tokens_per_step is not None else "-"] if spec else [])
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
