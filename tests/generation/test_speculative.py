"""Speculative decoding in the generation loop, on fake sessions: the tokens never change,
acceptance is counted per row, stops land inside an accepted run, drafts re-sync their cache.

:class:`SpecFake` is the numpy model of ``test_generate.FakeSession`` (the next token depends on
every id the row wrote into its own cache) that, like a program compiled with
``num_speculative_tokens=K``, returns the logits of every position for a step of at most K+1
tokens. Its cache is a numpy array: a write past ``ctx_len`` raises.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from qeff_graph.errors import QeffGraphError
from qeff_graph.generation import Drafter, ProgramDrafter, PromptLookup, generate_ids
from qeff_graph.generation.speculative import lookup
from tests.generation.test_generate import (
    CTX_LEN,
    PROMPT_LEN,
    PROMPTS,
    VOCAB,
    FakeSession,
    next_token,
    oracle,
    uneven_eos,
)

K = 3


class SpecFake(FakeSession):
    """FakeSession with a verify step: all positions' logits for a step of <= k+1 tokens.
    ``perturb(p)``: positions after which this model predicts another token (a worse draft)."""

    def __init__(self, batch_size: int, ctx_len: int = CTX_LEN, continuous_batching: bool = False,
                 k: int | None = K, perturb=None):
        self.k, self.perturb = k, perturb
        super().__init__(batch_size, ctx_len, continuous_batching)

    def token(self, visible, p: int) -> int:
        t = next_token(visible, p)
        return (t + 1) % VOCAB if self.perturb is not None and self.perturb(p) else t

    def run(self, input_ids, position_ids, batch_index=None, phase="decode"):
        rows = list(range(self.batch_size)) if batch_index is None else \
            [int(r) for r in np.asarray(batch_index).reshape(-1)]
        assert len(rows) == len(input_ids)
        self.calls.append((phase, input_ids.shape, rows, np.array(position_ids)))
        width = input_ids.shape[1]
        every = self.k is not None and width <= self.k + 1
        logits = np.zeros((len(rows), width if every else 1, VOCAB), dtype=np.float32)
        for b, row in enumerate(rows):
            for token, pos in zip(input_ids[b], position_ids[b]):
                if pos >= 0:
                    self.cache[row, pos] = token  # IndexError past ctx_len
            wanted = enumerate(position_ids[b]) if every else [(0, int(position_ids[b].max()))]
            for j, p in wanted:
                if p < 0:
                    logits[b, j] = self.rng.random(VOCAB)
                else:
                    logits[b, j, self.token(self.cache[row, : p + 1], int(p))] = 1.0
        return logits


def continuation(seq, n: int) -> list[int]:
    """The target's next ``n`` greedy tokens after ``seq`` (prompt + generated)."""
    seq = list(seq)
    for _ in range(n):
        seq.append(next_token(seq, len(seq) - 1))
    return seq[-n:]


class Oracle(Drafter):
    """Proposes the target's own continuation, except a wrong token every ``wrong_every``-th
    proposal (counting all proposals made), and nothing for rows in ``silent``."""

    name = "oracle"

    def __init__(self, k: int = K, wrong_every: int | None = None, silent=()):
        self.k, self.wrong_every, self.silent = k, wrong_every, set(silent)
        self.made = 0
        self.expected_accepted = 0

    def propose(self, sequences):
        out = {}
        for slot, seq in sequences.items():
            if slot in self.silent:
                continue
            tokens = continuation(seq, self.k)
            for j in range(self.k):
                self.made += 1
                if self.wrong_every and self.made % self.wrong_every == 0:
                    tokens[j] = (tokens[j] + 1) % VOCAB
            out[slot] = tokens
        return out


MODES = [("regular", 1), ("regular", 3), ("continuous", 2)]


def make(mode, rows, ctx_len=CTX_LEN, **kw):
    return SpecFake(rows, ctx_len, continuous_batching=mode == "continuous", **kw)


