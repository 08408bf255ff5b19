"""Numeric verification: does a program compute what the graph it came from computes?

:func:`verify_program` runs the same prompts (token ids of different lengths, one longer than
two prefill chunks) through

* the **reference**: the source ONNX graph with its dynamic KV cache (each prompt alone, cache
  concatenated step by step), or Hugging Face transformers when ``reference`` names a model
  folder (or the export recorded a local source folder that still exists), and
* the **program**: one right-padded batch with chunked prefill through
  :class:`~qeff_graph.backends.ort.RetainedStateSession` and the one generation loop,

and reports per prompt the share of greedy tokens before the first difference and the largest
logit difference over the steps both runs shared (logits after a token differs are not
comparable). :func:`bisect_pipeline` rebuilds the program's pipeline pass by pass from the source
and names the first pass after which the outputs differ: a checkpoint is every point where the
graph is runnable in a known contract (the source contract before the retained-state rewrite,
the program contract once ``past-shape``, ``position-mask`` and ``kv-retention`` have all run).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from qeff_graph import progress
from qeff_graph.errors import QeffGraphError

__all__ = ["VerifyReport", "verify_program", "bisect_pipeline", "SourceSession", "REWRITE_CORE", "hf_greedy"]

# Passes that together turn the source contract into the program contract.
REWRITE_CORE = ("past-shape", "position-mask", "kv-retention")
DEFAULT_LENGTHS = (5, 19, 3, 10)


@dataclasses.dataclass
class VerifyReport:
    reference: str  # "onnx:<path>" or "transformers:<dir>"
    prompt_lengths: list[int]
    new_tokens: int
    agreement: list[float]  # per prompt: share of tokens before the first difference
    max_logit_diff: float  # over the steps where both runs had produced the same tokens
    tolerance: float

    @property
    def tokens_equal(self) -> bool:
        return all(a == 1.0 for a in self.agreement)

    @property
    def passed(self) -> bool:
        return self.tokens_equal and self.max_logit_diff < self.tolerance

    def summary(self) -> str:
        mean = sum(self.agreement) / len(self.agreement)
        verdict = "OK" if self.passed else "MISMATCH"
        return (f"{verdict}: {len(self.agreement)} prompts (lengths {self.prompt_lengths}), {self.new_tokens} "
                f"new tokens each, token agreement {mean:.3f} (per prompt "
                f"{', '.join(f'{a:.2f}' for a in self.agreement)}), max logit diff {self.max_logit_diff:.3g} "
                f"(tolerance {self.tolerance:g}) vs {self.reference}")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "tokens_equal": self.tokens_equal, "passed": self.passed}


class SourceSession:
    """Greedy decoding on a dynamic-KV source graph (any exporter), one prompt at a time."""

    def __init__(self, onnx_path: str | os.PathLike, threads: int | None = None):
        from qeff_graph import ir as qir
        from qeff_graph.backends.ort.session import cpu_session

        graph = qir.load(onnx_path)
        kv = qir.find_kv_cache(graph)
        if kv.retained:
            raise QeffGraphError(f"{onnx_path} is a retained-state program, not a source export; pass the "
                                 "ONNX export the program was built from")
        io = qir.find_io(graph, kv)
        if io.input_ids is None or io.logits is None:
            raise QeffGraphError(f"{onnx_path}: no input_ids input or no logits output found")
        self.ids_name = io.input_ids.name
        self.mask_name = io.attention_mask.name if io.attention_mask is not None else None
        self.pos_name = io.position_ids.name if io.position_ids is not None else None
        self.logits_name = io.logits.name
        self.cache = []  # (past name, present name, heads, head_dim, numpy dtype)
        for e in (e for layer in kv.layers for e in (layer.key, layer.value)):
            dims = list(e.past.shape.dims) if e.past.shape is not None else []
            if len(dims) != 4 or not isinstance(dims[1], int) or not isinstance(dims[3], int):
                raise QeffGraphError(f"{onnx_path}: cache input {e.past.name} has no static heads/head_dim")
            self.cache.append((e.past.name, e.present.name, dims[1], dims[3], e.past.dtype.numpy()))
        known = {self.ids_name, self.mask_name, self.pos_name, *(c[0] for c in self.cache)}
        extra = [v.name for v in graph.graph.inputs if v.name not in known]
        if extra:
            raise QeffGraphError(f"{onnx_path}: inputs {extra} are not ones verify knows how to feed "
                                 "(input_ids, attention_mask, position_ids, past key/values)")
        del graph, kv, io  # the session holds its own copy
        self.session = cpu_session(onnx_path, threads)
        self.outputs = [self.logits_name, *(c[1] for c in self.cache)]
        vocab = next(o.shape[-1] for o in self.session.get_outputs() if o.name == self.logits_name)
        self.vocab = vocab if isinstance(vocab, int) else None

    def generate(self, prompt: list[int], new_tokens: int) -> tuple[list[int], list[np.ndarray]]:
        past = {name: np.zeros((1, heads, 0, dim), dtype) for name, _, heads, dim, dtype in self.cache}
        ids = np.array([prompt], np.int64)
        start, tokens, logits = 0, [], []
        for _ in range(new_tokens):
            seq = ids.shape[1]
            feeds = {self.ids_name: ids, **past}
            if self.mask_name:
                feeds[self.mask_name] = np.ones((1, start + seq), np.int64)
            if self.pos_name:
                feeds[self.pos_name] = np.arange(start, start + seq, dtype=np.int64)[None]
            out = self.session.run(self.outputs, feeds)
            row = out[0][0, -1].astype(np.float32)
            token = int(row.argmax())
            tokens.append(token)
            logits.append(row)
            past = {c[0]: value for c, value in zip(self.cache, out[1:])}
            start += seq
            ids = np.array([[token]], np.int64)
        return tokens, logits


def hf_greedy(model, prompt: list[int], new_tokens: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and float32 logits of a transformers model: plain steps with its cache, no
    logits processors (``generate`` with ``min_new_tokens`` would hide an EOS the program rightly
    picks)."""
    import torch

    ids, past, tokens, logits = torch.tensor([prompt]), None, [], []
    with torch.no_grad():
        for _ in range(new_tokens):
            out = model(input_ids=ids, past_key_values=past, use_cache=True)
            row = out.logits[0, -1].float().numpy()
            tokens.append(int(row.argmax()))
            logits.append(row)
            past, ids = out.past_key_values, torch.tensor([[tokens[-1]]])
    return tokens, logits


