"""Greedy generation over a :class:`~qeff_graph.backends.ort.RetainedStateSession`.

QEfficient's loop: each batch of prompts is right-padded to a multiple of ``prompt_len``
(pads get ``position_id = -1``) and prefilled chunk by chunk; a row's first token comes from
the chunk holding its last real token. Decode feeds one token per row at ``position =
prompt_len_of_row + step``; a row stops at EOS, at ``generation_len`` tokens, or when its
next position would be ``ctx_len`` (it then reads position -1 until the batch is done).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from qeff_graph.errors import QeffGraphError

__all__ = ["GenerationResult", "StopRule", "check_prompts", "generate_ids", "make_perf", "pad_prompts"]


@dataclasses.dataclass
class GenerationResult:
    prompt_ids: list[list[int]]
    generated_ids: list[list[int]]
    stop_reasons: list[str]  # "eos" | "generation_len" | "ctx_len"
    perf: dict
    logits: list[list[np.ndarray]] | None = None  # per prompt, one vector per generated token


def generate_ids(
    session,
    prompts: Sequence[Sequence[int]],
    *,
    prompt_len: int,
    generation_len: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    on_tokens: Callable[[int, list[int]], None] | None = None,
    return_logits: bool = False,
) -> GenerationResult:
    """Generate greedily for every prompt (token ids), ``session.batch_size`` rows at a time.

    ``on_tokens(prompt_index, new_token_ids)`` is called as tokens are produced (streaming).
    """
    ctx_len, batch = session.ctx_len, session.batch_size
    check_prompts(prompts, ctx_len, prompt_len)
    stop = StopRule.of(eos_token_id, generation_len, ctx_len)
    out_ids: list[list[int]] = [[] for _ in prompts]
    out_logits: list[list[np.ndarray]] | None = [[] for _ in prompts] if return_logits else None
    reasons = [""] * len(prompts)
    prefill_s = decode_s = 0.0
    ttft = None
    start = time.perf_counter()
    decode_tokens = 0
    for first in range(0, len(prompts), batch):
        rows = list(range(first, min(first + batch, len(prompts))))
        ids, pos, lens = pad_prompts([prompts[i] for i in rows], batch, prompt_len)
        session.reset()
        t0 = time.perf_counter()
        last = None
        for c in range(ids.shape[1] // prompt_len):
            sl = slice(c * prompt_len, (c + 1) * prompt_len)
            logits = session.run(ids[:, sl], pos[:, sl], *_batch_index(session, batch), phase="prefill")
            has = (pos[:, sl] >= 0).any(axis=1)
            last = logits[:, 0].copy() if last is None else np.where(has[:, None], logits[:, 0], last)
        prefill_s += time.perf_counter() - t0
        if ttft is None:
            ttft = time.perf_counter() - start
        next_pos = lens.copy()
        active = np.zeros(batch, dtype=bool)
        active[: len(rows)] = True
        t1 = time.perf_counter()
        while True:
            tokens = last.argmax(-1)
            for r, i in enumerate(rows):
                if not active[r]:
                    continue
                token = int(tokens[r])
                out_ids[i].append(token)
                if out_logits is not None:
                    out_logits[i].append(last[r].astype(np.float32))
                if on_tokens is not None:
                    on_tokens(i, [token])
                reasons[i] = stop.reason(token, len(out_ids[i]), int(next_pos[r]))
                active[r] = not reasons[i]
            if not active.any():
                break
            step_pos = np.where(active, next_pos, -1)
            logits = session.run(tokens.reshape(batch, 1), step_pos.reshape(batch, 1),
                                 *_batch_index(session, batch))
            last = logits[:, 0]
            decode_tokens += int(active.sum())
            next_pos += active
        decode_s += time.perf_counter() - t1
    perf = make_perf(prompts, out_ids, prefill_s=prefill_s, ttft=ttft, decode_s=decode_s,
                     decode_tokens=decode_tokens, e2e=time.perf_counter() - start)
    return GenerationResult([list(p) for p in prompts], out_ids, reasons, perf, out_logits)


@dataclasses.dataclass(frozen=True)
class StopRule:
    """When a row stops: at EOS, after ``limit`` tokens, or when the cache is full."""

    eos: frozenset
    limit: int
    ctx_len: int

    @classmethod
    def of(cls, eos_token_id, generation_len: int | None, ctx_len: int) -> StopRule:
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        return cls(frozenset(eos), generation_len if generation_len is not None else ctx_len, ctx_len)

    def reason(self, token: int, generated: int, next_pos: int) -> str:
        """``"eos"``/``"generation_len"``/``"ctx_len"`` if the row stops after ``token``, else ``""``."""
        if token in self.eos:
            return "eos"
        if generated >= self.limit:
            return "generation_len"
        if next_pos >= self.ctx_len:
            return "ctx_len"
        return ""


def pad_prompts(rows: Sequence[Sequence[int]], batch: int, prompt_len: int):
    """Right-pad ``rows`` into ``[batch, chunks * prompt_len]`` ids and positions (pads: -1)."""
    lens = np.zeros(batch, dtype=np.int64)
    lens[: len(rows)] = [len(p) for p in rows]
    width = math.ceil(int(lens.max()) / prompt_len) * prompt_len
    ids = np.zeros((batch, width), dtype=np.int64)
    pos = np.full((batch, width), -1, dtype=np.int64)
    for r, p in enumerate(rows):
        ids[r, : lens[r]] = p
        pos[r, : lens[r]] = np.arange(lens[r])
    return ids, pos, lens


def make_perf(prompts, generated, *, prefill_s: float, ttft: float | None, decode_s: float,
              decode_tokens: int, e2e: float) -> dict:
    """QEfficient-style stats: prefill/TTFT, decode tok/s, total tok/s, E2E."""
    total = sum(len(g) for g in generated)
    return {
        "prefill_s": round(prefill_s, 4),
        "ttft_s": round(ttft or 0.0, 4),
        "decode_s": round(decode_s, 4),
        "decode_tok_s": round(decode_tokens / decode_s, 2) if decode_s > 0 else None,
        "total_tok_s": round(total / e2e, 2) if e2e > 0 else None,
        "e2e_s": round(e2e, 4),
        "generated_tokens": total,
        "prompt_tokens": int(sum(len(p) for p in prompts)),
    }


def check_prompts(prompts: Sequence[Sequence[int]], ctx_len: int, prompt_len: int) -> None:
    """prompt_len >= 1; every prompt is non-empty and leaves room in the cache for one token."""
    if prompt_len < 1:
        raise QeffGraphError(f"prompt_len must be >= 1, got {prompt_len}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise QeffGraphError(f"prompt {i} is empty")
        if len(p) >= ctx_len:
            raise QeffGraphError(
                f"prompt {i} has {len(p)} tokens but ctx_len is {ctx_len}; use a larger "
                "--ctx-len or a shorter prompt"
            )


def _batch_index(session, batch: int) -> tuple:
    if getattr(session, "continuous_batching", False):
        return (np.arange(batch, dtype=np.int64).reshape(batch, 1),)
    return ()