@pytest.mark.parametrize("mode, rows", MODES)
@pytest.mark.parametrize("wrong_every", [None, 2, 5])
def test_tokens_equal_plain_greedy(mode, rows, wrong_every):
    eos = uneven_eos()
    expected = [oracle(p, 9, eos) for p in PROMPTS]
    drafter = Oracle(wrong_every=wrong_every)
    streamed = {i: [] for i in range(len(PROMPTS))}
    result = generate_ids(make(mode, rows), PROMPTS, prompt_len=PROMPT_LEN, generation_len=9, eos_token_id=eos,
                          drafter=drafter, return_logits=True, on_tokens=lambda i, t: streamed[i].extend(t))
    plain = generate_ids(make(mode, rows), PROMPTS, prompt_len=PROMPT_LEN, generation_len=9, eos_token_id=eos)
    assert result.generated_ids == [t for t, _ in expected] == plain.generated_ids
    assert result.stop_reasons == [r for _, r in expected] == plain.stop_reasons
    assert [list(streamed[i]) for i in range(len(PROMPTS))] == result.generated_ids
    assert all([int(v.argmax()) for v in lg] == ids for lg, ids in zip(result.logits, result.generated_ids))
    perf = result.perf
    assert perf["drafter"] == "oracle" and perf["num_speculative_tokens"] == K
    assert perf["draft_tokens_proposed"] > 0 and perf["verify_steps"] > 0
    if wrong_every is None:  # a perfect drafter: every proposal accepted that the row had room for
        assert perf["acceptance_rate"] > 0.6
        assert perf["tokens_per_target_step"] > 2
    else:
        assert 0 < perf["acceptance_rate"] < 1
    assert "drafter" not in plain.perf  # plain decoding reports no speculative stats
    assert perf["generated_tokens"] == plain.perf["generated_tokens"]


def test_acceptance_is_per_row_and_counted_exactly():
    """Batch 2: row 0 gets a perfect draft, row 1 none; one verify step emits 1 + K for row 0, 1 for row 1."""
    prompts = [PROMPTS[0], PROMPTS[3]]
    session = SpecFake(2)
    result = generate_ids(session, prompts, prompt_len=PROMPT_LEN, generation_len=1 + K + 1,
                          drafter=Oracle(silent={1}))
    assert result.generated_ids == [oracle(p, 1 + K + 1, None)[0] for p in prompts]
    verify = [c for c in session.calls if c[0] == "verify"]
    assert verify[0][1] == (2, K + 1)
    assert list(verify[0][3][0]) == list(range(len(prompts[0]), len(prompts[0]) + K + 1))
    perf = result.perf
    assert perf["draft_tokens_proposed"] == K and perf["draft_tokens_accepted"] == K  # row 1 proposed nothing
    # row 0: prefill token + K accepted + the verify's own token = K + 2: done after one verify step;
    # row 1 then decodes alone with plain steps (no proposal, no verify)
    assert perf["verify_steps"] == 1 and perf["acceptance_rate"] == 1.0
    assert [c[1] for c in session.calls if c[0] == "decode"] == [(2, 1)] * K


def test_stops_inside_an_accepted_run():
    """EOS and generation_len cut an accepted run short: nothing after the stop is emitted."""
    prompt = PROMPTS[1]
    truth = oracle(prompt, 12, None)[0]
    eos = truth[3]  # the 4th token: inside the first verify step's accepted run
    finished = []
    result = generate_ids(SpecFake(1), [prompt], prompt_len=PROMPT_LEN, generation_len=12, eos_token_id=eos,
                          drafter=Oracle(), on_finish=lambda i, r: finished.append(r))
    assert result.generated_ids == [truth[: truth.index(eos) + 1]] and result.stop_reasons == ["eos"]
    assert finished == ["eos"]
    result = generate_ids(SpecFake(1), [prompt], prompt_len=PROMPT_LEN, generation_len=3, drafter=Oracle())
    assert result.generated_ids == [truth[:3]] and result.stop_reasons == ["generation_len"]