class _HFReference:
    def __init__(self, directory: str | os.PathLike):
        from qeff_graph.export.loader import load_hf_model

        self.model, _ = load_hf_model(str(directory))

    def generate(self, prompt: list[int], new_tokens: int) -> tuple[list[int], list[np.ndarray]]:
        return hf_greedy(self.model, prompt, new_tokens)


def recorded_reference(source: Path) -> str | None:
    """The local model folder (or GGUF file) the export beside ``source`` was made from, if it
    is still there (``export.json``), else None."""
    try:
        info = json.loads((source.parent / "export.json").read_text())
    except (OSError, ValueError):
        return None
    src = info.get("source")
    if not isinstance(src, str) or not Path(src).exists():
        return None
    gguf = info.get("gguf_file")
    return str(Path(src) / gguf) if gguf and Path(src).is_dir() else src


def verify_prompts(vocab: int, prompt_len: int, ctx_len: int, new_tokens: int, count: int, seed: int = 0):
    """``count`` prompts of token ids in ``[1, vocab)``; lengths cycle through 5, 2·prompt_len+3,
    3, 10 (one spans three prefill chunks), capped so that every prompt fits ctx_len."""
    rng = np.random.default_rng(seed)
    lengths = [5, 2 * prompt_len + 3, 3, 10]
    cap = ctx_len - new_tokens
    if cap < 1:
        raise QeffGraphError(f"--new-tokens {new_tokens} leaves no room for a prompt in ctx_len {ctx_len}")
    return [rng.integers(1, vocab, min(lengths[i % 4], cap)).tolist() for i in range(count)]


def verify_program(source: str | os.PathLike, program: str | os.PathLike, *, prompts: int = 4,
                   new_tokens: int = 8, reference: str | os.PathLike | None = None, tolerance: float = 1e-4,
                   threads: int | None = None, seed: int = 0) -> VerifyReport:
    """Compare ``program`` with ``source`` (or transformers, see module doc) on ``prompts`` prompts."""
    from qeff_graph.backends.ort import RetainedStateSession
    from qeff_graph.generation import generate_ids
    from qeff_graph.program.build import Program

    if prompts < 1 or new_tokens < 1:
        raise QeffGraphError(f"--prompts ({prompts}) and --new-tokens ({new_tokens}) must be >= 1")
    source = Path(source)
    if source.is_dir():
        source = source / "model.onnx"
    if not source.is_file():
        raise QeffGraphError(f"source {source} does not exist; pass the ONNX export the program was built from")
    prog = Program.open(program)
    if prog.spec.kind != "causal-lm":
        raise QeffGraphError(f"{prog.path} is an encoder program; verify compares causal-LM programs")
    spec = prog.spec
    ref_dir = str(reference) if reference not in (None, "onnx") else None
    if reference is None:
        ref_dir = recorded_reference(source)
    with progress.task("verify: reference"):
        ref = _HFReference(ref_dir) if ref_dir else SourceSession(source, threads)
    label = f"transformers:{ref_dir}" if ref_dir else f"onnx:{source}"
    session = RetainedStateSession(prog.path, batch_size=prompts, ctx_len=spec.ctx_len, threads=threads)
    vocab = _vocab(session)
    if vocab is None:
        raise QeffGraphError(f"{prog.path}: the logits output has no static vocabulary size")
    batch = verify_prompts(vocab, spec.prompt_len, spec.ctx_len, new_tokens, prompts, seed)
    with progress.task(f"verify: {prompts} prompts × {new_tokens} tokens"):
        expected = [ref.generate(p, new_tokens) for p in batch]
        got = generate_ids(session, batch, prompt_len=spec.prompt_len, generation_len=new_tokens,
                           return_logits=True)
    return _compare(label, batch, new_tokens, tolerance, expected, list(zip(got.generated_ids, got.logits)))


