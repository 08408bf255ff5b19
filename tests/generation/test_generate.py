"""The generation loop on a fake session: regular and continuous batching, stops, callbacks.

:class:`FakeSession` has :class:`~qeff_graph.backends.ort.RetainedStateSession`'s interface and
a deterministic "model": the next token after position ``p`` is ``(sum of the cached ids at
positions <= p) * 7 + p`` modulo the vocab, so it depends on everything the row wrote into its own
cache row. Pads (position -1) write nothing; a row with no real token gets noise logits.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from qeff_graph.errors import QeffGraphError
from qeff_graph.generation import generate_ids

VOCAB = 53
PROMPT_LEN = 4
CTX_LEN = 40
# lengths 3, 11, 1, 5, 9: one chunk of PROMPT_LEN, several, and a partial last chunk
PROMPTS = [[5, 9, 2], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [7], [3, 3, 8, 20, 41],
           [12, 30, 1, 4, 6, 7, 2, 9, 50]]


class FakeSession:
    """RetainedStateSession's interface over the numpy model described in the module docstring."""

    def __init__(self, batch_size: int, ctx_len: int = CTX_LEN, continuous_batching: bool = False):
        self.batch_size, self.ctx_len, self.continuous_batching = batch_size, ctx_len, continuous_batching
        self.rng = np.random.default_rng(0)
        self.resets = 0
        self.calls: list[tuple] = []  # (phase, input shape, cache rows, position_ids)
        self.reset()

    def reset(self) -> None:
        self.cache = np.zeros((self.batch_size, self.ctx_len), dtype=np.int64)
        self.resets += 1

    def run(self, input_ids, position_ids, batch_index=None, phase="decode"):
        assert (batch_index is not None) == self.continuous_batching
        if batch_index is None:
            assert len(input_ids) == self.batch_size
            rows = list(range(self.batch_size))
        else:
            rows = [int(r) for r in np.asarray(batch_index).reshape(-1)]
            assert len(rows) == len(input_ids) and len(set(rows)) == len(rows)
        self.calls.append((phase, input_ids.shape, rows, np.array(position_ids)))
        logits = np.zeros((len(rows), 1, VOCAB), dtype=np.float32)
        for b, row in enumerate(rows):
            for token, pos in zip(input_ids[b], position_ids[b]):
                if pos >= 0:
                    self.cache[row, pos] = token
            p = int(position_ids[b].max())
            if p < 0:
                logits[b, 0] = self.rng.random(VOCAB)
            else:
                logits[b, 0, next_token(self.cache[row, : p + 1], p)] = 1.0 + p / 100
        return logits


def next_token(visible, pos: int) -> int:
    return (int(np.sum(visible)) * 7 + pos) % VOCAB


def oracle(prompt, generation_len: int, eos: int | None, ctx_len: int = CTX_LEN) -> tuple[list[int], str]:
    """The tokens and stop reason of one prompt, straight from the model's definition."""
    seq, out = list(prompt), []
    while True:
        token = next_token(seq, len(seq) - 1)
        out.append(token)
        if token == eos:
            return out, "eos"
        if len(out) >= generation_len:
            return out, "generation_len"
        if len(seq) >= ctx_len:  # the next token would be fed at position ctx_len
            return out, "ctx_len"
        seq.append(token)


def make(mode: str, ctx_len: int = CTX_LEN) -> FakeSession:
    """``regular{n}``: n rows, regular batching; ``continuous{n}``: n slots, continuous batching."""
    kind, rows = re.fullmatch(r"(regular|continuous)(\d+)", mode).groups()
    return FakeSession(int(rows), ctx_len, continuous_batching=kind == "continuous")


MODES = ["regular2", "regular3", "continuous2"]


def solo(prompts, **kw):
    return [generate_ids(FakeSession(1), [p], prompt_len=PROMPT_LEN, **kw) for p in prompts]


