"""A choice's text as its tokens arrive: incremental detokenization and stop strings.

Each token costs a decode of a few tokens, not of the whole output. Text that may be the beginning of
a stop string is held back until the next tokens show that it is not (as vLLM does), so a stop string
spanning several tokens never reaches the client.
"""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT = "\ufffd"  # what a decoder yields for bytes of an unfinished UTF-8 character


class IncrementalDetokenizer:
    """The text each new token adds. Tokens are decoded in a window that starts a few tokens back
    (decoders that merge or strip across tokens need the context), and text that ends in an unfinished
    character waits for the token that completes it."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.tokens: list[int] = []
        self.prefix_offset = 0  # the window starts here
        self.read_offset = 0  # text of tokens[prefix_offset:read_offset] has been returned

    def add(self, token: int) -> str:
        self.tokens.append(token)
        prefix_text = self.decode(self.tokens[self.prefix_offset : self.read_offset])
        new_text = self.decode(self.tokens[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """Whatever is still held (an unfinished character at the very end)."""
        prefix_text = self.decode(self.tokens[self.prefix_offset : self.read_offset])
        new_text = self.decode(self.tokens[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.tokens)
        return new_text[len(prefix_text) :]


class StopMatcher:
    """Finds the first stop string in a growing text; holds back the longest tail that could still
    become one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """The text that can be emitted now, and whether a stop string ended it (the text then stops
        right before the stop string)."""
        if not self.stops:
            return text, False
        buffer = self.pending + text
        cut = min((i for i in (buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.pending = ""
            return buffer[:cut], True
        hold = max(_held(buffer, s) for s in self.stops)
        self.pending = buffer[len(buffer) - hold :]
        return buffer[: len(buffer) - hold], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


def _held(text: str, stop: str) -> int:
    """The length of the longest tail of `text` that is a proper beginning of `stop`."""
    end = min(len(stop) - 1, len(text))
    while end > 0:
        i = stop.rfind(text[-1], 0, end)  # a beginning of `stop` that ends like `text`
        if i < 0:
            return 0
        if text.endswith(stop[: i + 1]):
            return i + 1
        end = i
    return 0


class ChoiceText:
    """One choice's text: detokenized incrementally, cut at the first stop string. Without a decode
    function (a model without tokenizer) there is no text and there are no stop strings."""

    def __init__(self, decode: Callable[[list[int]], str] | None, stops: list[str]):
        self.detokenizer = None if decode is None else IncrementalDetokenizer(decode)
        self.stops = StopMatcher(stops if decode is not None else [])

    def add(self, token: int) -> tuple[str, bool]:
        """The text this token lets through, and whether a stop string was reached."""
        if self.detokenizer is None:
            return "", False
        return self.stops.feed(self.detokenizer.add(token))

    def finish(self) -> str:
        """The text held back, when the choice ends for another reason than a stop string."""
        if self.detokenizer is None:
            return ""
        text, stopped = self.stops.feed(self.detokenizer.flush())
        return text if stopped else text + self.stops.flush()
