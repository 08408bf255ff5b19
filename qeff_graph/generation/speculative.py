"""Drafters for speculative decoding: they propose the next tokens, the program verifies them.

The generation loop (:func:`~qeff_graph.generation.generate_ids` with ``drafter=``) asks a
drafter, before each decode step, for up to ``k`` tokens per busy row
(:meth:`Drafter.propose`, given each row's committed tokens: prompt + generated, the last one
not yet in the target's cache), runs the target program's verify step on them and keeps the
longest prefix the target agrees with. Greedy output never changes; a good drafter only makes
the target take fewer steps.

- :class:`PromptLookup` (``--draft prompt-lookup``): no model. The last ``n`` tokens of the row
  (``n`` = ``ngram`` down to 2, or 1 with ``ngram=1``) are looked up earlier in the row's own
  prompt and output; the tokens that followed their latest occurrence are the proposal (none
  when even the shortest n-gram does not recur: that step decodes plainly). Pays off when the
  answer copies from the input (rewriting code, quoting, extraction).
- :class:`ProgramDrafter` (``--draft self-int4`` or ``--draft PATH_OR_ID``): a smaller or
  quantized program with the same tokenizer, run greedily for ``k`` steps with its own
  :class:`~qeff_graph.backends.ort.RetainedStateSession` (one cache row per target slot).
  Its cache is kept in sync by position id, like the target's: it remembers which token it
  wrote at each position, and each round first re-feeds, in one step, every committed token it
  does not have (a rejected proposal's slot is simply written again with the accepted token).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import numpy as np

from qeff_graph.errors import QeffGraphError
from qeff_graph.generation.generate import last_logits, prefill_rows

__all__ = ["Drafter", "PromptLookup", "ProgramDrafter", "DEFAULT_LOOKUP_NGRAM", "lookup"]

DEFAULT_LOOKUP_NGRAM = 3
# shortest n-gram prompt lookup drafts from (capped at --lookup-ngram): single-token matches
# were accepted too rarely to pay for their verify steps (measured on SmolLM2)
MIN_LOOKUP_NGRAM = 2


class Drafter(abc.ABC):
    """Proposes up to ``k`` tokens per row; ``name`` is reported in the perf stats."""

    name: str = "drafter"
    k: int = 1

    def prefill(self, prompts: Sequence[Sequence[int]], *, rows: int, slots: Sequence[int] | None) -> None:
        """The target just prefilled ``prompts`` (as one ``rows``-row batch after a reset, or with
        continuous batching each into its cache row in ``slots``); a drafter with a cache does too."""

    @abc.abstractmethod
    def propose(self, sequences: dict[int, list[int]]) -> dict[int, list[int]]:
        """``{slot: committed tokens}`` → ``{slot: up to k proposed next tokens}``."""


def _check_k(k) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise QeffGraphError(f"--num-speculative-tokens must be an integer >= 1, got {k!r}")
    return k


def lookup(sequence: Sequence[int], k: int, ngram: int, min_ngram: int = 1) -> list[int]:
    """Prompt lookup: the up to ``k`` tokens that followed the latest earlier occurrence of the
    sequence's last ``n`` tokens, for the largest ``n <= ngram`` that occurs (``n >= min_ngram``);
    else ``[]``."""
    seq = np.asarray(sequence, dtype=np.int64)
    last = len(seq) - 1
    ends = np.flatnonzero(seq[:last] == seq[last])  # earlier matches of the last token (each has a successor)
    if not len(ends):
        return []
    n = 1
    for j in range(1, min(ngram, last)):  # extend the match backwards while some occurrence still agrees
        longer = ends[ends >= j]
        longer = longer[seq[longer - j] == seq[last - j]]
        if not len(longer):
            break
        ends, n = longer, j + 1
    if n < min_ngram:
        return []
    start = int(ends[-1]) + 1
    return seq[start: start + k].tolist()


class PromptLookup(Drafter):
    """n-gram match against the row's prompt and generated text (no model)."""

    name = "prompt-lookup"

    def __init__(self, k: int, ngram: int = DEFAULT_LOOKUP_NGRAM):
        self.k = _check_k(k)
        if not isinstance(ngram, int) or isinstance(ngram, bool) or ngram < 1:
            raise QeffGraphError(f"--lookup-ngram must be an integer >= 1, got {ngram!r}")
        self.ngram = ngram
        self.min_ngram = min(MIN_LOOKUP_NGRAM, ngram)

    def propose(self, sequences: dict[int, list[int]]) -> dict[int, list[int]]:
        return {slot: lookup(seq, self.k, self.ngram, self.min_ngram) for slot, seq in sequences.items()}


