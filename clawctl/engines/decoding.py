"""Turning sampled tokens into streamed text, and drafting tokens by prompt lookup.

Engine-independent pieces of a decode loop, kept apart so they are tested without a model:
`TextStream` decodes UTF-8 across token boundaries and holds back text that may be the start of
a stop string (as llama-cpp-python's `create_completion` does); `NgramIndex` proposes the tokens
that have reliably followed the history's latest n-grams (prompt-lookup drafting, as llama.cpp's
`ngram` speculative modes): JSON keys, code and tool-call payloads repeat what the prompt holds.
"""

from __future__ import annotations

import codecs
import itertools
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


# What a verify step of n tokens costs against a step of one, until this box has measured it:
# the curve measured on a 2-core x86 CPU with SmolLM2-135M (bench/RESULTS.md, speculative
# decoding). A small CPU is compute-bound, so there a draft pays only when most of a long one
# holds; where steps are memory-bound (GPUs, larger models) the measured curve is flatter and
# the pacer drafts more.
PRIOR_STEP_COST = ((1, 1.0), (2, 1.88), (5, 3.05), (9, 4.10), (13, 5.69))


class StepCosts:
    """Seconds per decode step, by the tokens in it and the depth of the context it attends to,
    as this box measures them (a moving average per cell), for the draft pacer's arithmetic.

    Depth is bucketed because a step at 12k tokens of context costs several times one at 100
    (attention reads every cell), and the ratio of an n-token step to a one-token step is only
    meaningful between steps at about the same depth."""

    DEPTH_BUCKET = 2048
    SMOOTHING = 0.2

    def __init__(self) -> None:
        self._seconds: dict[tuple[int, int], float] = {}
        self._draft_step: float | None = None  # a draft model's step, seconds

    def observe(self, depth: int, tokens: int, seconds: float) -> None:
        self._seconds[(depth // self.DEPTH_BUCKET, tokens)] = self._smooth(
            self._seconds.get((depth // self.DEPTH_BUCKET, tokens)), seconds
        )

    def observe_draft(self, seconds_per_step: float) -> None:
        """A draft model's run: its time per drafted position (its steps are batched across
        the requests it drafts for)."""
        self._draft_step = self._smooth(self._draft_step, seconds_per_step)

    def _smooth(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.SMOOTHING * (new - old)

    def draft_ratio(self, depth: int) -> float:
        """A draft model's token in steps of one target token (0 until both are measured):
        what drafting d tokens with it adds to their verify step's cost."""
        if self._draft_step is None:
            return 0.0
        bucket = depth // self.DEPTH_BUCKET
        one = self._seconds.get((bucket, 1))
        if one is None:  # a generation that always drafts: judge by its verify steps
            one = next(
                (t / _prior_cost(n) for (b, n), t in self._seconds.items() if b == bucket), None
            )
        return self._draft_step / one if one else 0.0

    def ratio(self, depth: int, tokens: int) -> float:
        """Cost of a step of `tokens` tokens in steps of one (at least 1)."""
        if tokens <= 1:
            return 1.0
        bucket = depth // self.DEPTH_BUCKET
        one, many = self._seconds.get((bucket, 1)), self._seconds.get((bucket, tokens))
        if one and many:
            return max(1.0, many / one)
        return _prior_cost(tokens)


def _prior_cost(tokens: int) -> float:
    points = PRIOR_STEP_COST
    for (n0, c0), (n1, c1) in itertools.pairwise(points):
        if tokens <= n1:
            return c0 + (c1 - c0) * (tokens - n0) / (n1 - n0)
    (n0, c0), (n1, c1) = points[-2], points[-1]
    return c1 + (c1 - c0) * (tokens - n1) / (n1 - n0)


class DraftPacer:
    """How many draft tokens one greedy generation verifies in its next step.

    A verify step of 1+d tokens yields the accepted drafts plus one token and costs
    `StepCosts.ratio(1+d)` plain steps, so the pacer picks the d that maximizes expected tokens
    per cost, and drafts nothing when no d beats a plain step (expected tokens per cost <= 1).
    Each draft token is taken to hold with probability p, estimated from this generation's
    recent drafts (decayed counts, so a run of copied JSON and the free text after it are told
    apart); a d-token draft is then expected to yield sum(p^k, k=0..d) tokens.

    Once p says no, a short probe (PROBE tokens) now and then finds out whether the generation
    has turned to copying its context; the wait between probes doubles with every probe that
    misses (free text: a lost step every few hundred tokens) and ends at the first that holds."""

    PRIOR_HELD = 4.0  # a prior of 4 held draft tokens to 1 miss: p = 0.8
    PRIOR_MISSED = 1.0
    MEMORY = 0.8  # weight of the counts so far at each new outcome
    PROBE = 2
    FIRST_WAIT = 8  # declined steps before the first probe after a miss
    LONGEST_WAIT = 256

    def __init__(self, costs: StepCosts) -> None:
        self._costs = costs
        self._held = self.PRIOR_HELD
        self._missed = self.PRIOR_MISSED
        self._wait = 0  # declined steps left before the next probe
        self._misses = 0  # probes (or drafts) missed in a row

    @property
    def acceptance(self) -> float:
        return self._held / (self._held + self._missed)

    def length(self, depth: int, available: int, by_model: bool = False) -> int:
        """The draft length worth verifying now, at most `available` (0: none this step);
        `by_model`: the drafts would come from a draft model, whose own steps cost too."""
        extra = self._costs.draft_ratio(depth) if by_model else 0.0
        paying = self._best(self.acceptance, depth, available, extra)
        if paying > 0:
            return paying
        if self._wait > 0:
            self._wait -= 1
            return 0
        prior = self.PRIOR_HELD / (self.PRIOR_HELD + self.PRIOR_MISSED)
        return min(self.PROBE, self._best(prior, depth, available, extra))

    def _best(self, p: float, depth: int, available: int, per_draft: float) -> int:
        best, best_gain = 0, 1.0
        expected, term = 1.0, 1.0
        for d in range(1, available + 1):
            term *= p
            expected += term
            gain = expected / (self._costs.ratio(depth, 1 + d) + d * per_draft)
            if gain > best_gain:
                best, best_gain = d, gain
        return best

    def record(self, drafted: int, accepted: int) -> None:
        """A verify step's outcome: `accepted` of `drafted` tokens held (a miss unless all)."""
        missed = accepted < drafted
        self._held = self.MEMORY * self._held + accepted
        self._missed = self.MEMORY * self._missed + (1.0 if missed else 0.0)
        if not missed or accepted > 0:
            self._misses, self._wait = 0, 0
        else:
            self._misses += 1
            self._wait = min(self.LONGEST_WAIT, self.FIRST_WAIT << min(self._misses - 1, 8))