@pytest.mark.parametrize("mode", MODES)
def test_batched_equals_solo(mode):
    eos = uneven_eos()
    expected = [oracle(p, 8, eos) for p in PROMPTS]
    assert len({len(t) for t, _ in expected}) > 1 and {r for _, r in expected} == {"eos", "generation_len"}
    session = make(mode)
    tokens, finished = {i: [] for i in range(len(PROMPTS))}, []

    def on_tokens(i, new):
        assert i not in [f for f, _ in finished]  # nothing after a prompt's finish
        tokens[i].extend(new)

    result = generate_ids(session, PROMPTS, prompt_len=PROMPT_LEN, generation_len=8, eos_token_id=eos,
                          on_tokens=on_tokens, on_finish=lambda i, reason: finished.append((i, reason)),
                          return_logits=True)
    alone = solo(PROMPTS, generation_len=8, eos_token_id=eos, return_logits=True)
    for i, (want, reason) in enumerate(expected):
        assert result.generated_ids[i] == want == alone[i].generated_ids[0], i
        assert result.stop_reasons[i] == reason == alone[i].stop_reasons[0], i
        assert tokens[i] == want
        assert len(result.logits[i]) == len(want)
        assert [int(v.argmax()) for v in result.logits[i]] == want
        assert all(v.dtype == np.float32 and v.shape == (VOCAB,) for v in result.logits[i])
        assert all(np.array_equal(a, b) for a, b in zip(result.logits[i], alone[i].logits[0]))
    assert sorted(finished) == sorted(enumerate(result.stop_reasons))  # once each, with its reason
    assert result.prompt_ids == PROMPTS
    assert result.perf["generated_tokens"] == sum(len(t) for t, _ in expected)
    assert result.perf["prompt_tokens"] == sum(len(p) for p in PROMPTS)
    assert all(phase == "prefill" for phase, shape, *_ in session.calls if shape[1] == PROMPT_LEN)
    assert all(phase == "decode" for phase, shape, *_ in session.calls if shape[1] == 1)


def uneven_eos() -> int:
    """A pseudo-EOS taken from one prompt's run: rows stop, and slots free up, at different steps."""
    return oracle(PROMPTS[1], 8, None)[0][2]


def test_regular_batching_schedule():
    """Batches of batch_size prompts, each prefilled together after a reset, chunk by chunk."""
    session = FakeSession(2)
    result = generate_ids(session, PROMPTS, prompt_len=PROMPT_LEN, generation_len=3)
    assert session.resets == 1 + 3  # the constructor's, then one per batch
    prefills = [shape for phase, shape, *_ in session.calls if phase == "prefill"]
    assert prefills == [(2, 4)] * 3 + [(2, 4)] * 2 + [(2, 4)] * 3  # 11 | 5 | 9 tokens: 3, 2, 3 chunks
    assert sum(1 for phase, *_ in session.calls if phase == "decode") == 3 * 2
    assert "full_batch_size" not in result.perf

    session = FakeSession(2)
    generate_ids(session, PROMPTS, prompt_len=PROMPT_LEN, generation_len=8, eos_token_id=uneven_eos())
    last_prefill = max(n for n, (phase, *_) in enumerate(session.calls) if phase == "prefill")
    # a finished row idles (position -1) until its whole batch is done
    assert any((pos == -1).any() for phase, _, _, pos in session.calls[:last_prefill] if phase == "decode")


