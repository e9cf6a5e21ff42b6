"""Online adjustment: thresholds that hold a policy's remote share on the traffic it gets.

A threshold calibrated on one set escalates a different share of another (on unseen tasks the
shipped cascade escalated 92-100%). With `[adjust]` in a policy, clawd keeps, per local tier, the
meter's reading of its armed signal and whether it escalated for the last `window` requests;
every `every` requests it computes the threshold that would have escalated the target share of
them (where more escalated than the target, at least a step in proportion to the excess: the
readings of escalated requests stop where the meter fired) and moves the live threshold toward
it, by at most `max_step` of its value per change and within `min_factor`..`max_factor` of the
written threshold, so one odd burst of traffic cannot swing routing and a bad target cannot push
a tier to escalate everything. Each change is logged.
Audited answers (`[audit]`) feed the measured local error rate that `clawctl route show`
displays beside the live thresholds.

A spend target (`spend_per_day`) becomes a share: the window's requests per day (from their
times) and the mean remote cost of its escalated requests say what share of requests the budget
pays for. The share is re-derived at every fit, so the thresholds follow the traffic's volume
and price; until the window holds an escalation with a cost there is no price to go by, and the
thresholds stay where they are.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from clawctl.engines.meter import Thresholds
from clawctl.routing.calibrate import threshold_for_rate
from clawctl.schemas.policy import AdjustSection, LiveTier, Policy, Tier
from clawctl.schemas.signals import LOW_IS_UNSURE, SIGNALS, Signals

log = logging.getLogger("clawd.routing")


def armed_signal(tier: Tier) -> str | None:
    """The tier's one armed signal (adjustment moves a single threshold), else None."""
    armed = [s for s in SIGNALS if getattr(tier.escalate, s) is not None]
    return armed[0] if len(armed) == 1 else None


@dataclass(frozen=True)
class _Seen:
    """One request a tier ran: its signal's reading, whether it handed over, when, and what the
    tiers after it cost."""

    value: float | None
    escalated: bool
    at: float
    cost: float
    live: float  # the threshold it ran with


@dataclass
class _TierState:
    signal: str
    written: float
    live: float
    seen: collections.deque[_Seen]
    audits: collections.deque[bool]
    since_fit: int = 0
    changes: int = 0
    target: float | None = None
    spend: float | None = None  # per day at the window's rate, share and escalation cost

    def share(self) -> float:
        """The share of the window's requests that escalated."""
        return sum(r.escalated for r in self.seen) / len(self.seen) if self.seen else 0.0