class ProgramDrafter(Drafter):
    """A draft program run greedily for ``k`` steps per round (module docstring).

    Args:
        session: a :class:`~qeff_graph.backends.ort.RetainedStateSession` of the draft program
            with as many cache rows as the target (``full_batch_size`` with continuous
            batching: then the draft program must have ``batch_index`` too) and the target's
            ``ctx_len``.
        k: tokens proposed per round (the target's ``num_speculative_tokens``).
        prompt_len: the draft program's prefill chunk length.
        vocab_limit: the target's vocabulary size; a proposal stops before a larger id.
    """

    def __init__(self, session, *, k: int, prompt_len: int, name: str = "draft",
                 vocab_limit: int | None = None):
        self.session, self.k, self.prompt_len = session, _check_k(k), prompt_len
        self.name, self.vocab_limit = name, vocab_limit
        self.continuous = bool(getattr(session, "continuous_batching", False))
        self.known: list[list[int]] = [[] for _ in range(session.batch_size)]  # token at each cache position

    def prefill(self, prompts: Sequence[Sequence[int]], *, rows: int, slots: Sequence[int] | None) -> None:
        if (slots is not None) != self.continuous:
            raise QeffGraphError("the draft program and the target differ in continuous batching "
                                 "(--full-batch-size); compile the draft with the target's shapes")
        if slots is None:
            self.session.reset()
            self.known = [[] for _ in range(self.session.batch_size)]
        prefill_rows(self.session, prompts, rows=rows, prompt_len=self.prompt_len, slots=slots)
        for r, prompt in enumerate(prompts):
            self.known[slots[r] if slots is not None else r] = list(prompt)

    def propose(self, sequences: dict[int, list[int]]) -> dict[int, list[int]]:
        rows = self.session.batch_size
        slots = sorted(sequences)
        synced = {}
        for s in slots:  # positions whose draft cache entry holds the committed token
            seq, known = sequences[s], self.known[s]
            n = min(len(seq), len(known))
            diff = np.flatnonzero(np.asarray(seq[:n]) != np.asarray(known[:n]))
            synced[s] = int(diff[0]) if len(diff) else n
        # one step re-feeds the last `width` committed tokens of every row: what a row lacks,
        # plus already-cached ones written again with the same token (pads where a row is shorter)
        width = max(1, *(len(sequences[s]) - synced[s] for s in slots))
        ids = np.zeros((rows, width), dtype=np.int64)
        pos = np.full((rows, width), -1, dtype=np.int64)
        for s in slots:
            seq = sequences[s]
            first = max(0, len(seq) - width)
            ids[s, width - (len(seq) - first):] = seq[first:]
            pos[s, width - (len(seq) - first):] = np.arange(first, len(seq))
            self.known[s] = list(seq)
        index = (np.arange(rows, dtype=np.int64).reshape(rows, 1),) if self.continuous else ()
        drafted = {s: [] for s in slots}
        for step in range(self.k):
            if step:  # feed the token just drafted at the next position
                ids = np.zeros((rows, 1), dtype=np.int64)
                pos = np.full((rows, 1), -1, dtype=np.int64)
                for s in slots:
                    ids[s, 0] = drafted[s][-1]
                    pos[s, 0] = len(sequences[s]) + step - 1
                    self.known[s].append(drafted[s][-1])
            tokens = last_logits(self.session.run(ids, pos, *index), pos).argmax(axis=-1)
            for s in slots:
                drafted[s].append(int(tokens[s]))
        if self.vocab_limit is not None:
            for s in slots:
                out = next((i for i, t in enumerate(drafted[s]) if t >= self.vocab_limit), None)
                drafted[s] = drafted[s][:out]
        return drafted
