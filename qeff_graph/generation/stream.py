"""Stream the answers of several prompts one after the other, each under its own header.

Batched generation produces the tokens of all prompts interleaved. :class:`PromptStreamer`
writes prompt 0's header and then its text live; tokens of later prompts are kept until the
prompts before them have finished, then that prompt's header and text so far are written and it
goes on live. Text is detokenized incrementally: each write is the new tail of
``decode(all ids so far)`` (decoding token by token would lose the spaces that BPE and
sentencepiece tokens carry), held back while it ends with an incomplete UTF-8 character
(``"\\ufffd"``). This assumes, as for byte-level BPE and sentencepiece decoders, that the text of
a prefix of the ids is a prefix of the text of all of them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

__all__ = ["PromptStreamer"]

_INCOMPLETE = "\ufffd"  # what decoders give for a UTF-8 sequence cut short


def _stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


class PromptStreamer:
    """Write the streamed answers of ``prompts`` in prompt order, each under a header.

    Pass :meth:`on_tokens` and :meth:`on_finish` to
    :func:`~qeff_graph.generation.generate_ids`, then call :meth:`close`. For every prompt the
    output is ``=== prompt: {prompt!r}\\n``, then exactly ``decode(its generated ids)``, then
    ``\\n``.

    Args:
        prompts: the prompt texts (only shown in the headers).
        decode: token ids -> text (e.g. ``tokenizer.decode`` with ``skip_special_tokens``).
        write: where the text goes (default: stdout, flushed after each write).
    """

    def __init__(self, prompts: Sequence[str], decode: Callable[[list[int]], str],
                 write: Callable[[str], None] = _stdout):
        self.prompts = list(prompts)
        self.decode = decode
        self.write = write
        self.ids: list[list[int]] = [[] for _ in self.prompts]
        self.shown = [""] * len(self.prompts)  # text written so far, per prompt
        self.finished = [False] * len(self.prompts)
        self.live = -1  # the prompt being written; len(prompts) once all are written

    def on_tokens(self, i: int, tokens: list[int]) -> None:
        """New tokens of prompt ``i``: written now if it is the live prompt, else kept."""
        self.ids[i].extend(tokens)
        if self.live < 0:
            self._advance()
        elif i == self.live:
            self._show(i, final=False)

    def on_finish(self, i: int, reason: str = "") -> None:
        """Prompt ``i`` stopped (``reason`` as in ``stop_reasons``); if it was live, move on."""
        self.finished[i] = True
        if self.live < 0:
            self._advance()
        elif i == self.live:
            self._show(i, final=True)
            self.write("\n")
            self._advance()

    def close(self) -> None:
        """Write every prompt not written yet (unfinished ones with what they have)."""
        self.finished = [True] * len(self.prompts)
        if self.live < 0:
            self._advance()
        elif self.live < len(self.prompts):
            self.on_finish(self.live)

    def _advance(self) -> None:
        """Make the next prompt live (header and kept text); past it if it has finished too."""
        while True:
            self.live += 1
            if self.live >= len(self.prompts):
                return
            self.write(f"=== prompt: {self.prompts[self.live]!r}\n")
            self._show(self.live, final=self.finished[self.live])
            if not self.finished[self.live]:
                return
            self.write("\n")

    def _show(self, i: int, final: bool) -> None:
        """Write the new tail of prompt ``i``'s text (all of it when ``final``)."""
        text = self.decode(self.ids[i]) if self.ids[i] else ""
        if not final and text.endswith(_INCOMPLETE):
            return
        new = text[len(self.shown[i]):]
        if new:
            self.write(new)
        self.shown[i] = text
