"""Turning sampled tokens into streamed text, and drafting tokens by prompt lookup.

Engine-independent pieces of a decode loop, kept apart so they are tested without a model:
`TextStream` decodes UTF-8 across token boundaries and holds back text that may be the start of
a stop string (as llama-cpp-python's `create_completion` does); `NgramIndex` proposes the tokens
that followed the latest n-gram the last time it occurred (prompt-lookup drafting, llama.cpp's
`ngram` speculative mode): JSON keys, code and tool-call payloads repeat what the prompt holds.
"""

from __future__ import annotations

import codecs


class TextStream:
    """Incremental text of one generation, cut at the first stop string."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""  # decoded, not yet emitted: it may begin a stop string
        self.stopped = False

    def feed(self, piece: bytes) -> str:
        """Add one token's bytes; returns the text that is safe to emit now."""
        if self.stopped:
            return ""
        self._held += self._decoder.decode(piece)
        cut = min((i for s in self._stops if (i := self._held.find(s)) >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            text, self._held = self._held[:cut], ""
            return text
        keep = self._partial_stop()
        text = self._held[: len(self._held) - keep]
        self._held = self._held[len(self._held) - keep :]
        return text

    def _partial_stop(self) -> int:
        """Length of the longest tail of the held text that a stop string begins with."""
        held = self._held
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(held)), longest, -1):
                if held.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def flush(self) -> str:
        """The generation ended without a stop string: release what was held back."""
        if self.stopped:
            return ""
        text = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return text


class NgramIndex:
    """Where each n-gram (n_min..n_max tokens) of a token history last ended, for drafting.

    An n-gram is indexed one token late, so looking up the history's own tail finds the
    previous occurrence, never the tail itself."""

    def __init__(self, n_min: int = 2, n_max: int = 4) -> None:
        self.n_min = n_min
        self.n_max = n_max
        self.history: list[int] = []
        self._last_end: dict[tuple[int, ...], int] = {}

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            self._index_tail()
            self.history.append(token)

    def _index_tail(self) -> None:
        history, end = self.history, len(self.history) - 1
        for n in range(self.n_min, self.n_max + 1):
            if end + 1 >= n:
                self._last_end[tuple(history[end + 1 - n :])] = end

    def draft(self, limit: int) -> list[int]:
        """Up to `limit` tokens that followed the longest matching tail last time."""
        history = self.history
        for n in range(self.n_max, self.n_min - 1, -1):
            if len(history) < n:
                continue
            end = self._last_end.get(tuple(history[-n:]))
            if end is not None:
                return history[end + 1 : end + 1 + limit]
        return []
