"""``qeff-graph bench --task embed``: embedding throughput of an encoder program beside its peers.

In one run, interleaved round-robin (``--repeats`` rounds, medians), each system embeds the
same ``--texts`` texts, each exactly ``--seq-len`` tokens long (so nobody gains by padding
less), at each batch size, with the same number of threads:

* ``qeff-graph``: the cached encoder program (pooling and normalization inside the graph);
* ``qeff-graph-int8``: the same with its MatMuls in int8 (``--mxfp6`` on ort: DynamicQuantizeMatMul,
  int8 weights and activations; not exact — its distance shows in the last columns);
* ``ort-export``: plain ONNX Runtime on the unmodified export, pooling in numpy;
* ``sentence-transformers``: its own ``encode`` on torch (when installed).

Reported: sentences/s, how many times faster ``qeff-graph`` is than each system, and the
largest difference of the pooled vectors from ``qeff-graph``'s and their smallest cosine (so a
fast peer that computes something else shows).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time

import numpy as np

from qeff_graph import progress as _progress
from qeff_graph.errors import QeffGraphError

__all__ = ["EmbedRow", "run_embed_bench", "format_embed_table", "PEERS"]

PEERS = ("qeff-graph", "qeff-graph-int8", "ort-export", "sentence-transformers")
TEXT = ("Sentence embeddings map a piece of text to a single vector so that texts with similar meaning "
        "land close together, which makes search, clustering, deduplication and recommendation simple "
        "to build on top of a nearest neighbour index over millions of documents. ")


@dataclasses.dataclass
class EmbedRow:
    system: str
    batch_size: int
    sentences_s: float
    speedup: float = 1.0  # qeff-graph's sentences/s over this system's, at this batch size
    max_diff: float = 0.0  # largest |pooled - qeff-graph's pooled|
    min_cos: float = 1.0  # smallest cosine between a text's pooled vector and qeff-graph's


def _texts(tokenizer, count: int, seq_len: int) -> list[str]:
    """``count`` different texts of exactly ``seq_len`` tokens (special tokens included)."""
    words = (TEXT * (seq_len // 8 + 4)).split()
    texts = []
    for i in range(count):
        rotated = words[i % len(words):] + words[: i % len(words)]
        ids = tokenizer(" ".join(rotated), add_special_tokens=False)["input_ids"][: seq_len - 2]
        texts.append(tokenizer.decode(ids))
    lengths = {len(r) for r in tokenizer(texts)["input_ids"]}
    if max(lengths) > seq_len:
        raise QeffGraphError(f"benchmark texts came out at {sorted(lengths)} tokens, over --seq-len {seq_len}")
    return texts


def _ort_export_runner(onnx_path, threads: int, normalize: bool, pooling: str):
    from qeff_graph.backends.ort.session import cpu_session

    session = cpu_session(onnx_path, threads)
    names = [i.name for i in session.get_inputs()]

    def run(encoded: dict, batch: int) -> np.ndarray:
        out = []
        for first in range(0, len(encoded["input_ids"]), batch):
            feeds = {n: encoded[n][first: first + batch] for n in names if n in encoded}
            if "token_type_ids" in names and "token_type_ids" not in feeds:
                feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
            h = session.run(["last_hidden_state"], feeds)[0]
            m = feeds["attention_mask"][:, :, None].astype(np.float32)
            pooled = {"mean": lambda: (h * m).sum(1) / np.maximum(m.sum(1), 1e-9), "cls": lambda: h[:, 0],
                      "max": lambda: np.where(m > 0, h, -1e9).max(1)}[pooling]()
            if normalize:
                pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
            out.append(pooled)
        return np.concatenate(out)

    return run


def run_embed_bench(model_name: str | None = None, *, peers: list[str] = PEERS, batch_sizes: list[int] = (1, 32),
                    seq_len: int = 128, texts: int = 256, repeats: int = 3, threads: int | None = None,
                    cache_dir=None) -> list[EmbedRow]:
    """Embed the same texts with every peer at every batch size, interleaved; one row each."""
    from qeff_graph.backends.ort.encoder import EncoderSession
    from qeff_graph.generation import embed_ids
    from qeff_graph.models import QEFFAutoModel

    unknown = [p for p in peers if p not in PEERS]
    if unknown or "qeff-graph" not in peers:
        raise QeffGraphError(f"--peers must include qeff-graph and come from {', '.join(PEERS)}")
    threads = threads or len(os.sched_getaffinity(0))
    model = QEFFAutoModel.from_pretrained(model_name, cache_dir=cache_dir)
    model.compile(seq_len=seq_len, batch_size=max(batch_sizes), num_cores=threads)
    tokenizer = model.tokenizer()
    corpus = _texts(tokenizer, texts, seq_len)
    rows_ids = model.encode(corpus, seq_len)
    encoded = {k: np.asarray(v, dtype=np.int64) for k, v in
               tokenizer(corpus, padding="max_length", max_length=seq_len, truncation=True).items()}
    session = EncoderSession(model.program.path, threads=threads)
    pad = tokenizer.pad_token_id or 0

    runners = {"qeff-graph": lambda b: embed_ids(session, rows_ids, seq_lens=(seq_len,), batch_size=b,
                                                 pad_token_id=pad).pooled}
    if "qeff-graph-int8" in peers:
        int8 = EncoderSession(model.compile(seq_len=seq_len, batch_size=max(batch_sizes), num_cores=threads,
                                            mxfp6_matmul=True), threads=threads)
        runners["qeff-graph-int8"] = lambda b: embed_ids(int8, rows_ids, seq_lens=(seq_len,), batch_size=b,
                                                         pad_token_id=pad).pooled
    if "ort-export" in peers:
        ort_run = _ort_export_runner(model.onnx_path, threads, model.normalize, model.pooling)
        runners["ort-export"] = lambda b: ort_run(encoded, b)
    if "sentence-transformers" in peers:
        try:
            import torch
            from sentence_transformers import SentenceTransformer
        except ImportError:
            _progress.say("bench: sentence-transformers is not installed; skipping it")
        else:
            torch.set_num_threads(threads)
            st = SentenceTransformer(model.source, device="cpu")
            runners["sentence-transformers"] = lambda b: st.encode(corpus, batch_size=b, convert_to_numpy=True)
    samples = {(p, b): [] for p in runners for b in batch_sizes}
    outputs = {}
    for p in runners:  # warm-up
        runners[p](max(batch_sizes))
    for r in range(repeats):
        _progress.say(f"bench: round {r + 1}/{repeats}")
        for b in batch_sizes:
            for p, run in runners.items():
                start = time.perf_counter()
                outputs[p] = run(b)
                samples[(p, b)].append(len(corpus) / (time.perf_counter() - start))
    rows = []
    for b in batch_sizes:
        base = statistics.median(samples[("qeff-graph", b)])
        for p in runners:
            speed = statistics.median(samples[(p, b)])
            ours = outputs["qeff-graph"]
            diff = float(np.abs(outputs[p] - ours).max())
            cos = (outputs[p] * ours).sum(-1) / np.maximum(
                np.linalg.norm(outputs[p], axis=-1) * np.linalg.norm(ours, axis=-1), 1e-12)
            rows.append(EmbedRow(p, b, round(speed, 1), round(base / speed, 2), diff, round(float(cos.min()), 6)))
    return rows


def format_embed_table(rows: list[EmbedRow]) -> str:
    head = ["system", "batch", "sentences/s", "qeff-graph is ×", "max |Δ pooled|", "min cos"]
    body = [[r.system, str(r.batch_size), f"{r.sentences_s:.1f}", f"{r.speedup:.2f}", f"{r.max_diff:.1e}",
             f"{r.min_cos:.6f}"] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(head, widths)), "-|-".join("-" * w for w in widths)]
    lines += [" | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(b, widths))) for b in body]
    return "\n".join(lines)
