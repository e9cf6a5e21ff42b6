"""The entropy meter: how unsure a model is, token by token, and when to give up on it.

For every sampled token the engine hands `EntropyMeter.observe` the raw next-token logits
(float32, a numpy view of llama.cpp's buffer: no `logits_all`, no Python objects per vocabulary
entry). From them the meter computes, with preallocated buffers and a handful of vectorised
passes, the Shannon entropy of the full distribution, the top-1 probability and the top-1/top-2
margin. Each observation costs ~1% of a 135M model's decode step (see bench/cascade.py).

Signals (all in nats / probabilities), each also summarised for calibration so that a threshold
learned offline fires online exactly when the summary crosses it:

- `window_entropy`: the highest rolling mean of entropy over `window` tokens (or over all tokens
  if the answer is shorter) - a sustained loss of confidence;
- `max_entropy`: the highest single-token entropy after `min_tokens` - a spike;
- `min_prob`: the lowest top-1 probability after `min_tokens`;
- `first_margin`: the top-1/top-2 margin of the first token with a letter or digit in it - for
  short answers ("Yes", "480") the answer is decided at that token.

Decisions are made only within the first `decide_within` tokens: after that the tier is committed
(its text may already be streaming) and the meter only measures.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy is imported where the meter runs: policies and the CLI need none
    import numpy as np
    import numpy.typing as npt

SIGNALS = ("window_entropy", "max_entropy", "min_prob", "first_margin")
# Signals where a *low* value means unsure; for the others a high value does.
LOW_IS_UNSURE = frozenset({"min_prob", "first_margin"})


@dataclass(frozen=True)
class Thresholds:
    """When a tier gives up (any threshold crossed within `decide_within` tokens)."""

    window_entropy: float | None = None
    max_entropy: float | None = None
    min_prob: float | None = None
    first_margin: float | None = None
    window: int = 8
    min_tokens: int = 1
    decide_within: int = 48
    stop: bool = True  # False: note a trigger but let the generation finish (no next tier)

    @property
    def armed(self) -> bool:
        return any(getattr(self, name) is not None for name in SIGNALS)


@dataclass(frozen=True)
class Signals:
    """What the meter saw over one generation (or up to the point it stopped it)."""

    tokens: int
    mean_entropy: float
    max_entropy: float
    window_entropy: float
    min_prob: float
    first_margin: float | None

    def value(self, signal: str) -> float | None:
        value: float | None = getattr(self, signal)
        return value


@dataclass(frozen=True)
class Trigger:
    signal: str
    value: float
    threshold: float
    token: int

    def describe(self) -> str:
        relation = "<" if self.signal in LOW_IS_UNSURE else ">"
        return f"{self.signal} {self.value:.3f} {relation} {self.threshold:g} at token {self.token}"


class EntropyMeter:
    """Per-token uncertainty for one generation; `observe` returns a `Trigger` to stop it."""

    def __init__(
        self, n_vocab: int, thresholds: Thresholds, is_content: Callable[[int], bool]
    ) -> None:
        import numpy as np

        self._np = np
        self.thresholds = thresholds
        self._is_content = is_content
        self._shifted = np.empty(n_vocab, dtype=np.float32)
        self._exp = np.empty(n_vocab, dtype=np.float32)
        self._recent: deque[float] = deque(maxlen=max(1, thresholds.window))
        self.tokens = 0
        self._sum = 0.0
        self._max = 0.0
        self._window_max = 0.0
        self._min_prob = 1.0
        self._first_margin: float | None = None
        self.trigger: Trigger | None = None

    def observe(self, logits: npt.NDArray[np.float32]) -> Trigger | None:
        """Measure the distribution the latest token was sampled from."""
        np, shifted, exp = self._np, self._shifted, self._exp
        top = int(np.argmax(logits))
        np.subtract(logits, logits[top], out=shifted)
        np.exp(shifted, out=exp)
        total = float(exp.sum())
        entropy = max(0.0, math.log(total) - float(np.dot(exp, shifted)) / total)
        p1 = 1.0 / total  # exp(0) at the maximum
        exp[top] = 0.0
        margin = p1 - float(exp.max()) / total
        return self._account(entropy, p1, margin, top)

    def _account(self, entropy: float, p1: float, margin: float, top: int) -> Trigger | None:
        self.tokens += 1
        self._sum += entropy
        self._recent.append(entropy)
        t = self.thresholds
        n = self.tokens
        if n > t.decide_within:  # committed: only the mean keeps counting
            return None
        # The summaries cover exactly what a threshold is compared with, so calibration offline
        # and triggering online agree.
        if n >= t.min_tokens:
            self._max = max(self._max, entropy)
            self._min_prob = min(self._min_prob, p1)
        rolling = sum(self._recent) / len(self._recent)
        if n >= t.window:
            self._window_max = max(self._window_max, rolling)
        if self.trigger is not None:
            return None
        if self._first_margin is None and self._is_content(top):
            self._first_margin = margin
            if t.first_margin is not None and margin < t.first_margin:
                return self._fire("first_margin", margin, t.first_margin)
        if n >= t.min_tokens:
            if t.max_entropy is not None and entropy > t.max_entropy:
                return self._fire("max_entropy", entropy, t.max_entropy)
            if t.min_prob is not None and p1 < t.min_prob:
                return self._fire("min_prob", p1, t.min_prob)
        if t.window_entropy is not None and n >= t.window and rolling > t.window_entropy:
            return self._fire("window_entropy", rolling, t.window_entropy)
        return None

    def finish(self) -> Trigger | None:
        """At the end of an answer shorter than the window, judge its mean entropy."""
        t = self.thresholds
        if self.trigger is None and t.window_entropy is not None and 0 < self.tokens < t.window:
            mean = self._sum / self.tokens
            if mean > t.window_entropy:
                return self._fire("window_entropy", mean, t.window_entropy)
        return None

    def _fire(self, signal: str, value: float, threshold: float) -> Trigger:
        self.trigger = Trigger(signal, value, threshold, self.tokens)
        return self.trigger

    def signals(self) -> Signals:
        n = self.tokens
        mean = self._sum / n if n else 0.0
        return Signals(
            tokens=n,
            mean_entropy=mean,
            max_entropy=self._max,
            window_entropy=self._window_max if n >= self.thresholds.window else mean,
            min_prob=self._min_prob,
            first_margin=self._first_margin,
        )
