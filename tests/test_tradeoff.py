"""Fitting a cascade's handovers where the truth is known: synthetic tiers whose right and
wrong answers and unsureness are chosen, so the best cut can be worked out by hand."""

from __future__ import annotations

import pytest

from clawctl.routing.tradeoff import Target, fit_handover


def _tiers(
    local: str, remote: str, unsure: list[float] | None = None
) -> tuple[list[float], list[bool], list[bool]]:
    """'1'/'0' strings of right answers per example; unsure defaults to wrong-first order."""
    correct = [c == "1" for c in local]
    next_correct = [c == "1" for c in remote]
    if unsure is None:  # a meter that ranks this tier's wrong answers as least sure
        unsure = [0.9 - i * 0.01 if not c else 0.1 + i * 0.001 for i, c in enumerate(correct)]
    return unsure, correct, next_correct


def fit(
    local: str,
    remote: str,
    target: Target,
    unsure: list[float] | None = None,
    remote_cost: float = 1.0,
):  # type: ignore[no-untyped-def]
    values, correct, next_correct = _tiers(local, remote, unsure)
    n = len(correct)
    return fit_handover(
        "small", "remote", values, correct, [0.0] * n, next_correct, [remote_cost] * n, target
    )


def test_a_worse_next_tier_is_never_escalated_to() -> None:
    # local right on 4 of 9, remote on 2 of 9, and never where local is wrong
    fitted = fit("111100000", "110000000", Target(remote_rate=0.5))
    assert fitted.handover.escalates is False
    assert fitted.cut is None
    assert fitted.handover.accuracy == pytest.approx(4 / 9)
    assert "is not better" in fitted.handover.reason
    assert fitted.cascade_correct == [True] * 4 + [False] * 5


def test_escalates_exactly_what_the_next_tier_fixes_within_the_share() -> None:
    # local wrong on the last 4 (its least sure), remote right on all of them
    local, remote = "111111000000"[:10] + "00", "000000111111"
    fitted = fit(local, remote, Target(remote_rate=0.5))
    h = fitted.handover
    assert h.escalates
    assert h.rate == pytest.approx(6 / 12)
    assert h.accuracy == pytest.approx(1.0)
    assert h.target_met
    assert all(fitted.cascade_correct)
    capped = fit(local, remote, Target(remote_rate=0.25)).handover
    assert capped.rate == pytest.approx(3 / 12)  # the share allowed, spent on sure fixes
    assert capped.accuracy == pytest.approx(9 / 12)


def test_an_error_target_takes_the_cheapest_cut_that_meets_it() -> None:
    local, remote = "111111110000", "000000001111"
    fitted = fit(local, remote, Target(error_rate=0.2))
    assert fitted.handover.rate == pytest.approx(2 / 12)  # 2 wrong left of 12: 16.7% <= 20%
    assert fitted.handover.target_met
    unreachable = fit(local, "000000000000", Target(error_rate=0.1)).handover
    assert unreachable.target_met is False  # best effort: keeping everything is most accurate
    assert unreachable.escalates is False


def test_a_cost_budget_caps_what_escalation_may_spend() -> None:
    local, remote = "111111110000", "000000001111"
    # each escalation costs 1.0; 1000 * k / 12 <= 250 allows k = 3
    fitted = fit(local, remote, Target(cost_per_1000=250.0))
    assert fitted.handover.rate == pytest.approx(3 / 12)
    assert fitted.handover.cost_per_1000 == pytest.approx(250.0)


def test_a_meter_that_cannot_tell_escalates_only_where_it_pays() -> None:
    # unsureness ranks the right answers first: escalating them breaks what was right
    local, remote = "000011111111", "111100000000"
    unsure = [0.1] * 4 + [0.9] * 8
    fitted = fit(local, remote, Target(remote_rate=1.0), unsure=unsure)
    assert fitted.handover.escalates is False


def test_curves_run_from_one_tier_to_the_other_and_the_oracle_bounds_them() -> None:
    local, remote = "110110011", "011101101"
    h = fit(local, remote, Target(remote_rate=1.0)).handover
    first, last = h.curve[0], h.curve[-1]
    assert (first.rate, first.cascade, first.random) == (
        0.0,
        pytest.approx(6 / 9),
        pytest.approx(6 / 9),
    )
    assert last.rate == 1.0
    assert last.cascade == pytest.approx(6 / 9)  # everything escalated: the remote's 6 of 9
    assert last.random == pytest.approx(6 / 9)
    for point in h.curve:
        assert point.oracle >= point.cascade - 1e-9
        assert point.oracle >= point.random - 1e-9
    assert max(p.oracle for p in h.curve) == pytest.approx(1.0)  # 6 right + 3 the remote fixes


