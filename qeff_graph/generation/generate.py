"""Greedy generation over a :class:`~qeff_graph.backends.ort.RetainedStateSession`.

QEfficient's loop. The cache has ``session.batch_size`` rows ("slots"); a scheduler fills idle
slots with queued prompts:

- regular batching: once every slot is idle, the cache is reset and the next ``batch_size``
  prompts are prefilled together as one batch;
- continuous batching (``session.continuous_batching``: the program has ``batch_index``,
  compiled with ``full_batch_size``): an idle slot is refilled at once, its prompt prefilled
  alone with ``batch_index=[[slot]]``; the cache is reset only at the start.

Prefill right-pads prompts to a multiple of ``prompt_len`` (pads get ``position_id = -1``) and
runs chunk by chunk; a row's first token comes from the chunk holding its last real token.
Decode runs all slots together, one token per busy slot at ``position = prompt_len_of_row +
step``, idle slots at position -1. A row stops at EOS, at ``generation_len`` tokens, or when
its next position would be ``ctx_len``.

Speculative decoding (a ``drafter``, :mod:`qeff_graph.generation.speculative`; the program
compiled with ``num_speculative_tokens=K``): before a decode step the drafter proposes up to K
tokens per busy row; the loop then runs the program's *verify* step instead — K+1 tokens per
row (the row's next token, the proposals, fillers for missing ones) at positions ``p .. p+K``,
logits for all of them — and accepts per row the longest prefix of proposals that equals the
program's own greedy tokens, plus the program's next token after it. So each verify step emits
1 to K+1 tokens per row and the tokens are those of plain greedy decoding. A rejected token needs
no rollback: its cache slot lies beyond the row's next position, the position mask hides it, and
the next step writes that slot again. A plain decode step runs instead when no row got a
proposal or a verify step would reach past ``ctx_len``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np

from qeff_graph.errors import QeffGraphError

__all__ = ["GenerationResult", "StopRule", "check_prompts", "generate_ids", "last_logits", "make_perf",
           "pad_prompts", "prefill_rows"]


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
    on_finish: Callable[[int, str], None] | None = None,
    return_logits: bool = False,
    drafter=None,
) -> GenerationResult:
    """Generate greedily for every prompt (token ids) through the ``session.batch_size`` slots.

    Regular or continuous batching follows ``session.continuous_batching`` (module docstring).
    ``on_tokens(prompt_index, new_token_ids)`` is called as tokens are produced (streaming);
    ``on_finish(prompt_index, reason)`` once when a prompt stops (reason as in ``stop_reasons``).
    ``return_logits`` keeps, per prompt, the float32 logits each generated token came from.
    ``drafter`` (a :class:`~qeff_graph.generation.speculative.Drafter` whose ``k`` is the
    program's ``num_speculative_tokens``) turns on speculative decoding: same tokens, fewer steps;
    ``perf`` then also reports the acceptance rate and tokens per target step.
    """
    check_prompts(prompts, session.ctx_len, prompt_len)
    loop = _Loop(session, prompts, prompt_len, StopRule.of(eos_token_id, generation_len, session.ctx_len),
                 on_tokens, on_finish, return_logits, drafter)
    return loop.run()


class _Loop:
    """The state of one :func:`generate_ids` call: slots, outputs and timings."""

    def __init__(self, session, prompts: Sequence[Sequence[int]], prompt_len: int, stop: StopRule,
                 on_tokens: Callable[[int, list[int]], None] | None,
                 on_finish: Callable[[int, str], None] | None, return_logits: bool, drafter=None):
        self.session, self.prompts, self.prompt_len, self.stop = session, prompts, prompt_len, stop
        self.drafter = drafter
        self.on_tokens, self.on_finish = on_tokens, on_finish
        self.continuous = bool(getattr(session, "continuous_batching", False))
        self.slots = session.batch_size
        self.owner = [-1] * self.slots  # prompt index decoding in each slot, -1 when idle
        self.next_pos = np.zeros(self.slots, dtype=np.int64)  # position of the token to feed next
        self.feed = np.zeros(self.slots, dtype=np.int64)  # token to feed next, per slot
        self.queue = deque(range(len(prompts)))
        self.out_ids: list[list[int]] = [[] for _ in prompts]
        self.out_logits: list[list[np.ndarray]] | None = [[] for _ in prompts] if return_logits else None
        self.reasons = [""] * len(prompts)
        self.prefill_s = self.decode_s = 0.0
        self.decode_tokens = 0
        self.ttft: float | None = None
        self.start = 0.0
        # speculative decoding: target steps (decode + verify), busy rows summed over them,
        # verify steps, proposed and accepted draft tokens, seconds spent drafting
        self.steps = self.row_steps = self.verify_steps = self.proposed = self.accepted = 0
        self.draft_s = 0.0

    def run(self) -> GenerationResult:
        """Refill and decode until the queue is empty and every slot is idle."""
        self.start = time.perf_counter()
        if self.continuous:
            self.session.reset()
        while self.queue or self.busy().any():
            self.refill()
            if self.busy().any():
                self.decode()
        perf = make_perf(self.prompts, self.out_ids, prefill_s=self.prefill_s, ttft=self.ttft,
                         decode_s=self.decode_s, decode_tokens=self.decode_tokens,
                         e2e=time.perf_counter() - self.start)
        if self.continuous:
            perf["full_batch_size"] = self.slots
        if self.drafter is not None:
            perf.update(self.speculative_perf())
        return GenerationResult([list(p) for p in self.prompts], self.out_ids, self.reasons, perf,
                                self.out_logits)

    def busy(self) -> np.ndarray:
        """Which slots hold a prompt that is still generating."""
        return np.array([o >= 0 for o in self.owner])

    def refill(self) -> None:
        """Prefill queued prompts into idle slots, as the scheduling allows."""
        if self.continuous:
            for slot in range(self.slots):
                while self.owner[slot] < 0 and self.queue:  # a prompt may stop at its first token
                    self.prefill([(slot, self.queue.popleft())], rows=1)
        elif self.queue and not self.busy().any():
            take = [self.queue.popleft() for _ in range(min(self.slots, len(self.queue)))]
            self.session.reset()
            self.prefill(list(enumerate(take)), rows=self.slots)

    def prefill(self, assign: list[tuple[int, int]], rows: int) -> None:
        """Prefill prompts ``assign = [(slot, prompt_index)]`` as one ``rows``-row batch."""
        prompts = [self.prompts[i] for _, i in assign]
        slots = [slot for slot, _ in assign] if self.continuous else None
        t0 = time.perf_counter()
        last, lens = prefill_rows(self.session, prompts, rows=rows, prompt_len=self.prompt_len, slots=slots)
        self.prefill_s += time.perf_counter() - t0
        if self.ttft is None:
            self.ttft = time.perf_counter() - self.start
        for r, (slot, i) in enumerate(assign):
            self.owner[slot], self.next_pos[slot] = i, lens[r]
            self.emit(slot, last[r])
        if self.drafter is not None:  # the draft's own cache learns the prompts (after the first token)
            t0 = time.perf_counter()
            self.drafter.prefill(prompts, rows=rows, slots=slots)
            self.prefill_s += time.perf_counter() - t0

    def index(self) -> tuple:
        """``batch_index`` of an all-slots step (continuous batching), else nothing."""
        return (np.arange(self.slots, dtype=np.int64).reshape(self.slots, 1),) if self.continuous else ()

    def decode(self) -> None:
        """One step of every slot (a verify step when the drafter proposed); idle slots read position -1."""
        t0 = time.perf_counter()
        busy = self.busy()
        proposals = self.propose(busy)
        if proposals is not None:
            self.verify(busy, proposals)
        else:
            logits = self.session.run(self.feed.reshape(self.slots, 1),
                                      np.where(busy, self.next_pos, -1).reshape(self.slots, 1), *self.index())
            self.decode_tokens += int(busy.sum())
            self.next_pos += busy
            for slot in np.flatnonzero(busy):
                self.emit(int(slot), logits[slot, 0])
        self.steps += 1
        self.row_steps += int(busy.sum())
        self.decode_s += time.perf_counter() - t0

    def sequence(self, slot: int) -> list[int]:
        """The committed tokens of ``slot``'s row: its prompt and what it generated (the last one
        at ``next_pos``, not yet in the cache)."""
        i = self.owner[slot]
        return [*self.prompts[i], *self.out_ids[i]]

    def propose(self, busy: np.ndarray) -> dict[int, list[int]] | None:
        """The drafter's proposals per busy slot, or None for a plain decode step (no drafter, no
        proposal, or a verify step would write past the cache)."""
        if self.drafter is None:
            return None
        slots = [int(s) for s in np.flatnonzero(busy)]
        k = self.drafter.k
        if any(self.next_pos[s] + k >= self.session.ctx_len for s in slots):
            return None
        t0 = time.perf_counter()
        proposals = self.drafter.propose({s: self.sequence(s) for s in slots})
        self.draft_s += time.perf_counter() - t0
        proposals = {s: [int(t) for t in proposals.get(s, [])[:k]] for s in slots}
        return proposals if any(proposals.values()) else None

    def verify(self, busy: np.ndarray, proposals: dict[int, list[int]]) -> None:
        """One verify step (K+1 tokens per busy row); emit each row's accepted tokens."""
        k = self.drafter.k
        ids = np.zeros((self.slots, k + 1), dtype=np.int64)
        pos = np.full((self.slots, k + 1), -1, dtype=np.int64)
        for s, drafted in proposals.items():
            ids[s] = [self.feed[s], *drafted, *[self.feed[s]] * (k - len(drafted))]  # fillers: never accepted
            pos[s] = self.next_pos[s] + np.arange(k + 1)
        logits = self.session.run(ids, pos, *self.index(), phase="verify")
        if logits.shape[1] != k + 1:
            raise QeffGraphError(f"the program returned logits for {logits.shape[1]} of the {k + 1} tokens of a "
                                 f"verify step; compile it with --num-speculative-tokens {k}")
        greedy = logits.argmax(axis=-1)
        self.verify_steps += 1
        for s, drafted in proposals.items():
            taken = 0
            while taken < len(drafted) and drafted[taken] == greedy[s, taken]:
                taken += 1
            self.proposed += len(drafted)
            self.accepted += taken
            for j in range(taken + 1):  # the accepted proposals, then the program's own next token
                self.next_pos[s] += 1
                self.decode_tokens += 1
                self.emit(s, logits[s, j])
                if self.owner[s] < 0:
                    break

    def speculative_perf(self) -> dict:
        """Acceptance rate and tokens per target step (per row) of speculative decoding."""
        return {
            "drafter": self.drafter.name,
            "num_speculative_tokens": self.drafter.k,
            "target_steps": self.steps,
            "verify_steps": self.verify_steps,
            "draft_tokens_proposed": self.proposed,
            "draft_tokens_accepted": self.accepted,
            "acceptance_rate": round(self.accepted / self.proposed, 4) if self.proposed else None,
            "tokens_per_target_step": round(self.decode_tokens / self.row_steps, 3) if self.row_steps else None,
            "draft_s": round(self.draft_s, 4),
        }

    def emit(self, slot: int, logits: np.ndarray) -> None:
        """Append the greedy token of ``slot``'s ``logits``; free the slot if its row stops."""
        i, token = self.owner[slot], int(logits.argmax())
        self.out_ids[i].append(token)
        if self.out_logits is not None:
            self.out_logits[i].append(logits.astype(np.float32))
        if self.on_tokens is not None:
            self.on_tokens(i, [token])
        self.feed[slot] = token
        self.reasons[i] = self.stop.reason(token, len(self.out_ids[i]), int(self.next_pos[slot]))
        if self.reasons[i]:
            self.owner[slot] = -1
            if self.on_finish is not None:
                self.on_finish(i, self.reasons[i])


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