@dataclass
class ThresholdAdjuster:
    _states: dict[tuple[str, str], _TierState] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _state(self, policy: Policy, tier: Tier) -> _TierState | None:
        """The tier's state; reset when the policy's written threshold changed (re-applied)."""
        signal = armed_signal(tier)
        if policy.adjust is None or signal is None:
            return None
        written = float(getattr(tier.escalate, signal))
        key = (policy.name, tier.name)
        state = self._states.get(key)
        if state is None or state.signal != signal or state.written != written:
            window = policy.adjust.window
            state = _TierState(
                signal, written, written, collections.deque(maxlen=window),
                collections.deque(maxlen=window),
                target=policy.adjust.target_remote_rate,
            )  # fmt: skip
            self._states[key] = state
        return state

    def thresholds(self, policy: Policy, tier: Tier, written: Thresholds) -> Thresholds:
        """The thresholds to run `tier` with: the written ones, its adjusted signal replaced."""
        with self._lock:
            state = self._state(policy, tier)
            if state is None or state.live == state.written:
                return written
            changed: dict[str, Any] = {state.signal: state.live}
            return dataclasses.replace(written, **changed)

    def observe(
        self, policy: Policy, tier: Tier, signals: Signals, escalated: bool,
        cost: float = 0.0, now: float | None = None,
    ) -> None:  # fmt: skip
        """One request `tier` ran: what its signal read, whether it handed over, and what the
        tiers after it cost (at the policy's prices)."""
        with self._lock:
            state = self._state(policy, tier)
            if state is None:
                return
            at = time.monotonic() if now is None else now
            value = signals.value(state.signal)
            state.seen.append(_Seen(value, escalated, at, cost, state.live))
            state.since_fit += 1
            assert policy.adjust is not None
            if state.since_fit >= policy.adjust.every:
                state.since_fit = 0
                self._fit(policy, tier, state)

    def observe_audit(self, policy: Policy, tier: Tier, agreed: bool) -> None:
        with self._lock:
            state = self._state(policy, tier)
            if state is not None:
                state.audits.append(agreed)

    def _target(self, adjust: AdjustSection, state: _TierState) -> float | None:
        """The share to escalate: written, or what `spend_per_day` buys at the window's rate
        of requests and cost per escalation."""
        if adjust.spend_per_day is None:
            return adjust.target_remote_rate
        paid = [r.cost for r in state.seen if r.escalated and r.cost > 0]
        span = state.seen[-1].at - state.seen[0].at if len(state.seen) > 1 else 0.0
        if not paid or span <= 0:
            return None
        per_day = (len(state.seen) - 1) / span * 86_400
        state.spend = per_day * state.share() * (sum(paid) / len(paid))
        return min(1.0, adjust.spend_per_day / (per_day * sum(paid) / len(paid)))

    def _fit(self, policy: Policy, tier: Tier, state: _TierState) -> None:
        adjust = policy.adjust
        assert adjust is not None
        target = self._target(adjust, state)
        if target is None:
            return
        state.target = target
        # The requests run at the live threshold say where it stands; within the noise of
        # their count (one binomial standard error) of the target, it holds.
        tail = list(itertools.takewhile(lambda r: r.live == state.live, reversed(state.seen)))
        now = sum(r.escalated for r in tail) / len(tail) if tail else state.share()
        if tail and abs(now - target) <= math.sqrt(target * (1 - target) / len(tail)):
            return
        desired = threshold_for_rate(state.signal, [r.value for r in state.seen], target)
        if desired is None:
            return
        step = adjust.max_step * abs(state.live)
        if now > target:
            # An escalated request's reading stops where the meter fired, just past the live
            # threshold, so how far above it the request would have read is unknown and the
            # quantile understates how far to move: step toward escalating less in proportion
            # to the excess (the whole step at twice the target), or further if it says so.
            push = step * min(1.0, (now - target) / max(target, 1e-9))
            if state.signal in LOW_IS_UNSURE:
                desired = min(desired, state.live - push)
            else:
                desired = max(desired, state.live + push)
        low, high = state.written * adjust.min_factor, state.written * adjust.max_factor
        moved = min(max(desired, state.live - step), state.live + step)
        moved = min(max(moved, low), high)
        if signal_is_probability(state.signal):
            moved = min(moved, 0.999999)
        if abs(moved - state.live) < 1e-12:
            return
        log.info(
            "policy %s tier %s: %s threshold %.6g -> %.6g (escalated %.0f%% of the last %d, "
            "target %.0f%%)", policy.name, tier.name, state.signal, state.live, moved,
            100 * now, len(tail), 100 * target,
        )  # fmt: skip
        state.live = moved
        state.changes += 1

    def live(self, policy: Policy) -> list[LiveTier]:
        """Every local tier's escalation as it runs now."""
        rows = []
        with self._lock:
            for tier in policy.tiers:
                if tier.kind != "local":
                    continue
                signal = armed_signal(tier)
                written = None if signal is None else getattr(tier.escalate, signal)
                state = self._states.get((policy.name, tier.name))
                if state is None or state.signal != signal:
                    rows.append(LiveTier(
                        tier=tier.name, signal=signal, written=written, live=written,
                        requests=0, remote_share=None, audits=0, local_error=None, changes=0,
                    ))  # fmt: skip
                    continue
                audits = list(state.audits)
                share = state.share() if state.seen else None
                error = 1 - sum(audits) / len(audits) if audits else None
                rows.append(LiveTier(
                    tier=tier.name, signal=signal, written=written, live=state.live,
                    requests=len(state.seen), remote_share=share, audits=len(audits),
                    local_error=error, changes=state.changes, target=state.target,
                    spend_per_day=state.spend,
                ))  # fmt: skip
        return rows


def signal_is_probability(signal: str) -> bool:
    return signal in {"min_prob", "first_margin", "answer_margin", "score", "probe"}