@pytest.mark.parametrize("mode, rows", MODES)
def test_cache_end_falls_back_to_plain_steps(mode, rows):
    """Near ctx_len a verify step would write past the cache: plain decode steps finish the rows."""
    ctx = 14
    prompts = [list(range(1, 10)), [4, 5], [8]]
    expected = [oracle(p, ctx, None, ctx) for p in prompts]
    session = make(mode, rows, ctx)
    result = generate_ids(session, prompts, prompt_len=PROMPT_LEN, drafter=Oracle())
    assert result.generated_ids == [t for t, _ in expected]
    assert result.stop_reasons == [r for _, r in expected] == ["ctx_len", "ctx_len", "generation_len"]
    for phase, _, _, pos in session.calls:
        assert pos.max() < ctx
    assert any(phase == "verify" for phase, *_ in session.calls)
    assert any(phase == "decode" and shape[1] == 1 for phase, shape, *_ in session.calls)


def test_program_without_verify_step_is_refused():
    with pytest.raises(QeffGraphError, match="compile it with --num-speculative-tokens 3"):
        generate_ids(FakeSession(1), [PROMPTS[0]], prompt_len=PROMPT_LEN, generation_len=4, drafter=Oracle())


class Recording(ProgramDrafter):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.log = []

    def propose(self, sequences):
        out = super().propose(sequences)
        self.log.append(({s: list(q) for s, q in sequences.items()}, out))
        return out


@pytest.mark.parametrize("mode, rows", MODES)
def test_program_drafter_resyncs_its_cache(mode, rows):
    """A draft model that errs after every 4th position: rejected proposals leave wrong tokens
    in its cache, yet every later proposal is right up to its next error — the accepted tokens
    were written over them by position id."""
    eos = uneven_eos()
    perturb = (lambda p: p % 4 == 0)  # noqa: E731
    draft_session = make(mode, rows, k=None, perturb=perturb)
    drafter = Recording(draft_session, k=K, prompt_len=PROMPT_LEN, name="fake-draft")
    result = generate_ids(make(mode, rows), PROMPTS, prompt_len=PROMPT_LEN, generation_len=12, eos_token_id=eos,
                          drafter=drafter)
    assert result.generated_ids == [oracle(p, 12, eos)[0] for p in PROMPTS]
    checked = 0
    for sequences, proposals in drafter.log:
        for slot, seq in sequences.items():
            truth = continuation(seq, K)
            for j, token in enumerate(proposals[slot]):
                if perturb(len(seq) - 1 + j):
                    break  # the draft errs here (and may err after)
                assert token == truth[j], (slot, seq, proposals[slot], truth)
                checked += 1
    assert checked > 20
    assert 0 < result.perf["acceptance_rate"] < 1 and result.perf["drafter"] == "fake-draft"


def test_program_drafter_equal_to_the_target_is_always_accepted():
    drafter = ProgramDrafter(SpecFake(3, k=None), k=K, prompt_len=PROMPT_LEN)
    result = generate_ids(SpecFake(3), PROMPTS, prompt_len=PROMPT_LEN, generation_len=12, drafter=drafter)
    assert result.generated_ids == [oracle(p, 12, None)[0] for p in PROMPTS]
    assert result.perf["acceptance_rate"] == 1.0


def test_program_drafter_vocab_limit_cuts_proposals():
    class Big(SpecFake):
        def token(self, visible, p):
            return VOCAB - 1  # always the last id, which the "target" below does not have

    drafter = ProgramDrafter(Big(1, k=None), k=K, prompt_len=PROMPT_LEN, vocab_limit=VOCAB - 1)
    drafter.prefill([PROMPTS[0]], rows=1, slots=None)
    assert drafter.propose({0: list(PROMPTS[0]) + [7]}) == {0: []}


class Copier(SpecFake):
    """A model that repeats its context with period 3 (``x[p+1] = x[p-2]``): prompt lookup's case."""

    def token(self, visible, p):
        return int(visible[p - 2]) if p >= 2 else 1


@pytest.mark.parametrize("mode, rows", MODES)
def test_prompt_lookup_drafts_a_copying_model(mode, rows):
    prompts = [[5, 9, 2, 7], [3, 1], [8, 8, 6, 2, 4, 4, 1]]
    plain = generate_ids(Copier(rows, continuous_batching=mode == "continuous"), prompts, prompt_len=PROMPT_LEN,
                         generation_len=15)
    result = generate_ids(Copier(rows, continuous_batching=mode == "continuous"), prompts, prompt_len=PROMPT_LEN,
                          generation_len=15, drafter=PromptLookup(K, ngram=2))
    assert result.generated_ids == plain.generated_ids
    assert plain.generated_ids[0][:6] == [9, 2, 7, 9, 2, 7]
    assert result.perf["acceptance_rate"] > 0.8 and result.perf["tokens_per_target_step"] > 2.5


