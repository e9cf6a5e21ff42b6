"""Calibrating a policy inside clawd: its tiers answer labelled examples through the serving
core, and each local tier's escalation threshold is chosen from what the meter saw and, when the
tiers after it answered too (`ask_next_tiers`, remote ones included), from whether escalating
actually pays there (routing/tradeoff.py): a tier whose next tier is not better never escalates.

Why in the daemon: the policy, the models and the engines are the daemon's, and it can run the
examples straight through `GenerationRun` (no answer cache: calibration needs each answer's own
meter readings; the ledger records them under the app `clawctl-calibrate`). The client sends
the examples and reads `JobLine`s: progress per example, then the `CalibrationResult`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from clawctl.engines.base import ChatTurn, Prompt
from clawctl.errors import BadInput, ClawError
from clawctl.routing.calibrate import (
    PROBE_TOKENS,
    FirstTop,
    SignalReport,
    TierReport,
    grade,
    report_tier,
    with_thresholds,
)
from clawctl.routing.policy_store import PolicyFile
from clawctl.routing.remote import RemoteFailure
from clawctl.routing.tradeoff import Target, fit_handover
from clawctl.schemas.jobs import AdvanceLine, ErrorLine, JobLine, MessageLine, ResultLine, StartLine
from clawctl.schemas.openai import MeterRequest
from clawctl.schemas.policy import (
    CalibrateRequest,
    CalibrationResult,
    EvalExample,
    Handover,
    SignalScore,
    Tier,
    TierCalibration,
)
from clawctl.services import Services
from clawctl.serving.tier_call import ask_local, ask_remote

log = logging.getLogger("clawd.calibrate")
APP = "clawctl-calibrate"


async def calibrate(
    services: Services, found: PolicyFile, request: CalibrateRequest
) -> AsyncIterator[JobLine]:
    """Run the calibration and yield its lines; the last is the result or an error."""
    try:
        async for line in _calibrate(services, found, request):
            yield line
    except ClawError as exc:
        yield ErrorLine(message=exc.message, code=exc.code, status=exc.http_status)


@dataclass
class _Answers:
    """What one tier did on the examples."""

    correct: list[bool]
    cost: list[float]  # at the tier's prices


async def _calibrate(
    services: Services, found: PolicyFile, request: CalibrateRequest
) -> AsyncIterator[JobLine]:
    installed = {m.name for m in services.store.installed()}
    reports: dict[str, TierReport] = {}
    answers: dict[str, _Answers] = {}
    skipped: list[str] = []
    audited: dict[str, tuple[str, list[bool], list[float]]] = {}
    if request.from_ledger:
        audited = await _from_audits(services, found, request, reports)
    for tier in found.policy.tiers if not request.from_ledger else ():
        if tier.kind == "remote":
            if request.ask_next_tiers:
                async for line in _ask_remote(services, tier, request, answers):
                    yield line
            continue
        if tier.model not in installed:
            skipped.append(tier.name)
            yield MessageLine(
                text=f"skipping tier {tier.name}: {tier.model} is not installed", level="warning"
            )
            continue
        yield StartLine(description=f"{tier.name} ({tier.model})", total=len(request.examples))
        observed: list[dict[str, float | None]] = []
        first_tops: list[FirstTop] = []
        done = _Answers([], [])
        for example in request.examples:
            features, first_top, right, cost = await _answer(
                services, tier, example, request.max_tokens
            )
            observed.append(features)
            first_tops.append(first_top)
            done.correct.append(right)
            done.cost.append(cost)
            yield AdvanceLine(amount=1)
        answers[tier.name] = done
        # fitting the score and probe models is numpy work: off the event loop
        reports[tier.name] = await asyncio.to_thread(
            report_tier,
            tier.name,
            tier.model,
            observed,
            done.correct,
            request.target_remote_rate,
            request.target_error_rate,
            first_tops,
        )
    if not reports:
        raise BadInput(f"policy {found.policy.name}: none of its local tiers' models is installed")
    chosen = {name: best for name, r in reports.items() if (best := r.best) is not None}
    handovers: list[Handover] = []
    never: set[str] = set()
    if request.ask_next_tiers:
        if request.from_ledger:
            handovers, fitted = _fit_audits(request, reports, audited)
        else:
            handovers, fitted = _fit_handovers(found, request, reports, answers)
        for handover in handovers:
            yield MessageLine(text=f"{handover.tier} → {handover.next_tier}: {handover.reason}")
        for name, threshold in fitted.items():
            if threshold is None:
                never.add(name)
                chosen.pop(name, None)
            elif name in chosen:
                chosen[name] = dataclasses.replace(chosen[name], threshold=threshold)
    written = None
    if not request.dry_run and (chosen or never):
        text = with_thresholds(found.path.read_text(encoding="utf-8"), chosen, frozenset(never))
        written = str(services.policies.install(text, str(found.path)).path)
        log.info("calibration wrote thresholds into %s: %s", written, _names(chosen))
    result = CalibrationResult(
        tiers=[_tier_result(r) for r in reports.values()],
        chosen=_names(chosen),
        skipped=skipped,
        handovers=handovers,
        written=written,
    )
    yield ResultLine(result=result.model_dump(mode="json"))


async def _from_audits(
    services: Services,
    found: PolicyFile,
    request: CalibrateRequest,
    reports: dict[str, TierReport],
) -> dict[str, tuple[str, list[bool], list[float]]]:
    """The policy's audit pairs as calibration data: per local tier, its meter readings and
    whether the next tier agreed (the label); returns, per tier, the next tier's name, the
    labels and what each audit's answer cost."""
    pairs = services.ledger.audits(found.policy.name)
    if not pairs:
        raise BadInput(
            f"the ledger has no audited requests of policy {found.policy.name}: give it an "
            "[audit] share and let traffic run, or calibrate on labelled examples (--data)"
        )
    audited: dict[str, tuple[str, list[bool], list[float]]] = {}
    for tier in found.policy.tiers:
        mine = [pair for pair in pairs if pair.tier == tier.name]
        if not mine:
            continue
        labels = [pair.agree for pair in mine]
        reports[tier.name] = await asyncio.to_thread(
            report_tier,
            tier.name,
            tier.model,
            [pair.features for pair in mine],
            labels,
            request.target_remote_rate,
            request.target_error_rate,
        )
        audited[tier.name] = (mine[-1].next_tier, labels, [pair.cost for pair in mine])
    return audited


