"""Turning sampled tokens into streamed text, and drafting tokens by prompt lookup.

Engine-independent pieces of a decode loop, kept apart so they are tested without a model:
`TextStream` decodes UTF-8 across token boundaries and holds back text that may be the start of
a stop string (as llama-cpp-python's `create_completion` does); `NgramIndex` proposes the tokens
that have reliably followed the history's latest n-grams (prompt-lookup drafting, as llama.cpp's
`ngram` speculative modes): JSON keys, code and tool-call payloads repeat what the prompt holds.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass


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


# An n-gram followed by different tokens at different times: nothing to draft after it.
CONTRADICTED = -1


class NgramIndex:
    """What followed each n-gram (n_min..n_max tokens) of a token history, for drafting.

    Each n-gram maps to the one token that has followed it every time, with how often, or to
    CONTRADICTED once two occurrences went on differently. A draft follows the history's
    longest known tail one token at a time and stops where the continuation varies: in a run
    of JSON records the keys and punctuation repeat but the values change, and a draft that
    runs into a value is rejected at a cost (a verify batch of d+1 tokens costs nearly d+1
    tokens on a small CPU). A continuation seen only once is trusted only after a tail of at
    least `trusted_n` tokens; shorter ones need a second, agreeing occurrence."""

    def __init__(self, n_min: int = 2, n_max: int = 6, trusted_n: int = 4) -> None:
        self.n_min = n_min
        self.n_max = n_max
        self.trusted_n = trusted_n
        self.history: list[int] = []
        self._next: dict[tuple[int, ...], tuple[int, int]] = {}  # n-gram -> (token, count)

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            self._record(token)
            self.history.append(token)

    def _record(self, token: int) -> None:
        history, following = self.history, self._next
        for n in range(self.n_min, min(self.n_max, len(history)) + 1):
            key = tuple(history[-n:])
            seen = following.get(key)
            if seen is None:
                following[key] = (token, 1)
            elif seen[0] == token:
                following[key] = (token, seen[1] + 1)
            elif seen[0] != CONTRADICTED:
                following[key] = (CONTRADICTED, 0)

    def _follower(self, tail: list[int]) -> int | None:
        """The token that follows `tail`'s longest known n-gram, if it can be trusted."""
        for n in range(min(self.n_max, len(tail)), self.n_min - 1, -1):
            seen = self._next.get(tuple(tail[-n:]))
            if seen is None:
                continue
            token, count = seen
            if token == CONTRADICTED or (count < 2 and n < self.trusted_n):
                return None
            return token
        return None

    def draft(self, limit: int) -> list[int]:
        """Up to `limit` tokens, each the trusted continuation of the history plus the drafts
        before it."""
        tail = self.history[-self.n_max :]
        drafts: list[int] = []
        while len(drafts) < limit:
            token = self._follower(tail)
            if token is None:
                break
            drafts.append(token)
            tail = [*tail[1:], token] if len(tail) == self.n_max else [*tail, token]
        return drafts


@dataclass(frozen=True)
class DraftRequest:
    """A sequence that wants up to `limit` draft tokens after `history` (the target model's
    tokens; the last one sampled but not yet decoded), from a draft model."""

    seq: int
    history: list[int]
    limit: int
