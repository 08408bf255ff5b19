"""Continuous batching over a program compiled with ``full_batch_size`` (QEfficient's scheme).

The cache has ``full_batch_size`` rows ("slots"). Each prompt is prefilled alone (batch 1,
``batch_index=[[slot]]``, chunked by ``prompt_len``) into a free slot; decode runs all slots
together (``batch_index = arange(full_batch_size)``), idle slots reading position -1. When a
slot finishes (EOS, ``generation_len`` or ``ctx_len``) the next queued prompt is prefilled
into it; that prefill time counts as prefill.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np

from qeff_graph.errors import QeffGraphError
from qeff_graph.generation.generate import (
    GenerationResult,
    StopRule,
    check_prompts,
    make_perf,
    pad_prompts,
)

__all__ = ["generate_continuous"]


def generate_continuous(
    session,
    prompts: Sequence[Sequence[int]],
    *,
    prompt_len: int,
    generation_len: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    on_tokens: Callable[[int, list[int]], None] | None = None,
) -> GenerationResult:
    """Greedy generation with slot refilling; ``session.batch_size`` is ``full_batch_size``."""
    if not getattr(session, "continuous_batching", False):
        raise QeffGraphError("this program has no batch_index input; compile it with --full-batch-size")
    slots, ctx_len = session.batch_size, session.ctx_len
    check_prompts(prompts, ctx_len, prompt_len)
    stop = StopRule.of(eos_token_id, generation_len, ctx_len)
    out_ids: list[list[int]] = [[] for _ in prompts]
    reasons = [""] * len(prompts)
    queue = deque(range(len(prompts)))
    owner = [-1] * slots  # prompt index decoding in each slot, -1 when idle
    next_pos = np.zeros(slots, dtype=np.int64)
    last = np.zeros(slots, dtype=np.int64)  # token to feed next, per slot
    prefill_s = decode_s = 0.0
    decode_tokens = 0
    ttft = None
    start = time.perf_counter()
    session.reset()

    def emit(slot: int, token: int) -> None:
        i = owner[slot]
        out_ids[i].append(token)
        if on_tokens is not None:
            on_tokens(i, [token])
        reasons[i] = stop.reason(token, len(out_ids[i]), int(next_pos[slot]))
        if reasons[i]:
            owner[slot] = -1
        else:
            last[slot] = token

    def prefill(slot: int, i: int) -> None:
        nonlocal prefill_s, ttft
        t0 = time.perf_counter()
        ids, pos, lens = pad_prompts([prompts[i]], 1, prompt_len)
        for c in range(ids.shape[1] // prompt_len):
            sl = slice(c * prompt_len, (c + 1) * prompt_len)
            logits = session.run(ids[:, sl], pos[:, sl], np.array([[slot]]), phase="prefill")
        prefill_s += time.perf_counter() - t0
        ttft = ttft if ttft is not None else time.perf_counter() - start
        owner[slot], next_pos[slot] = i, lens[0]
        emit(slot, int(logits[0, 0].argmax()))

    while queue or any(o >= 0 for o in owner):
        for slot in range(slots):
            while owner[slot] < 0 and queue:
                prefill(slot, queue.popleft())
        active = np.array([o >= 0 for o in owner])
        if not active.any():
            continue
        t1 = time.perf_counter()
        logits = session.run(last.reshape(slots, 1), np.where(active, next_pos, -1).reshape(slots, 1),
                             np.arange(slots).reshape(slots, 1))
        decode_s += time.perf_counter() - t1
        decode_tokens += int(active.sum())
        next_pos += active
        for slot in np.flatnonzero(active):
            emit(int(slot), int(logits[slot, 0].argmax()))
    perf = make_perf(prompts, out_ids, prefill_s=prefill_s, ttft=ttft, decode_s=decode_s,
                     decode_tokens=decode_tokens, e2e=time.perf_counter() - start)
    perf["full_batch_size"] = slots
    return GenerationResult([list(p) for p in prompts], out_ids, reasons, perf)