def _fit_audits(
    request: CalibrateRequest,
    reports: dict[str, TierReport],
    audited: dict[str, tuple[str, list[bool], list[float]]],
) -> tuple[list[Handover], dict[str, float | None]]:
    """Each audited tier's handover: the next tier's answer is the label, so it counts as
    right, and escalating pays exactly where the tier disagreed with it."""
    target = Target(
        request.target_remote_rate, request.target_error_rate, request.target_cost_per_1000
    )
    handovers: list[Handover] = []
    thresholds: dict[str, float | None] = {}
    for name, (next_tier, labels, costs) in audited.items():
        best = reports[name].best
        n = len(labels)
        if best is None and not all(labels):
            continue  # no signal told its disagreements apart: nothing to place a cut on
        # With every answer agreeing no signal ranks anything, and no cut can help: never.
        unsure = best.unsure() if best is not None else [0.0] * n
        fitted = fit_handover(name, next_tier, unsure, labels, [0.0] * n, [True] * n, costs, target)
        handovers.append(fitted.handover)
        cut = fitted.cut
        thresholds[name] = None if cut is None or best is None else best.threshold_at(cut)
    return handovers, thresholds


def _fit_handovers(
    found: PolicyFile,
    request: CalibrateRequest,
    reports: dict[str, TierReport],
    answers: dict[str, _Answers],
) -> tuple[list[Handover], dict[str, float | None]]:
    """Each local tier against the cascade after it, fitted from the last tier backwards;
    returns the handovers (in policy order) and each fitted tier's threshold (None: never
    escalate). A tier without answers (not installed, remote unreachable) ends the chain."""
    target = Target(
        request.target_remote_rate, request.target_error_rate, request.target_cost_per_1000
    )
    tiers = found.policy.tiers
    handovers: list[Handover] = []
    thresholds: dict[str, float | None] = {}
    after: _Answers | None = None
    for index in range(len(tiers) - 1, -1, -1):
        tier = tiers[index]
        here = answers.get(tier.name)
        report = reports.get(tier.name)
        best = report.best if report is not None else None
        if here is None:
            after = None
            continue
        if after is None or best is None or index + 1 >= len(tiers):
            after = here
            continue
        fitted = fit_handover(
            tier.name, tiers[index + 1].name, best.unsure(), here.correct, here.cost,
            after.correct, after.cost, target,
        )  # fmt: skip
        handovers.insert(0, fitted.handover)
        thresholds[tier.name] = None if fitted.cut is None else best.threshold_at(fitted.cut)
        after = _Answers(fitted.cascade_correct, fitted.cascade_cost)
    return handovers, thresholds


async def _ask_remote(
    services: Services, tier: Tier, request: CalibrateRequest, answers: dict[str, _Answers]
) -> AsyncIterator[JobLine]:
    """The remote tier's answers to the examples (what escalating would have given)."""
    yield StartLine(description=f"{tier.name} ({tier.model}, remote)", total=len(request.examples))
    done = _Answers([], [])
    for example in request.examples:
        try:
            answer = await ask_remote(services, tier, _prompt(example), request.max_tokens)
        except RemoteFailure as failure:
            yield MessageLine(
                text=f"remote tier {tier.name} could not answer ({failure.message}); the "
                "handover to it is not fitted",
                level="warning",
            )
            return
        done.correct.append(grade(answer.text, example.ideal_text))
        done.cost.append(answer.cost)
        yield AdvanceLine(amount=1)
    answers[tier.name] = done


async def _answer(
    services: Services, tier: Tier, example: EvalExample, max_tokens: int
) -> tuple[dict[str, float | None], FirstTop, bool, float]:
    """One example answered greedily by the tier's model with its adapters and meter settings:
    the meter's summaries, the first token's top log-probabilities, whether it was right, and
    its cost at the tier's prices."""
    meter = MeterRequest(
        window=tier.escalate.window,
        min_tokens=tier.escalate.min_tokens,
        decide_within=tier.escalate.decide_within,
        first_top=PROBE_TOKENS,
    )
    answer = await ask_local(services, tier, _prompt(example), max_tokens, APP, meter)
    entropy = answer.signals
    features = entropy.features() if entropy else {}
    first_top: FirstTop = (entropy.first_top or []) if entropy else []
    return features, first_top, grade(answer.text, example.ideal_text), answer.cost


def _prompt(example: EvalExample) -> Prompt:
    return Prompt(chat=tuple(ChatTurn(m.role, m.content) for m in example.input))


def _names(chosen: dict[str, SignalReport]) -> dict[str, str]:
    return {tier: report.signal for tier, report in chosen.items()}


def _tier_result(report: TierReport) -> TierCalibration:
    return TierCalibration(
        tier=report.tier,
        model=report.model,
        examples=report.examples,
        accuracy=report.accuracy,
        signals={
            s.signal: SignalScore(auroc=s.auroc, threshold=s.threshold) for s in report.signals
        },
    )
