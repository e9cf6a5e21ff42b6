"""Whether escalating pays, and how much of it: one handover of a cascade, fitted on examples
both tiers answered.

Calibrating a tier's meter alone answers "which answers is this tier unsure of"; it never asks
whether the next tier would have done better on them. Here every candidate cut (escalate the k
answers the tier was least sure of, k = 0..n) is scored by what the cascade would have got right:
this tier's answers where it keeps them, the next tier's where it hands over. The cut chosen
maximises that accuracy within the target (a share escalated, a cost per 1,000 requests), or is
the cheapest one that meets an error target; when no cut beats keeping everything, the tier
never escalates, and the report says why. For a longer cascade the fit runs backwards, so each
tier is weighed against the cascade that follows it, not against the next tier alone.

The report also gives the trade-off as curves over the share escalated: this cascade, a random
router (escalating a random share: accuracy moves linearly between the two tiers), and the
oracle (escalating exactly the answers the next tier fixes first).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from clawctl.schemas.policy import CurvePoint, Handover


@dataclass(frozen=True)
class Target:
    """Exactly one is set."""

    remote_rate: float | None = None
    error_rate: float | None = None
    cost_per_1000: float | None = None


@dataclass(frozen=True)
class Fitted:
    handover: Handover
    cut: float | None  # escalate answers strictly less sure than this (None: never)
    cascade_correct: list[bool]  # per example, what the cascade from this tier got right
    cascade_cost: list[float]  # per example, what it cost


def fit_handover(
    tier: str,
    next_tier: str,
    unsure: Sequence[float],
    correct: Sequence[bool],
    cost: Sequence[float],
    next_correct: Sequence[bool],
    next_cost: Sequence[float],
    target: Target,
    points: int = 11,
) -> Fitted:
    """The best cut for this handover (see the module docstring); `unsure` is this tier's
    unsureness per example (higher: less sure), `next_*` the cascade after it."""
    n = len(correct)
    order = sorted(range(n), key=lambda i: unsure[i], reverse=True)  # least sure first
    right, spent = [sum(correct)], [sum(cost)]
    for i in order:  # escalating one more: its answer and cost become the next tier's
        right.append(right[-1] - correct[i] + next_correct[i])
        spent.append(spent[-1] + next_cost[i])
    accuracy = [r / n for r in right]
    per_1000 = [1000 * s / n for s in spent]
    k = _choose(accuracy, per_1000, n, target)
    # A cut between the k-th and (k+1)-th least sure answers (values tied with the first one
    # kept are kept with it).
    cut = None if k == 0 else (unsure[order[k]] if k < n else float("-inf"))
    escalated = set(order[:k])
    cascade_correct = [next_correct[i] if i in escalated else correct[i] for i in range(n)]
    cascade_cost = [cost[i] + next_cost[i] if i in escalated else cost[i] for i in range(n)]
    alone, after = sum(correct) / n, sum(next_correct) / n
    best = max(accuracy)
    if k == 0 and best <= accuracy[0]:
        reason = (
            f"{next_tier} is not better on these examples ({after:.0%} vs {alone:.0%} here, "
            f"at best {best:.0%} for the cascade): {tier} never escalates"
        )
    elif k == 0:
        reason = f"the target allows no escalation from {tier}"
    else:
        reason = (
            f"escalating the {k / n:.0%} of answers {tier} is least sure of lifts accuracy from "
            f"{alone:.0%} to {accuracy[k]:.0%} ({next_tier} alone: {after:.0%})"
        )
    met = _meets(accuracy[k], k / n, per_1000[k], target)
    handover = Handover(
        tier=tier, next_tier=next_tier, escalates=k > 0, rate=k / n, accuracy=accuracy[k],
        alone=alone, next_alone=after, cost_per_1000=per_1000[k], target_met=met,
        reason=reason, curve=curve(accuracy, correct, next_correct, points),
    )  # fmt: skip
    return Fitted(handover, cut, cascade_correct, cascade_cost)


def _meets(accuracy: float, rate: float, per_1000: float, target: Target) -> bool:
    if target.remote_rate is not None:
        return rate <= target.remote_rate + 1e-9
    if target.cost_per_1000 is not None:
        return per_1000 <= target.cost_per_1000 + 1e-9
    assert target.error_rate is not None
    return 1 - accuracy <= target.error_rate + 1e-9


def _choose(accuracy: list[float], per_1000: list[float], n: int, target: Target) -> int:
    """How many to escalate: the most accurate cut the target allows (fewest on ties); for an
    error target the cheapest cut that meets it, else the most accurate one."""
    if target.error_rate is not None:
        for k in range(n + 1):
            if 1 - accuracy[k] <= target.error_rate + 1e-9:
                return k
        return max(range(n + 1), key=lambda k: (accuracy[k], -k))
    allowed = [k for k in range(n + 1) if _meets(accuracy[k], k / n, per_1000[k], target)]
    return max(allowed or [0], key=lambda k: (accuracy[k], -k))


def curve(
    accuracy: list[float],
    correct: Sequence[bool],
    next_correct: Sequence[bool],
    points: int,
) -> list[CurvePoint]:
    """Accuracy at evenly spaced shares escalated: this cascade, a random router, the oracle."""
    n = len(correct)
    alone, after = sum(correct) / n, sum(next_correct) / n
    fixes = sum(1 for i in range(n) if not correct[i] and next_correct[i])
    breaks = sum(1 for i in range(n) if correct[i] and not next_correct[i])
    result = []
    for step in range(points):
        rate = step / (points - 1)
        k = round(rate * n)
        # the oracle escalates the answers the next tier fixes first, then the ones neither
        # gets right, and the ones it would break last
        neutral = n - fixes - breaks
        oracle = alone + min(k, fixes) / n - max(0, k - fixes - neutral) / n
        random = alone + rate * (after - alone)
        result.append(CurvePoint(rate=rate, cascade=accuracy[k], random=random, oracle=oracle))
    return result
