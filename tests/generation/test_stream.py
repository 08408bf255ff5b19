"""PromptStreamer: prompt-ordered output under headers, incremental detokenization."""

from __future__ import annotations

import pytest

from qeff_graph.generation import PromptStreamer

# A byte-level vocabulary: words carry their leading space, "é" (c3 a9) and "€" (e2 82 ac) are
# split over byte tokens, so a prefix can end in an incomplete UTF-8 sequence.
TOKENS = {1: b" Hello", 2: b" world", 3: b"!", 4: b" caf", 5: b"\xc3", 6: b"\xa9", 7: b" costs",
          8: b" 5", 9: b"\xe2", 10: b"\x82", 11: b"\xac", 12: b"\n", 13: b" ok"}
PROMPTS = ["Say hi", "Order 'coffee'", "Price?"]


def decode(ids: list[int]) -> str:
    """Like a sentencepiece decode: the text's own leading space is dropped."""
    return b"".join(TOKENS[i] for i in ids).decode("utf-8", errors="replace").removeprefix(" ")


def header(i: int) -> str:
    return f"=== prompt: {PROMPTS[i]!r}\n"


class Recorder:
    def __init__(self):
        self.writes: list[str] = []

    def __call__(self, text: str) -> None:
        self.writes.append(text)

    @property
    def text(self) -> str:
        return "".join(self.writes)


def test_decode_table():
    assert decode([1, 2]) == "Hello world"
    assert decode([1]) + decode([2]) == "Helloworld"  # why token-by-token decoding is wrong
    assert decode([4, 5]) == "caf\ufffd" and decode([4, 5, 6]) == "café"
    assert decode([8, 9, 10]) == "5\ufffd" and decode([8, 9, 10, 11]) == "5€"


def test_live_then_buffered_in_prompt_order():
    out = Recorder()
    s = PromptStreamer(PROMPTS, decode, out)
    s.on_tokens(0, [1])
    assert out.text == header(0) + "Hello"  # prompt 0 is live from its first token
    s.on_tokens(1, [4])
    s.on_tokens(2, [7])
    s.on_tokens(0, [2])
    assert out.text == header(0) + "Hello world"  # later prompts are kept back
    s.on_tokens(1, [5])
    s.on_tokens(2, [8])
    s.on_tokens(1, [6])
    s.on_finish(1, "eos")  # finishes before the live prompt: stays buffered
    s.on_tokens(2, [9])
    s.on_tokens(0, [3])
    assert out.text == header(0) + "Hello world!"
    s.on_finish(0, "generation_len")
    # prompt 1 (finished) is written whole, then prompt 2 goes live; "costs 5\ufffd" is held back
    assert out.text == header(0) + "Hello world!\n" + header(1) + "café\n" + header(2)
    s.on_tokens(2, [10])
    assert out.text.endswith(header(2))  # still incomplete
    s.on_tokens(2, [11])
    assert out.text.endswith("costs 5€")
    s.on_tokens(2, [12, 13])
    s.on_finish(2, "eos")
    expected = (header(0) + "Hello world!\n" + header(1) + "café\n" + header(2) + "costs 5€\n ok\n")
    assert out.text == expected
    s.close()
    assert out.text == expected
    assert not any("\ufffd" in w for w in out.writes)


def test_finish_in_reverse_order_and_incomplete_char_while_live():
    out = Recorder()
    s = PromptStreamer(PROMPTS, decode, out)
    s.on_tokens(2, [13])
    assert out.text == header(0)  # prompt 0 is live (and empty) from the first call
    s.on_finish(2, "eos")
    s.on_tokens(1, [1, 2])
    s.on_finish(1, "ctx_len")
    s.on_tokens(0, [4, 5])
    assert out.text == header(0)  # "caf\ufffd": held back until the character is complete
    s.on_tokens(0, [6, 3])
    assert out.text == header(0) + "café!"
    s.on_finish(0, "eos")
    assert out.text == (header(0) + "café!\n" + header(1) + "Hello world\n" + header(2) + "ok\n")
    s.close()
    assert out.text.count("===") == 3


def test_close_flushes_unfinished_and_silent_prompts():
    out = Recorder()
    s = PromptStreamer(PROMPTS, decode, out)
    s.on_tokens(1, [1])
    s.on_tokens(0, [8, 9])  # "5\ufffd": held back while live
    assert out.text == header(0)
    s.close()  # prompt 0 never finished, prompt 2 never got a token
    assert out.text == (header(0) + "5\ufffd\n" + header(1) + "Hello\n" + header(2) + "\n")
    s.close()
    assert out.text.count("===") == 3


def test_each_prompt_text_equals_decode_of_all_its_ids():
    """Whatever the interleaving, the text after each header is decode(all of its ids)."""
    ids = {0: [1, 2, 3, 12, 4, 5, 6], 1: [8, 9, 10, 11, 7, 4, 5, 6, 3], 2: [9, 10, 11, 13, 1, 9, 10]}
    out = Recorder()
    s = PromptStreamer(PROMPTS, decode, out)
    for step in range(max(len(v) for v in ids.values())):
        for i in (2, 0, 1):
            if step < len(ids[i]):
                s.on_tokens(i, [ids[i][step]])
            if step == len(ids[i]) - 1 and i != 2:
                s.on_finish(i, "eos")
    s.close()
    assert out.text == "".join(header(i) + decode(ids[i]) + "\n" for i in range(3))


def test_no_prompts_and_stdout(capsys):
    s = PromptStreamer([], decode)
    s.close()
    s = PromptStreamer(["a"], decode)
    s.on_tokens(0, [1, 2])
    s.on_finish(0, "eos")
    s.close()
    assert capsys.readouterr().out == "=== prompt: 'a'\nHello world\n"


@pytest.mark.parametrize("continuous", [False, True])
def test_with_generate_ids(continuous):
    """Driven by generate_ids' callbacks (rows finishing out of order): text == decoded results."""
    from qeff_graph.generation import generate_ids
    from tests.generation.test_generate import PROMPTS as IDS
    from tests.generation.test_generate import FakeSession, uneven_eos

    def fake_decode(ids):  # the fake model's ids onto the byte vocabulary
        return decode([i % len(TOKENS) + 1 for i in ids])

    names = [f"p{i}" for i in range(len(IDS))]
    out = Recorder()
    s = PromptStreamer(names, fake_decode, out)
    result = generate_ids(FakeSession(2, continuous_batching=continuous), IDS, prompt_len=4, generation_len=8,
                          eos_token_id=uneven_eos(), on_tokens=s.on_tokens, on_finish=s.on_finish)
    s.close()
    assert len({len(g) for g in result.generated_ids}) > 1
    assert out.text == "".join(f"=== prompt: {n!r}\n" + fake_decode(g) + "\n"
                               for n, g in zip(names, result.generated_ids))
