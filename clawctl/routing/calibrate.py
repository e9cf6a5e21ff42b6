"""Calibration: how well each meter signal predicts a wrong local answer, and thresholds that
escalate a chosen share of requests (or keep local errors under a target).

Examples are OpenAI Evals lines (`input` chat messages, `ideal` answer). Answers are graded
leniently and the same way for every tier: small models answer in sentences, so a numeric ideal
is compared with the last number in the answer, a yes/no ideal with the first yes/no word, and
anything else by containment after case-folding.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clawctl.engines.meter import LogitProbe, ScoreModel
from clawctl.errors import BadInput
from clawctl.schemas.policy import EvalExample, parse_evals
from clawctl.schemas.signals import FEATURES, LOW_IS_UNSURE, SIGNALS

if TYPE_CHECKING:  # numpy is imported where calibration runs: the CLI's --help needs none
    import numpy as np
    import numpy.typing as npt

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib


@dataclass(frozen=True)
class Example:
    messages: tuple[tuple[str, str], ...]
    ideal: str


def load_examples(path: Path, limit: int | None = None) -> list[Example]:
    """The first `limit` examples of an Evals JSONL file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read {path}: {exc}") from None
    return [as_example(e) for e in parse_evals(text, str(path), limit)]


def as_example(example: EvalExample) -> Example:
    return Example(tuple((m.role, m.content) for m in example.input), example.ideal_text)


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_YES_NO = re.compile(r"\b(yes|no|y|n)\b", re.IGNORECASE)
_YES = {"yes", "y"}
_WORDS = re.compile(r"\w+")
ONE_CLASS_SIGNAL = "window_entropy"  # the cut's signal where labels tell no answers apart
SHORT_REFERENCE = 24  # characters: a reference this short is graded as a label
AGREEMENT_F1 = 0.5


def grade(answer: str, ideal: str) -> bool:
    """Lenient, tier-independent grading (see the module docstring)."""
    ideal = ideal.strip()
    if _NUMBER.fullmatch(ideal):
        numbers = _NUMBER.findall(answer.replace(",", ""))
        return bool(numbers) and float(numbers[-1]) == float(ideal)
    if ideal.lower() in {"yes", "no", "y", "n"}:
        word = _YES_NO.search(answer)
        return word is not None and (word.group(1).lower() in _YES) == (ideal.lower() in _YES)
    return ideal.casefold() in answer.casefold()


def agrees(answer: str, reference: str) -> bool:
    """Whether an answer says what a stronger tier's unlabelled answer said: the reference
    graded as an ideal when it is short (a number, a yes/no, a name), else word-level F1 of at
    least `AGREEMENT_F1` (SQuAD's measure: order-free, forgiving of rephrasing)."""
    reference = reference.strip()
    if len(reference) <= SHORT_REFERENCE:
        return grade(answer, reference)
    ours, theirs = _WORDS.findall(answer.casefold()), _WORDS.findall(reference.casefold())
    common = sum((Counter(ours) & Counter(theirs)).values())
    if not common:
        return False
    precision, recall = common / len(ours), common / len(theirs)
    return 2 * precision * recall / (precision + recall) >= AGREEMENT_F1


