"""The entropy meter: how unsure a model is, token by token, and when to give up on it.

For every sampled token the engine hands `EntropyMeter.observe` the raw next-token logits
(float32, a numpy view of llama.cpp's buffer: no `logits_all`, no Python objects per vocabulary
entry) and a way to read the token's text. From the logits the meter computes, with preallocated
buffers and a handful of vectorised passes, the Shannon entropy of the full distribution, the
top-1 probability and the top-1/top-2 margin (~1% of a 135M model's decode step; see
bench/cascade.py).

Signals (nats / probabilities), each also summarised for calibration so that a threshold learned
offline fires online exactly when the summary crosses it:

- `window_entropy`: the highest rolling mean of entropy over `window` tokens (or the mean of the
  whole answer if it is shorter) - a sustained loss of confidence;
- `max_entropy`: the highest single-token entropy after `min_tokens` - a spike;
- `min_prob`: the lowest top-1 probability after `min_tokens`;
- `first_margin`: the margin of the first token with a letter or digit in it;
- `answer_entropy` / `answer_margin`: mean entropy and lowest margin over the *answer span* -
  the first yes/no word and every token with a digit, or else the first content token. Small
  models wrap short answers in sentences; the span is where they commit to an answer;
- `score`: a logistic model over all the summaries (weights from `clawctl route calibrate`),
  the probability that the answer is wrong;
- `probe`: a logistic model over the *first* token's log-probabilities at a few hundred token ids
  (`LogitProbe`, also fitted by calibration): the probability that the answer is wrong, judged
  at token 1, before any text streams. Why: a small model's summaries say how peaked its
  distribution is, not what it is leaning towards. SmolLM2 answers "No." to 90% of
  which_is_heavier with the same confidence whatever the numbers, yet the rest of its first-token
  distribution still moves with them: a linear read of it predicts its errors (bench/cascade.py).
  The logits are a linear image of the last hidden state, so this is a hidden-state probe without
  asking llama.cpp for embeddings (which would make every prompt token an output). It learns the
  tier's model *and* the calibration data's task: recalibrate when either changes.

Signals over the whole answer (`answer_*`, `score`, and `window_entropy` for short answers) are
judged when the answer ends or when `decide_within` tokens have passed, whichever is first. After
`decide_within` tokens the tier is committed (its text may be streaming) and nothing triggers.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from clawctl.errors import BadInput
from clawctl.schemas.signals import LOW_IS_UNSURE, SIGNALS, Signals

if TYPE_CHECKING:  # numpy is imported where the meter runs: policies and the CLI need none
    import numpy as np
    import numpy.typing as npt

_YES_NO = re.compile(r"^\W*(yes|no|y|n)\W*$", re.IGNORECASE)


@dataclass(frozen=True)
class ScoreModel:
    """Logistic regression over standardised summaries: P(wrong answer)."""

    weights: Mapping[str, float]
    bias: float
    center: Mapping[str, float] = field(default_factory=dict)
    scale: Mapping[str, float] = field(default_factory=dict)

    def probability(self, features: Mapping[str, float | None]) -> float:
        """P(wrong) from summaries by feature name (`Signals.features()`)."""
        z = self.bias
        for name, weight in self.weights.items():
            value = features.get(name)
            center = self.center.get(name, 0.0)
            x = center if value is None else value  # missing: the average case
            z += weight * (x - center) / (self.scale.get(name, 1.0) or 1.0)
        return _sigmoid(z)


@dataclass(frozen=True)
class LogitProbe:
    """Logistic regression over the first token's log-probabilities at `tokens`: P(wrong).

    Calibration sees only each example's `top_k` most likely tokens, so a token below the
    `top_k`-th is read as the `top_k`-th log-probability, online as offline."""

    tokens: tuple[int, ...]
    weights: tuple[float, ...]
    bias: float
    top_k: int

    def probability(self, logprobs: Sequence[float], floor: float) -> float:
        """P(wrong) from the log-probabilities at `tokens` and the `top_k`-th one (`floor`)."""
        z = self.bias + sum(
            w * max(lp, floor) for w, lp in zip(self.weights, logprobs, strict=True)
        )
        return _sigmoid(z)


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))


@dataclass(frozen=True)
class Thresholds:
    """When a tier gives up (any threshold crossed within `decide_within` tokens)."""

    window_entropy: float | None = None
    max_entropy: float | None = None
    min_prob: float | None = None
    first_margin: float | None = None
    answer_entropy: float | None = None
    answer_margin: float | None = None
    score: float | None = None  # probability of a wrong answer, with `score_model`
    score_model: ScoreModel | None = None
    probe: float | None = None  # probability of a wrong answer, with `probe_model`
    probe_model: LogitProbe | None = None
    first_top: int = 0  # report the first token's top log-probabilities (for calibration)
    window: int = 8
    min_tokens: int = 1
    decide_within: int = 48
    stop: bool = True  # False: note a trigger but let the generation finish (no next tier)

    @property
    def armed(self) -> bool:
        return any(getattr(self, name) is not None for name in SIGNALS)


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

    def __init__(self, n_vocab: int, thresholds: Thresholds, text: Callable[[int], str]) -> None:
        import numpy as np

        self._np = np
        self.thresholds = thresholds
        self._text = text
        self._shifted = np.empty(n_vocab, dtype=np.float32)
        self._exp = np.empty(n_vocab, dtype=np.float32)
        self._recent: deque[float] = deque(maxlen=max(1, thresholds.window))
        self.tokens = 0
        self._sum = 0.0
        self._max = 0.0
        self._window_max = 0.0
        self._min_prob = 1.0
        self._first: tuple[float, float] | None = None  # (entropy, margin) of the first content
        self._first_at = 0
        self._yes_no: list[tuple[float, float]] = []  # the first yes/no word
        self._digits: list[tuple[float, float]] = []  # tokens with digits
        self._judged = False
        self._probe: float | None = None
        self._first_top: tuple[tuple[int, float], ...] = ()
        probe = thresholds.probe_model
        if probe is not None and (max(probe.tokens, default=0) >= n_vocab or probe.top_k > n_vocab):
            raise BadInput(
                f"the escalation probe reads token {max(probe.tokens)} (top {probe.top_k}) but "
                f"the model has {n_vocab} tokens: recalibrate the tier for this model"
            )
        self._probe_tokens = np.array(probe.tokens if probe else (), dtype=np.intp)
        self.trigger: Trigger | None = None

    def observe(self, logits: npt.NDArray[np.float32]) -> Trigger | None:
        """Measure the distribution the latest token was sampled from. The answer span is
        read from its most likely token (the sampled one, for greedy decoding): the sampled
        token is not known yet when llama-cpp-python consults us."""
        np, shifted, exp = self._np, self._shifted, self._exp
        top = int(np.argmax(logits))
        np.subtract(logits, logits[top], out=shifted)
        np.exp(shifted, out=exp)
        total = float(exp.sum())
        entropy = max(0.0, math.log(total) - float(np.dot(exp, shifted)) / total)
        p1 = 1.0 / total  # exp(0) at the maximum
        exp[top] = 0.0
        margin = p1 - float(exp.max()) / total
        if self.tokens == 0:
            self._first_token(shifted, math.log(total))
        return self.account(entropy, p1, margin, top)

    def _first_token(self, shifted: npt.NDArray[np.float32], log_total: float) -> None:
        """The first token's extras (once per generation, ~0.3 ms): the probe's reading and
        the top log-probabilities calibration asked for. `shifted` is logits minus their max."""
        np, t = self._np, self.thresholds
        probe = t.probe_model
        if probe is not None:
            k = min(probe.top_k, len(shifted))
            floor = float(np.partition(shifted, -k)[-k]) - log_total
            logprobs = shifted[self._probe_tokens].astype(np.float64) - log_total
            self._probe = probe.probability(logprobs.tolist(), floor)
        if t.first_top > 0:
            k = min(t.first_top, len(shifted))
            best = np.argpartition(shifted, -k)[-k:]
            best = best[np.argsort(-shifted[best], kind="stable")]
            self._first_top = tuple((int(i), round(float(shifted[i]) - log_total, 5)) for i in best)

    def account(self, entropy: float, p1: float, margin: float, token: int) -> Trigger | None:
        """Fold one token's measurements in (separate from `observe` for tests)."""
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
        self._span(entropy, margin, token)
        if self.trigger is not None:
            return None
        if n == 1 and t.probe is not None and self._probe is not None and self._probe > t.probe:
            return self._fire("probe", self._probe, t.probe)
        first_now = self._first is not None and self._first_at == n
        if first_now and t.first_margin is not None and margin < t.first_margin:
            return self._fire("first_margin", margin, t.first_margin)
        if n >= t.min_tokens:
            if t.max_entropy is not None and entropy > t.max_entropy:
                return self._fire("max_entropy", entropy, t.max_entropy)
            if t.min_prob is not None and p1 < t.min_prob:
                return self._fire("min_prob", p1, t.min_prob)
        if t.window_entropy is not None and n >= t.window and rolling > t.window_entropy:
            return self._fire("window_entropy", rolling, t.window_entropy)
        if n == t.decide_within:
            return self._judge()
        return None

    def _span(self, entropy: float, margin: float, token: int) -> None:
        text = self._text(token)
        if self._first is None and any(c.isalnum() for c in text):
            self._first = (entropy, margin)
            self._first_at = self.tokens
        if not self._yes_no and _YES_NO.match(text):
            self._yes_no.append((entropy, margin))
        elif any(c.isdigit() for c in text):
            self._digits.append((entropy, margin))

    def finish(self) -> Trigger | None:
        """At the end of an answer shorter than `decide_within`, judge the whole-answer signals."""
        if self.trigger is None and 0 < self.tokens < self.thresholds.decide_within:
            return self._judge()
        return None

    def _judge(self) -> Trigger | None:
        if self._judged:
            return None
        self._judged = True
        t = self.thresholds
        s = self.signals()
        checks = (
            ("window_entropy", t.window_entropy if self.tokens < t.window else None),
            ("answer_entropy", t.answer_entropy),
            ("answer_margin", t.answer_margin),
            ("score", t.score),
        )
        for signal, threshold in checks:
            value = s.value(signal)
            if threshold is None or value is None:
                continue
            unsure = value < threshold if signal in LOW_IS_UNSURE else value > threshold
            if unsure:
                return self._fire(signal, value, threshold)
        return None

    def _fire(self, signal: str, value: float, threshold: float) -> Trigger:
        self.trigger = Trigger(signal, value, threshold, self.tokens)
        return self.trigger

    def signals(self) -> Signals:
        n = self.tokens
        mean = self._sum / n if n else 0.0
        span = self._yes_no or self._digits or ([self._first] if self._first else [])
        summary = Signals(
            tokens=n,
            mean_entropy=mean,
            max_entropy=self._max,
            window_entropy=self._window_max if n >= self.thresholds.window else mean,
            min_prob=self._min_prob,
            first_margin=self._first[1] if self._first else None,
            answer_entropy=sum(e for e, _ in span) / len(span) if span else None,
            answer_margin=min(m for _, m in span) if span else None,
            probe=self._probe,
            first_top=self._first_top or None,
        )
        model = self.thresholds.score_model
        if model is None:
            return summary
        return summary.model_copy(update={"score": model.probability(summary.features())})
