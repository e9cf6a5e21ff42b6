"""Calibrating a policy inside clawd: its local tiers answer labelled examples through the
serving core, and each tier's escalation threshold is chosen from what the meter saw.

Why in the daemon: the policy, the models and the engines are the daemon's, and it can run the
examples straight through `GenerationRun` (no answer cache: calibration needs each answer's own
meter readings; the ledger records them under the app `clawctl-calibrate`). The client sends
the examples and reads `JobLine`s: progress per example, then the `CalibrationResult`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from clawctl.engines.base import ChatTurn, Prompt, SamplingParams
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
from clawctl.schemas.jobs import AdvanceLine, ErrorLine, JobLine, MessageLine, ResultLine, StartLine
from clawctl.schemas.openai import AdapterChoice, ClawRequest, MeterRequest
from clawctl.schemas.policy import (
    CalibrateRequest,
    CalibrationResult,
    EvalExample,
    SignalScore,
    Tier,
    TierCalibration,
)
from clawctl.services import Services
from clawctl.serving.dedup import begin
from clawctl.serving.generation import GenerationRun

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


async def _calibrate(
    services: Services, found: PolicyFile, request: CalibrateRequest
) -> AsyncIterator[JobLine]:
    installed = {m.name for m in services.store.installed()}
    reports: list[TierReport] = []
    skipped: list[str] = []
    for tier in found.policy.tiers:
        if tier.kind != "local":
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
        correct: list[bool] = []
        for example in request.examples:
            features, first_top, right = await _answer(services, tier, example, request.max_tokens)
            observed.append(features)
            first_tops.append(first_top)
            correct.append(right)
            yield AdvanceLine(amount=1)
        # fitting the score and probe models is numpy work: off the event loop
        reports.append(
            await asyncio.to_thread(
                report_tier,
                tier.name,
                tier.model,
                observed,
                correct,
                request.target_remote_rate,
                request.target_error_rate,
                first_tops,
            )
        )
    if not reports:
        raise BadInput(f"policy {found.policy.name}: none of its local tiers' models is installed")
    chosen = {r.tier: best for r in reports if (best := r.best) is not None}
    written = None
    if not request.dry_run and chosen:
        text = with_thresholds(found.path.read_text(encoding="utf-8"), chosen)
        written = str(services.policies.install(text, str(found.path)).path)
        log.info("calibration wrote thresholds into %s: %s", written, _names(chosen))
    result = CalibrationResult(
        tiers=[_tier_result(r) for r in reports],
        chosen=_names(chosen),
        skipped=skipped,
        written=written,
    )
    yield ResultLine(result=result.model_dump(mode="json"))


async def _answer(
    services: Services, tier: Tier, example: EvalExample, max_tokens: int
) -> tuple[dict[str, float | None], FirstTop, bool]:
    """One example answered greedily by the tier's model with its adapters and meter settings:
    the meter's summaries, the first token's top log-probabilities, and whether it was right."""
    meter = MeterRequest(
        window=tier.escalate.window,
        min_tokens=tier.escalate.min_tokens,
        decide_within=tier.escalate.decide_within,
        first_top=PROBE_TOKENS,
    )
    run = GenerationRun(
        services,
        "chat",
        tier.model,
        Prompt(chat=tuple(ChatTurn(m.role, m.content) for m in example.input)),
        SamplingParams(max_tokens=max_tokens, temperature=0.0),
        ClawRequest(
            app=APP,
            meter=meter,
            cache=False,
            adapters=[AdapterChoice(name=a.name, scale=a.scale) for a in tier.adapters],
        ),
        None,
    )
    await begin(run)
    text = await run.answer()
    entropy = run.info().entropy
    features = entropy.features() if entropy else {}
    first_top: FirstTop = (entropy.first_top or []) if entropy else []
    return features, first_top, grade(text, example.ideal_text)


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
