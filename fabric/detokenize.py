"""Incremental detokenization and stop strings, per request, on the instance that generates it.

Each new token costs one decode of a short window (the last few tokens), never of the whole
output: the window starts a few tokens back so that a tokenizer that merges across tokens (byte
pieces of one character, a leading space) decodes the same text it would in context, and text
that ends in an incomplete character (U+FFFD) waits for the next token.

Stop strings are searched only in the text that could contain a new match (the new characters
and the `longest stop - 1` before them). The match and everything after it is cut from the
text. While streaming, the last `longest stop - 1` characters are held back until they can no
longer be the start of a stop string, so a stream never shows text that is later cut.
"""

from __future__ import annotations

PREFIX_TOKENS = 5      # tokens of context decoded before the new ones


class Detokenizer:
    """Text of one request's output, built token by token.

    `step(tokens)` takes the request's tokens (prompt + output: a list, or anything with `len`
    and slices, such as `Sequence.token_view`) after a token was appended and returns True
    when a stop string matched (the text is then cut before it).
    `take_delta()` returns the text not yet handed out that is safe to show."""

    __slots__ = ("tokenizer", "stop", "hold", "prefix_offset", "read_offset", "text", "emitted",
                 "stopped")

    def __init__(self, tokenizer, num_prompt_tokens: int, stop: tuple = ()):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.prefix_offset = max(0, num_prompt_tokens - PREFIX_TOKENS)
        self.read_offset = num_prompt_tokens
        self.text, self.emitted, self.stopped = "", 0, False

    def step(self, tokens: list[int]) -> bool:
        if self.stopped:
            return True
        prefix = self._decode(tokens[self.prefix_offset:self.read_offset])
        full = self._decode(tokens[self.prefix_offset:])
        if full.endswith("\ufffd") or len(full) < len(prefix):
            return False                     # an incomplete character: wait for more tokens
        new = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(tokens)
        start = max(0, len(self.text) - self.hold)
        self.text += new
        cut = min((i for i in (self.text.find(s, start) for s in self.stop) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
        return self.stopped

    def take_delta(self, final: bool = False) -> str:
        """New text to show: all of it once the request ended (`final`), else all but what a
        stop string could still claim."""
        end = len(self.text) if final or self.stopped else max(self.emitted,
                                                                 len(self.text) - self.hold)
        delta, self.emitted = self.text[self.emitted:end], end
        return delta

    def state(self) -> dict:
        """What a hand-off carries to the request's next home."""
        return {"prefix_offset": self.prefix_offset, "read_offset": self.read_offset,
                "text": self.text, "emitted": self.emitted}

    def restore(self, state: dict) -> None:
        self.prefix_offset, self.read_offset = state["prefix_offset"], state["read_offset"]
        self.text, self.emitted = state["text"], state["emitted"]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

