"""Admin routes for distillation (`/admin/distill/…`): train an adapter from the ledger's
escalations or from examples sent, evaluate it under a policy, promote it into the policy's
local tier or roll that back. Training and evaluation stream `JobLine`s (NDJSON); the export of
raw examples stays with the ledger's routes."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from clawctl.api.admin.policies import found_policy
from clawctl.api.admin.streaming import ndjson
from clawctl.schemas.distill import (
    DistillContextRequest,
    DistillCycle,
    DistillCycleListing,
    DistillEvaluateRequest,
    DistillPrepared,
    DistillPrepareRequest,
    DistillPromoteRequest,
    DistillPromotion,
    DistillRollbackRequest,
    DistillTrainRequest,
    GateSettings,
)
from clawctl.services import Services
from clawctl.serving import distill, distill_context, distill_cycle

router = APIRouter(prefix="/admin")


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


@router.post("/distill/train")
async def train(request: Request, body: DistillTrainRequest) -> StreamingResponse:
    """Checked before the stream starts: a bad request is a 4xx with nothing written."""
    services = _services(request)
    job = distill.prepare_training(services, body)
    return ndjson(distill.run_training(job))


@router.post("/distill/context")
async def context(request: Request, body: DistillContextRequest) -> StreamingResponse:
    """A document into an adapter: questions written and answered by the teacher with the
    document, training without it, then the held-out questions three ways."""
    distill_context.check_context(_services(request), body)
    return ndjson(distill_context.context(_services(request), body))


@router.post("/distill/evaluate")
async def evaluate(request: Request, body: DistillEvaluateRequest) -> StreamingResponse:
    found = found_policy(request, body.policy)
    services = _services(request)
    distill.trained(services, body.name)  # a missing run is a 4xx, not a stream's error line
    return ndjson(distill.evaluate(services, found, body, body.gate or GateSettings()))


@router.post("/distill/prepare")
async def prepare(request: Request, body: DistillPrepareRequest) -> DistillPrepared:
    """The off-peak worker's first step: the examples written, the job to train (or a skip)."""
    return distill_cycle.prepare_cycle(_services(request), body)


@router.post("/distill/cycles")
async def record_cycle(request: Request, body: DistillCycle) -> DistillCycle:
    """The worker's last step: what the cycle did, as a ledger row."""
    _services(request).ledger.record_cycle(body)
    return body


@router.get("/distill/cycles")
async def cycles(request: Request, policy: str | None = None) -> DistillCycleListing:
    return DistillCycleListing(cycles=_services(request).ledger.cycles(policy))


@router.post("/distill/promote")
async def promote(request: Request, body: DistillPromoteRequest) -> DistillPromotion:
    return distill.promote(_services(request), found_policy(request, body.policy), body)


@router.post("/distill/rollback")
async def rollback(request: Request, body: DistillRollbackRequest) -> DistillPromotion:
    return distill.rollback(_services(request), found_policy(request, body.policy), body)