def auroc(scores: list[float], positives: list[bool]) -> float | None:
    """Area under the ROC curve of `scores` ranking positives (wrong answers) first; ties
    count half. None when one class is empty."""
    pos = [s for s, p in zip(scores, positives, strict=True) if p]
    neg = [s for s, p in zip(scores, positives, strict=True) if not p]
    if not pos or not neg:
        return None
    ranked = sorted(scores)
    # average ranks (1-based) for ties
    rank: dict[float, float] = {}
    i = 0
    while i < len(ranked):
        j = i
        while j + 1 < len(ranked) and ranked[j + 1] == ranked[i]:
            j += 1
        rank[ranked[i]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(rank[s] for s in pos)
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def unsureness(signal: str, value: float | None) -> float:
    """A signal's value oriented so that higher means less sure (missing: most unsure)."""
    if value is None:
        return float("inf")
    return -value if signal in LOW_IS_UNSURE else value


@dataclass(frozen=True)
class SignalReport:
    signal: str
    auroc: float | None  # for `score` and `probe`: cross-validated (out-of-fold) AUROC
    threshold: float | None  # escalates the target share of these examples
    model: ScoreModel | None = None  # for `score`
    probe: LogitProbe | None = None  # for `probe`
    values: tuple[float | None, ...] = ()  # per example (`score`, `probe`: P(wrong) in sample)

    def unsure(self) -> list[float]:
        """Per example, higher when the tier was less sure (what a cut is placed on)."""
        return [unsureness(self.signal, v) for v in self.values]

    def threshold_at(self, cut: float) -> float:
        """A cut on `unsure()` as this signal's threshold."""
        return -cut if self.signal in LOW_IS_UNSURE else cut


@dataclass(frozen=True)
class TierReport:
    tier: str
    model: str
    examples: int
    accuracy: float
    signals: tuple[SignalReport, ...]

    @property
    def best(self) -> SignalReport | None:
        """The signal with the best AUROC. Where the tier was always wrong (or always right)
        no signal has one, but a cut is still worth placing (always wrong: every escalation
        within the target lifts accuracy), so the meter's plainest signal, `window_entropy`,
        stands in."""
        scored = [s for s in self.signals if s.auroc is not None and s.threshold is not None]
        if scored:
            return max(scored, key=lambda s: s.auroc or 0.0)
        plain = (s for s in self.signals if s.signal == ONE_CLASS_SIGNAL)
        return next((s for s in plain if s.threshold is not None), None)


def threshold_for_rate(signal: str, values: list[float | None], rate: float) -> float | None:
    """A threshold at which about `rate` of these values trigger escalation."""
    finite = sorted(unsureness(signal, v) for v in values if v is not None)
    if not finite or rate <= 0:
        return None
    keep = min(len(finite) - 1, max(0, round(len(finite) * (1 - rate)) - 1))
    cut = finite[keep]  # escalate what is strictly less sure than this
    return -cut if signal in LOW_IS_UNSURE else cut


def threshold_for_error(
    signal: str, values: list[float | None], correct: list[bool], error: float
) -> float | None:
    """The least escalation that leaves at most `error` of the kept answers wrong."""
    order = sorted(range(len(values)), key=lambda i: unsureness(signal, values[i]), reverse=True)
    for escalated in range(len(order)):
        kept = order[escalated:]
        wrong = sum(1 for i in kept if not correct[i])
        if kept and wrong / len(kept) <= error:
            if escalated == 0:
                return None  # nothing needs escalating
            cut = unsureness(signal, values[order[escalated]])
            return -cut if signal in LOW_IS_UNSURE else cut
    return None


def fit_score(
    observed: list[dict[str, float | None]], wrong: list[bool], folds: int = 5, l2: float = 1.0
) -> tuple[ScoreModel, list[float], float | None] | None:
    """Fit P(wrong) as a logistic regression over the meter's summaries. Returns the model (fit
    on everything), its in-sample probabilities (for thresholds) and its out-of-fold AUROC (for
    choosing it honestly against single signals). None with too few examples of either kind."""
    import numpy as np

    if min(sum(wrong), len(wrong) - sum(wrong)) < max(2, folds):
        return None
    names = list(FEATURES)
    raw = np.array([[_feature(o, n) for n in names] for o in observed], dtype=np.float64)
    present = ~np.isnan(raw)
    counts = present.sum(axis=0)
    sums = np.where(present, raw, 0.0).sum(axis=0)
    center = np.divide(sums, counts, out=np.zeros(len(names)), where=counts > 0)
    filled = np.where(np.isnan(raw), center, raw)  # missing: the average case
    scale = filled.std(axis=0)
    scale = np.where(scale > 1e-9, scale, 1.0)
    x = (filled - center) / scale
    y = np.array(wrong, dtype=np.float64)
    order = np.random.default_rng(0).permutation(len(y))
    out_of_fold = np.zeros(len(y))
    for part in np.array_split(order, folds):
        w, b = _logistic(x, y, np.setdiff1d(order, part), l2)
        out_of_fold[part] = x[part] @ w + b
    w, b = _logistic(x, y, order, l2)
    model = ScoreModel(
        weights={n: round(float(v), 6) for n, v in zip(names, w, strict=True)},
        bias=round(float(b), 6),
        center={n: round(float(v), 6) for n, v in zip(names, center, strict=True)},
        scale={n: round(float(v), 6) for n, v in zip(names, scale, strict=True)},
    )
    probabilities = [float(p) for p in 1.0 / (1.0 + np.exp(-(x @ w + b)))]
    return model, probabilities, auroc(list(out_of_fold), wrong)


def _logistic(
    x: npt.NDArray[np.float64], y: npt.NDArray[np.float64], rows: npt.NDArray[np.intp], l2: float
) -> tuple[npt.NDArray[np.float64], float]:
    """L2-regularised logistic regression of y on x (standardised columns) over `rows`, by
    gradient descent: a few hundred features at most, so no solver library is needed."""
    import numpy as np

    w, b = np.zeros(x.shape[1]), 0.0
    xs, ys = x[rows], y[rows]
    for _ in range(2000):
        p = 1.0 / (1.0 + np.exp(-(xs @ w + b)))
        w -= 0.2 * (xs.T @ (p - ys) + l2 * w) / len(rows)
        b -= 0.2 * float((p - ys).mean())
    return w, b


FirstTop = Sequence[tuple[int, float]]  # the first token's (id, log-probability) pairs, best first
PROBE_TOKENS = 256  # the tokens a probe reads; calibration asks for this many per example


def probe_tokens(first_tops: Sequence[FirstTop], count: int = PROBE_TOKENS) -> list[int]:
    """The `count` tokens most often among the examples' top lists (ties: higher mean
    log-probability), in id order."""
    seen: dict[int, list[float]] = {}
    for top in first_tops:
        for token, logprob in top:
            seen.setdefault(token, []).append(logprob)
    ranked = sorted(seen, key=lambda t: (-len(seen[t]), -sum(seen[t]) / len(seen[t]), t))
    return sorted(ranked[:count])


def probe_features(first_tops: Sequence[FirstTop], tokens: list[int]) -> npt.NDArray[np.float64]:
    """Log-probabilities at `tokens`; a token outside an example's list reads as the lowest
    listed one, as `LogitProbe.probability` reads it online."""
    import numpy as np

    x = np.empty((len(first_tops), len(tokens)))
    for row, top in enumerate(first_tops):
        known = dict(top)
        floor = min(known.values())
        x[row] = [known.get(t, floor) for t in tokens]
    return x


def fit_probe(
    first_tops: Sequence[FirstTop], wrong: list[bool], folds: int = 5, l2: float = 1.0
) -> tuple[LogitProbe, list[float], float | None] | None:
    """Fit P(wrong) on the first token's log-probabilities (`LogitProbe`). Returns the probe
    (fit on everything), its in-sample probabilities and its out-of-fold AUROC, where each
    fold's tokens are chosen without the fold. None with too few examples of either kind or
    without the first tokens' log-probabilities."""
    import numpy as np

    if min(sum(wrong), len(wrong) - sum(wrong)) < max(2, folds):
        return None
    if not all(first_tops):
        return None
    top_k = min(len(top) for top in first_tops)
    tops = [list(top)[:top_k] for top in first_tops]
    y = np.array(wrong, dtype=np.float64)

    def fit(rows: npt.NDArray[np.intp]) -> LogitProbe:
        tokens = probe_tokens([tops[i] for i in rows])
        x = probe_features(tops, tokens)
        center, scale = x[rows].mean(axis=0), x[rows].std(axis=0)
        scale = np.where(scale > 1e-9, scale, 1.0)
        w, b = _logistic((x - center) / scale, y, rows, l2)
        raw = w / scale  # standardisation folded in: the probe reads raw log-probabilities
        return LogitProbe(
            tokens=tuple(tokens),
            weights=tuple(round(float(v), 6) for v in raw),
            bias=round(b - float(raw @ center), 6),
            top_k=top_k,
        )

    order = np.random.default_rng(0).permutation(len(y))
    out_of_fold = np.zeros(len(y))
    for part in np.array_split(order, folds):
        out_of_fold[part] = read_probe(fit(np.setdiff1d(order, part)), [tops[i] for i in part])
    probe = fit(order)
    return probe, read_probe(probe, tops), auroc(list(out_of_fold), wrong)


def read_probe(probe: LogitProbe, first_tops: Sequence[FirstTop]) -> list[float]:
    """The probe's P(wrong) for examples known by their first tokens' top lists, as the meter
    reads it online from the full distribution."""
    rows = [list(top)[: probe.top_k] for top in first_tops]
    x = probe_features(rows, list(probe.tokens))
    floors = [min(lp for _, lp in top) for top in rows]
    return [probe.probability(v.tolist(), f) for v, f in zip(x, floors, strict=True)]


def _feature(observed: dict[str, float | None], name: str) -> float:
    value = observed.get(name)
    return float("nan") if value is None else value


def report_tier(
    tier: str,
    model: str,
    observed: list[dict[str, float | None]],
    correct: list[bool],
    rate: float | None,
    error: float | None,
    first_tops: Sequence[FirstTop] = (),
) -> TierReport:
    """Each signal's AUROC and threshold on one tier's answers (`score` and `probe` are fitted
    here, and their AUROCs are out-of-fold); `first_tops` are the first tokens' top
    log-probabilities (empty: no probe)."""
    wrong = [not c for c in correct]

    def threshold(signal: str, values: list[float | None]) -> float | None:
        if error is not None:
            return threshold_for_error(signal, values, correct, error)
        return threshold_for_rate(signal, values, rate or 0.0)

    signals = []
    for signal in SIGNALS:
        if signal == "score":
            fitted = fit_score(observed, wrong)
            if fitted is None:
                signals.append(SignalReport(signal, None, None))
                continue
            score_model, probabilities, area = fitted
            values: list[float | None] = list(probabilities)
            signals.append(
                SignalReport(
                    signal, area, threshold(signal, values), score_model, values=tuple(values)
                )
            )
            continue
        if signal == "probe":
            probed = fit_probe(first_tops, wrong) if len(first_tops) == len(wrong) else None
            if probed is None:
                signals.append(SignalReport(signal, None, None))
                continue
            probe, probabilities, area = probed
            values = list(probabilities)
            signals.append(
                SignalReport(
                    signal, area, threshold(signal, values), probe=probe, values=tuple(values)
                )
            )
            continue
        values = [o.get(signal) for o in observed]
        area = auroc([unsureness(signal, v) for v in values], wrong)
        signals.append(SignalReport(signal, area, threshold(signal, values), values=tuple(values)))
    accuracy = sum(correct) / len(correct) if correct else 0.0
    return TierReport(tier, model, len(correct), accuracy, tuple(signals))


def with_thresholds(
    policy_text: str, chosen: dict[str, SignalReport], never: frozenset[str] = frozenset()
) -> str:
    """The policy with each named tier escalating on exactly its chosen signal, and the tiers
    in `never` escalating on nothing (the next tier was not better on the examples)."""
    import tomli_w

    data: dict[str, Any] = tomllib.loads(policy_text)
    for tier in data.get("tiers", []):
        pick = chosen.get(tier.get("name"))
        stop = tier.get("name") in never
        if not stop and (pick is None or pick.threshold is None):
            continue
        escalate = tier.setdefault("escalate", {})
        for signal in SIGNALS:
            escalate.pop(signal, None)
        escalate.pop("model", None)
        escalate.pop("probe_model", None)
        if stop or pick is None or pick.threshold is None:
            continue
        escalate[pick.signal] = round(pick.threshold, 6)
        if pick.probe is not None:
            escalate["probe_model"] = {
                "tokens": list(pick.probe.tokens),
                "weights": list(pick.probe.weights),
                "bias": pick.probe.bias,
                "top_k": pick.probe.top_k,
            }
        if pick.model is not None:
            escalate["model"] = {
                "weights": dict(pick.model.weights),
                "bias": pick.model.bias,
                "center": dict(pick.model.center),
                "scale": dict(pick.model.scale),
            }
    return tomli_w.dumps(data)