def brute_lookup(seq, k, ngram, min_ngram=1):
    for n in range(min(ngram, len(seq) - 1), min_ngram - 1, -1):
        for i in range(len(seq) - n - 1, -1, -1):
            if seq[i:i + n] == seq[-n:]:
                return seq[i + n:i + n + k]
    return []


def test_lookup_is_the_latest_longest_match():
    assert lookup([1, 2, 3, 4, 9, 2, 3, 5, 1, 2, 3], 2, 3) == [4, 9]  # the 3-gram wins over the later 2-gram
    assert lookup([1, 2, 3, 4, 9, 2, 3, 5, 1, 2, 3], 2, 2) == [5, 1]  # latest 2-gram "2 3"
    assert lookup([7, 8, 9], 3, 3) == [] and lookup([4], 2, 2) == []
    assert lookup([5, 6, 5], 4, 1) == [6, 5]
    assert lookup([5, 6, 7, 5], 4, 3) == [6, 7, 5] and lookup([5, 6, 7, 5], 4, 3, min_ngram=2) == []
    assert PromptLookup(2).propose({0: [5, 6, 7, 5], 1: [5, 6, 7, 5, 6]}) == {0: [], 1: [7, 5]}  # 2-grams and up
    assert PromptLookup(2, ngram=1).propose({0: [5, 6, 7, 5]}) == {0: [6, 7]}
    rng = random.Random(0)
    for _ in range(3000):
        seq = [rng.randint(0, 3) for _ in range(rng.randint(1, 25))]
        k, n, m = rng.randint(1, 4), rng.randint(1, 4), rng.randint(1, 3)
        assert lookup(seq, k, n, m) == brute_lookup(seq, k, n, m), (seq, k, n, m)


@pytest.mark.parametrize("k, ngram, message", [(0, 3, "--num-speculative-tokens must be an integer >= 1"),
                                               (2, 0, "--lookup-ngram must be an integer >= 1")])
def test_drafter_options(k, ngram, message):
    with pytest.raises(QeffGraphError, match=message):
        PromptLookup(k, ngram)


def test_program_drafter_catches_up_after_plain_steps():
    """Continuous batching near ctx_len: while one slot is too close to the end for a verify step,
    the others decode plainly (the draft sees none of it); when verify steps resume, the draft
    re-feeds what it missed, and overwrites what it had drafted there, before proposing."""
    ctx = 24
    prompts = [list(range(1, 19)), [4, 5], [8, 3, 3], [2]]
    perturb = (lambda p: p % 5 == 0 or p >= 19)  # noqa: E731 - near the end: one token per step
    drafter = Recording(SpecFake(2, ctx, continuous_batching=True, k=None, perturb=perturb), k=K,
                        prompt_len=PROMPT_LEN)
    session = SpecFake(2, ctx, continuous_batching=True)
    result = generate_ids(session, prompts, prompt_len=PROMPT_LEN, generation_len=20, drafter=drafter)
    assert result.generated_ids == [oracle(p, 20, None, ctx)[0] for p in prompts]
    phases = [phase for phase, *_ in session.calls]
    plain = [i for i, phase in enumerate(phases) if phase == "decode"]
    assert plain and any(phase == "verify" for phase in phases[plain[-1]:])  # verify steps resumed
    # slot 1 decoded plainly in those steps and went on with verify steps: the draft had to catch up
    resumed = [rows_pos for phase, _, _, rows_pos in session.calls[plain[-1] + 1:] if phase == "verify"]
    assert resumed and resumed[0][1][0] > session.calls[plain[0]][3][1][0] + 1
    for sequences, proposals in drafter.log:
        for slot, seq in sequences.items():
            truth = continuation(seq, K)
            for j, token in enumerate(proposals[slot]):
                if perturb(len(seq) - 1 + j):
                    break
                assert token == truth[j], (slot, seq, proposals[slot], truth)