def test_a_longer_cascade_is_fitted_against_what_follows() -> None:
    # int2 -> int4 -> remote: the int4 handover is fitted first, and int2 is weighed against
    # the int4+remote cascade, which is right on everything
    int2, int4, remote = "110000", "111100", "000011"
    unsure4, c4, c_remote = _tiers(int4, remote)
    last = fit_handover("int4", "remote", unsure4, c4, [0.0] * 6, c_remote, [1.0] * 6,
                        Target(remote_rate=0.5))  # fmt: skip
    assert all(last.cascade_correct)
    unsure2, c2, _ = _tiers(int2, int4)
    first = fit_handover("int2", "int4", unsure2, c2, [0.0] * 6, last.cascade_correct,
                         last.cascade_cost, Target(remote_rate=1.0))  # fmt: skip
    assert first.handover.escalates
    assert first.handover.accuracy == pytest.approx(1.0)


def test_audits_take_their_share_exactly_and_stop_at_the_daily_budget() -> None:
    from clawctl.routing.audit import AuditSampler
    from clawctl.schemas.policy import AuditSection

    sampler = AuditSampler()
    quarter = AuditSection(share=0.25, max_per_day=100)
    day = 1_780_000_000.0
    taken = [sampler.take("p", quarter, now=day) for _ in range(40)]
    assert sum(taken) == 10
    assert taken[:4] == [False, False, False, True]  # every 4th eligible request
    budget = AuditSection(share=1.0, max_per_day=3)
    assert [sampler.take("q", budget, now=day) for _ in range(5)] == [True] * 3 + [False] * 2
    assert sampler.audited_today("q", now=day) == 3
    assert sampler.take("q", budget, now=day + 86_400)  # a new UTC day, a new budget
    assert not sampler.take("r", AuditSection(share=0.0), now=day)  # off by default


def _adjusted_policy(threshold: float, **adjust: float | None) -> object:
    from clawctl.schemas.policy import Policy

    return Policy.model_validate(
        {
            "name": "held",
            "start": "small",
            "adjust": {"target_remote_rate": 0.2, "window": 100, "every": 10, **adjust},
            "tiers": [
                {
                    "name": "small",
                    "kind": "local",
                    "model": "m",
                    "escalate": {"window_entropy": threshold},
                },
                {"name": "remote", "kind": "remote", "model": "r", "base_url": "http://x/v1"},
            ],
        }
    )


def _traffic(
    adjuster, policy, steps: int, seed: int = 0, cost: float = 0.0, censored: bool = False
) -> list[float]:  # type: ignore[no-untyped-def]
    """Requests whose window entropy is uniform on [0, 4), 100 a day: a tier escalates what
    reads above its live threshold, at `cost` each. Returns the live threshold after each.
    `censored`: an escalated request reads just past the live threshold, as the real meter does
    (it stops reading when it fires)."""
    import random

    from clawctl.engines.meter import Thresholds
    from clawctl.schemas.signals import Signals

    rng = random.Random(seed)
    tier = policy.tiers[0]
    seen = []
    for step in range(steps):
        live = adjuster.thresholds(
            policy, tier, Thresholds(window_entropy=tier.escalate.window_entropy)
        )
        value = rng.uniform(0, 4)
        signals = Signals(
            tokens=8, mean_entropy=value, max_entropy=value, window_entropy=value, min_prob=0.5,
            first_margin=None,
        )  # fmt: skip
        up = value > live.window_entropy
        if censored and up:
            read = live.window_entropy + 0.01
            signals = signals.model_copy(
                update={"window_entropy": read, "max_entropy": read, "mean_entropy": read}
            )
        adjuster.observe(policy, tier, signals, up, cost if up else 0.0, now=step * 864.0)
        written = Thresholds(window_entropy=tier.escalate.window_entropy)
        seen.append(adjuster.thresholds(policy, tier, written).window_entropy)
    return seen


def test_online_adjustment_converges_to_its_target_within_bounds_and_step() -> None:
    from clawctl.routing.adjust import ThresholdAdjuster

    # written at 2.0: half of this traffic escalates; the target is 20% (uniform: 3.2)
    policy = _adjusted_policy(2.0, max_step=0.05)
    adjuster = ThresholdAdjuster()
    path = _traffic(adjuster, policy, 1500)
    for before, after in zip([2.0, *path], path, strict=False):
        assert abs(after - before) <= 0.05 * before + 1e-9  # never faster than its limit
    assert path[-1] == pytest.approx(3.2, abs=0.25)
    (live,) = [row for row in adjuster.live(policy) if row.tier == "small"]
    assert live.remote_share == pytest.approx(0.2, abs=0.1)
    assert live.changes >= 5