def prefill_rows(session, prompts: Sequence[Sequence[int]], *, rows: int, prompt_len: int,
                 slots: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Chunked prefill of ``prompts`` as one ``rows``-row batch (right-padded to a multiple of
    ``prompt_len``); with continuous batching ``slots`` are the cache rows they go to.

    Returns each row's logits at its last prompt token ``[rows, vocab]`` and the prompt lengths.
    """
    ids, pos, lens = pad_prompts(prompts, rows, prompt_len)
    index = (np.array([[slot] for slot in slots], dtype=np.int64),) if slots is not None else ()
    last = None
    for c in range(ids.shape[1] // prompt_len):
        sl = slice(c * prompt_len, (c + 1) * prompt_len)
        logits = last_logits(session.run(ids[:, sl], pos[:, sl], *index, phase="prefill"), pos[:, sl])
        has = (pos[:, sl] >= 0).any(axis=1)  # rows with real tokens in this chunk
        last = logits.copy() if last is None else np.where(has[:, None], logits, last)
    return last, lens


def last_logits(logits: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
    """``[batch, vocab]``: each row's logits at its last valid position. A program's step returns
    ``[batch, 1, vocab]`` (that position), or every position (a speculative program's step of at
    most K+1 tokens), where the last valid one is the row's largest position id."""
    if logits.shape[1] == 1:
        return logits[:, 0]
    if logits.shape[1] != position_ids.shape[1]:
        raise QeffGraphError(f"the program returned logits for {logits.shape[1]} positions of a "
                             f"{position_ids.shape[1]}-token step; expected 1 or all of them")
    return logits[np.arange(len(logits)), position_ids.argmax(axis=1)]


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
