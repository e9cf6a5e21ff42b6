"""Admin routes for the daemon's routing policies (`/admin/policies…`).

The daemon owns its policies: installed ones live in its config dir, shipped ones in the
package, and the parser that checks a file is the one that will route with it. So `clawctl
route` validates, installs, explains and calibrates here, never by reading or writing the
daemon's files itself. A policy installed here routes the next request (the store re-reads a
file whose modification time changed).
"""

from __future__ import annotations

import re

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from clawctl.api.admin.streaming import ndjson
from clawctl.errors import BadInput, ClawError
from clawctl.routing.policy import RouteInput, parse_policy, route
from clawctl.routing.policy_store import PolicyFile
from clawctl.schemas.policy import (
    POLICY_NAME,
    CalibrateRequest,
    ExplainRequest,
    Policy,
    PolicyDetail,
    PolicyEntry,
    PolicyListing,
    PolicyText,
    RouteExplanation,
)
from clawctl.services import Services
from clawctl.serving.calibration import calibrate

router = APIRouter(prefix="/admin")


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def found_policy(request: Request, name: str) -> PolicyFile:
    """The policy called `name`; a name that could not be a policy file's is refused before
    any path is built from it."""
    if not re.fullmatch(POLICY_NAME, name):
        raise BadInput(f"{name!r} is not a policy name (lowercase letters, digits, - and _)")
    return _services(request).policies.get(name)


def _detail(found: PolicyFile) -> PolicyDetail:
    return PolicyDetail(path=str(found.path), shipped=found.shipped, policy=found.policy)


@router.get("/policies")
async def list_policies(request: Request) -> PolicyListing:
    store = _services(request).policies
    entries = []
    for name in store.names():
        found = store.get(name)
        entries.append(
            PolicyEntry(
                name=name,
                tiers=[t.name for t in found.policy.tiers],
                shipped=found.shipped,
                path=str(found.path),
            )
        )
    return PolicyListing(policies=entries)


@router.post("/policies/validate")
async def validate_policy(body: PolicyText) -> PolicyDetail:
    """Check a policy's text as clawd would load it (errors name the line); installs nothing."""
    policy = parse_policy(body.text, body.source)
    return PolicyDetail(path=body.source, shipped=False, policy=policy)


@router.post("/policies")
async def install_policy(request: Request, body: PolicyText) -> PolicyDetail:
    """Check a policy and install it under its own name (atomically); it routes the next
    request."""
    services = _services(request)
    _check_quality(services, parse_policy(body.text, body.source))
    return _detail(services.policies.install(body.text, body.source))


def _check_quality(services: Services, policy: Policy) -> None:
    """Refuse a local tier whose model kept less of its source than the tier's floor (a model
    not installed yet, or never measured, is not refused: nothing is known against it)."""
    for tier in policy.tiers:
        if tier.kind != "local" or tier.min_quality is None:
            continue
        try:
            kept = services.store.get(tier.model).quality
        except ClawError:
            continue
        if kept is not None and kept.value < tier.min_quality:
            raise BadInput(
                f"tier {tier.name}: {tier.model} kept {kept.value:.0%} of its source's greedy "
                f"tokens, below the tier's min_quality {tier.min_quality:.0%}; use a larger "
                "quant type or lower the floor",
                param="min_quality",
            )


@router.get("/policies/{name}")
async def show_policy(request: Request, name: str) -> PolicyDetail:
    """The policy, and its local tiers' escalation as clawd runs it now."""
    found = found_policy(request, name)
    live = _services(request).adjuster.live(found.policy)
    return _detail(found).model_copy(update={"live": live})


@router.post("/policies/{name}/explain")
async def explain_route(request: Request, name: str, body: ExplainRequest) -> RouteExplanation:
    """Which rule and tiers a request with these declared options would get; runs nothing."""
    found = found_policy(request, name)
    decision = route(
        found.policy,
        RouteInput(
            prompt=body.prompt,
            impact=body.impact,
            json_mode=body.json_mode,
            max_tokens=body.max_tokens,
            app=body.app,
        ),
    )
    return RouteExplanation(
        policy=decision.policy,
        rule=decision.rule,
        tiers=[t.name for t in decision.tiers],
        escalate=decision.escalate,
        temperature=decision.temperature,
        max_temperature=decision.max_temperature,
    )


@router.post("/policies/{name}/calibrate")
async def calibrate_policy(
    request: Request, name: str, body: CalibrateRequest
) -> StreamingResponse:
    """NDJSON: the policy's local tiers answer the examples (progress per example), then a
    `CalibrationResult`; the chosen thresholds are written into the installed policy unless
    `dry_run`."""
    return ndjson(calibrate(_services(request), found_policy(request, name), body))