def test_continuous_batching_schedule():
    """Each prompt prefilled alone into the slot that freed up, at once; one reset."""
    session = FakeSession(2, continuous_batching=True)
    result = generate_ids(session, PROMPTS, prompt_len=PROMPT_LEN, generation_len=3)
    assert session.resets == 1 + 1
    prefills = [(shape, rows) for phase, shape, rows, _ in session.calls if phase == "prefill"]
    # chunks: 1 (p0 in slot 0), 3 (p1 in slot 1), then both free: 1 (p2 in 0), 2 (p3 in 1), then 3 (p4 in 0)
    assert [rows for _, rows in prefills] == [[0], [1], [1], [1], [0], [1], [1], [0], [0], [0]]
    assert all(shape == (1, PROMPT_LEN) for shape, _ in prefills)
    assert all(rows == [0, 1] for phase, _, rows, _ in session.calls if phase == "decode")
    assert result.perf["full_batch_size"] == 2
    assert result.generated_ids == [oracle(p, 3, None)[0] for p in PROMPTS]

    session = FakeSession(2, continuous_batching=True)
    generate_ids(session, PROMPTS, prompt_len=PROMPT_LEN, generation_len=8, eos_token_id=uneven_eos())
    last_prefill = max(n for n, (phase, *_) in enumerate(session.calls) if phase == "prefill")
    decodes = [(n, pos) for n, (phase, _, _, pos) in enumerate(session.calls) if phase == "decode"]
    assert all((pos >= 0).all() for n, pos in decodes if n < last_prefill)  # no slot idles while prompts wait
    assert any((pos == -1).any() for n, pos in decodes if n > last_prefill)


@pytest.mark.parametrize("mode", MODES)
def test_stop_reasons(mode):
    ctx = 12
    prompts = [list(range(1, 10)), [4, 5], [8]]
    expected = [oracle(p, ctx, None, ctx) for p in prompts]  # generation_len defaults to ctx_len
    assert [r for _, r in expected] == ["ctx_len", "ctx_len", "generation_len"]
    assert [len(t) for t, _ in expected] == [ctx - 9 + 1, ctx - 2 + 1, ctx]  # up to position 11, one more
    session = make(mode, ctx)
    finished = []
    result = generate_ids(session, prompts, prompt_len=PROMPT_LEN,
                          on_finish=lambda i, reason: finished.append((i, reason)))
    assert result.generated_ids == [t for t, _ in expected]
    assert result.stop_reasons == [r for _, r in expected]
    assert sorted(finished) == [(0, "ctx_len"), (1, "ctx_len"), (2, "generation_len")]

    eos = expected[1][0][1]
    want = [oracle(p, 5, eos, ctx) for p in prompts]
    result = generate_ids(session, prompts, prompt_len=PROMPT_LEN, generation_len=5,
                          eos_token_id=[eos, VOCAB + 1])
    assert result.generated_ids == [t for t, _ in want]
    assert result.stop_reasons == [r for _, r in want]
    assert result.stop_reasons[1] == "eos"


@pytest.mark.parametrize("mode", MODES)
def test_stop_at_first_token(mode):
    """generation_len=1: every prompt stops at its prefill token; slots refill straight away."""
    finished = []
    result = generate_ids(make(mode), PROMPTS, prompt_len=PROMPT_LEN, generation_len=1, return_logits=True,
                          on_finish=lambda i, reason: finished.append((i, reason)))
    assert result.generated_ids == [oracle(p, 1, None)[0] for p in PROMPTS]
    assert result.stop_reasons == ["generation_len"] * len(PROMPTS)
    assert [len(v) for v in result.logits] == [1] * len(PROMPTS)
    assert sorted(finished) == [(i, "generation_len") for i in range(len(PROMPTS))]


@pytest.mark.parametrize("mode", MODES)
def test_no_prompts(mode):
    result = generate_ids(make(mode), [], prompt_len=PROMPT_LEN)
    assert result.generated_ids == [] and result.stop_reasons == []


@pytest.mark.parametrize("mode", MODES)
def test_bad_prompts(mode):
    with pytest.raises(QeffGraphError, match="prompt 1 is empty"):
        generate_ids(make(mode), [[1], []], prompt_len=PROMPT_LEN)
    with pytest.raises(QeffGraphError, match="prompt 0 has 40 tokens but ctx_len is 40"):
        generate_ids(make(mode), [[1] * CTX_LEN], prompt_len=PROMPT_LEN)
    with pytest.raises(QeffGraphError, match="prompt_len must be >= 1"):
        generate_ids(make(mode), [[1]], prompt_len=0)
