"""Embedding loop for encoder programs: pad to a seq_len specialization, run in batches.

All inputs of one call are padded to the smallest compiled ``seq_len`` that holds the longest
of them (what a device with static shapes does) and run ``batch_size`` rows at a time; the
outputs are stacked: ``last_hidden_state`` ``[N, seq_len, hidden]``, ``pooled`` ``[N, hidden]``
(when the program pools) and the ``attention_mask`` used.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np

from qeff_graph.errors import QeffGraphError

__all__ = ["EmbeddingResult", "embed_ids", "pick_seq_len"]


@dataclasses.dataclass
class EmbeddingResult:
    last_hidden_state: np.ndarray
    attention_mask: np.ndarray
    pooled: np.ndarray | None
    perf: dict


def pick_seq_len(longest: int, seq_lens: Sequence[int]) -> int:
    """The smallest compiled seq_len that holds ``longest`` tokens."""
    fitting = [n for n in sorted(seq_lens) if n >= longest]
    if not fitting:
        raise QeffGraphError(f"an input has {longest} tokens, more than the largest --seq-len {max(seq_lens)}; "
                             "compile with a larger --seq-len or truncate the input")
    return fitting[0]


def embed_ids(session, rows: Sequence[Sequence[int]], *, seq_lens: Sequence[int], batch_size: int,
              pad_token_id: int = 0, on_batch: Callable[[int], None] | None = None) -> EmbeddingResult:
    """Run token-id ``rows`` through an :class:`~qeff_graph.backends.ort.encoder.EncoderSession`.

    ``on_batch(n_rows)`` is called after every batch (progress).
    """
    if not rows:
        raise QeffGraphError("no input given; pass at least one text")
    if any(len(r) == 0 for r in rows):
        raise QeffGraphError(f"input {next(i for i, r in enumerate(rows) if len(r) == 0)} is empty")
    seq_len = pick_seq_len(max(len(r) for r in rows), seq_lens)
    ids = np.full((len(rows), seq_len), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(rows), seq_len), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    outputs: dict[str, list[np.ndarray]] = {}
    start = time.perf_counter()
    for first in range(0, len(rows), batch_size):
        part = slice(first, first + batch_size)
        for name, value in session.run(ids[part], mask[part]).items():
            outputs.setdefault(name, []).append(value)
        if on_batch is not None:
            on_batch(len(ids[part]))
    seconds = time.perf_counter() - start
    stacked = {name: np.concatenate(values) for name, values in outputs.items()}
    perf = {"seconds": round(seconds, 4), "texts": len(rows), "seq_len": seq_len, "batch_size": batch_size,
            "texts_per_s": round(len(rows) / seconds, 2) if seconds > 0 else None}
    return EmbeddingResult(stacked["last_hidden_state"], mask, stacked.get("pooled"), perf)