def test_online_adjustment_holds_a_spend_per_day() -> None:
    """100 requests a day and 0.01 an escalation: 0.2 a day buys a 20% share (uniform: 3.2)."""
    from clawctl.routing.adjust import ThresholdAdjuster

    spend = {"target_remote_rate": None, "spend_per_day": 0.2, "max_step": 0.05}
    policy = _adjusted_policy(2.0, **spend)
    adjuster = ThresholdAdjuster()
    path = _traffic(adjuster, policy, 1500, cost=0.01)
    for before, after in zip([2.0, *path], path, strict=False):
        assert abs(after - before) <= 0.05 * before + 1e-9
    assert path[-1] == pytest.approx(3.2, abs=0.25)
    (live,) = [row for row in adjuster.live(policy) if row.tier == "small"]
    assert live.target == pytest.approx(0.2, abs=0.01)
    assert live.spend_per_day == pytest.approx(0.2, abs=0.1)


def test_a_spend_target_waits_for_a_price() -> None:
    """Free escalations (no price) give no rate for a budget: the threshold stays written."""
    from clawctl.routing.adjust import ThresholdAdjuster

    policy = _adjusted_policy(2.0, target_remote_rate=None, spend_per_day=0.2)
    path = _traffic(ThresholdAdjuster(), policy, 200, cost=0.0)
    assert set(path) == {2.0}


def test_adjust_needs_exactly_one_target() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="exactly one"):
        _adjusted_policy(2.0, spend_per_day=0.2)
    with pytest.raises(ValidationError, match="exactly one"):
        _adjusted_policy(2.0, target_remote_rate=None)


def test_online_adjustment_stays_inside_the_policy_bounds() -> None:
    from clawctl.routing.adjust import ThresholdAdjuster

    # the target needs 3.2, but the policy lets it go no higher than 1.25x of 2.0
    policy = _adjusted_policy(2.0, max_step=0.2, max_factor=1.25)
    path = _traffic(ThresholdAdjuster(), policy, 600)
    assert max(path) == pytest.approx(2.5)
    assert min(path) >= 2.0 * 0.5


def test_a_tier_never_right_still_escalates_its_target_share() -> None:
    """No signal has an AUROC when every local answer is wrong; the plain window entropy stands
    in, and the handover on it escalates the share allowed (every escalation can only help)."""
    from clawctl.routing.calibrate import report_tier

    n = 10
    observed: list[dict[str, float | None]] = [
        {"window_entropy": 1.0 + i / 10, "max_entropy": 2.0 + i / 10} for i in range(n)
    ]
    report = report_tier("small", "m", observed, [False] * n, 0.3, None)
    best = report.best
    assert best is not None
    assert best.signal == "window_entropy"
    assert best.auroc is None
    fitted = fit_handover(
        "small", "remote", best.unsure(), [False] * n, [0.0] * n, [True] * n, [1.0] * n,
        Target(remote_rate=0.3),
    )  # fmt: skip
    assert fitted.handover.rate == pytest.approx(0.3)
    assert fitted.cut is not None
    assert best.threshold_at(fitted.cut) == pytest.approx(1.6)  # 1.7, 1.8, 1.9 go


def test_online_adjustment_is_not_slowed_by_the_meter_stopping_early() -> None:
    """An escalated request's reading stops just past the live threshold, so the window's
    quantile cannot say how far to move; the adjuster then steps in proportion to the excess
    share and reaches the target about as fast as its limit allows."""
    from clawctl.routing.adjust import ThresholdAdjuster

    policy = _adjusted_policy(1.0, max_step=0.25, max_factor=4.0)  # 75% escalate at first
    adjuster = ThresholdAdjuster()
    path = _traffic(adjuster, policy, 300, censored=True)
    for before, after in zip([1.0, *path], path, strict=False):
        assert abs(after - before) <= 0.25 * before + 1e-9
    # the target's threshold is 3.2; 1.25^5 = 3.05: reachable in 50 requests, near it by 100
    assert 2.4 <= path[99] <= 4.0
    (live,) = [row for row in adjuster.live(policy) if row.tier == "small"]
    assert live.remote_share == pytest.approx(0.2, abs=0.1)