def _compare(label: str, batch, new_tokens: int, tolerance: float, expected, got) -> VerifyReport:
    """Per prompt: the share of ``expected`` tokens before the first difference, and the largest
    logit difference over the steps up to it (later logits are not comparable)."""
    agreement, diff = [], 0.0
    for (tokens, logits), (mine, my_logits) in zip(expected, got):
        same = next((i for i, (a, b) in enumerate(zip(tokens, mine)) if a != b), min(len(tokens), len(mine)))
        agreement.append(same / len(tokens))
        for a, b in zip(logits[: same + 1], my_logits[: same + 1]):
            diff = max(diff, float(np.abs(a - b).max()))
    return VerifyReport(label, [len(p) for p in batch], new_tokens, agreement, diff, tolerance)


def _vocab(session) -> int | None:
    shape = next(o.shape for o in session.session.get_outputs() if o.name == "logits")
    return shape[-1] if isinstance(shape[-1], int) else None


@dataclasses.dataclass
class BisectStep:
    passes: list[str]  # the pipeline prefix
    contract: str  # "source" | "program"
    report: VerifyReport | None  # None for the source contract before any pass changed it


def bisect_pipeline(source: str | os.PathLike, program: str | os.PathLike, **verify) -> tuple[str | None, list]:
    """Re-run ``program``'s pipeline on ``source`` pass by pass; verify at every checkpoint.

    Returns ``(culprit, steps)``: ``culprit`` names the pass (or the passes since the last good
    checkpoint, joined with ``+``) after which the outputs first differ, or None when none does.
    """
    from qeff_graph.program.build import Program, build_program

    prog = Program.open(program)
    names = [e["pass"] for e in prog.manifest["pipeline"]]
    base = dataclasses.replace(prog.spec, backend="ort")
    steps: list[BisectStep] = []
    last_good = 0
    with tempfile.TemporaryDirectory(prefix="qeff-bisect-") as tmp:
        for i in range(1, len(names) + 1):
            prefix = names[:i]
            core = [n for n in REWRITE_CORE if n in prefix]
            if core and len(core) < len(REWRITE_CORE):
                continue  # mid-rewrite: no contract to run it in
            if not core:
                report = _verify_source_prefix(source, prefix, Path(tmp) / f"step{i}",
                                               base.pass_options(base.sliding_window), **verify)
                contract = "source"
            else:
                out = Path(tmp) / f"step{i}"
                with progress.quiet():
                    build_program(source, dataclasses.replace(base, passes=tuple(prefix)), out)
                report = verify_program(source, out, **verify)
                contract = "program"
            steps.append(BisectStep(prefix, contract, report))
            if not report.passed:
                culprit = "+".join(names[last_good:i])
                return culprit, steps
            last_good = i
    return None, steps


def _verify_source_prefix(source, prefix: list[str], out: Path, options: dict, **verify) -> VerifyReport:
    """Passes that run before the retained-state rewrite keep the source contract: compare the
    rewritten source graph with the original, both run as sources."""
    from qeff_graph import ir as qir
    from qeff_graph.passes import PassManager, build_pipeline

    graph = qir.load(source)
    PassManager(build_pipeline(prefix, **options))(graph)
    out.mkdir(parents=True)
    qir.save(graph, out / "model.onnx")
    new_tokens, count = verify.get("new_tokens", 8), verify.get("prompts", 4)
    ref, mine = SourceSession(source), SourceSession(out / "model.onnx")
    if ref.vocab is None:
        raise QeffGraphError(f"{source}: the logits output has no static vocabulary size")
    batch = verify_prompts(ref.vocab, 8, 10 ** 6, new_tokens, count)
    return _compare(f"onnx:{source}", batch, new_tokens, verify.get("tolerance", 1e-4),
                    [ref.generate(p, new_tokens) for p in batch], [mine.generate(p, new_tokens) for p in batch])
