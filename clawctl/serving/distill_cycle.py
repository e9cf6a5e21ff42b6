"""The off-peak worker's cycle, clawd's side: the policy's new escalations written into a run
for the worker to train on in its own idle-priority unit (`clawctl distill cycle`), or a skipped
cycle recorded when there are too few. Evaluation, promotion and the cycle's ledger row go
through the routes every client uses."""

from __future__ import annotations

import time

from clawctl.errors import BadInput
from clawctl.schemas.distill import DistillCycle, DistillPrepared, DistillPrepareRequest
from clawctl.services import Services
from clawctl.serving.distill import check_base, ledger_examples, training_job


def prepare_cycle(services: Services, request: DistillPrepareRequest) -> DistillPrepared:
    """Write the policy's escalations since its last trained cycle into a new run directory;
    with fewer than `min_examples`, record a skipped cycle instead."""
    found = services.policies.get(request.policy)
    local = [t for t in found.policy.tiers if t.kind == "local"]
    if request.base is None and not local:
        raise BadInput(f"policy {request.policy!r} has no local tier to train an adapter for")
    base = request.base or local[0].model
    now = time.time()
    trained = [c for c in services.ledger.cycles(request.policy) if c.outcome != "skipped"]
    since = trained[-1].ts if trained else None
    examples = ledger_examples(services, since, request.policy)
    if len(examples) < request.min_examples:
        cycle = DistillCycle(
            ts=now, policy=request.policy, adapter=None, examples=len(examples),
            outcome="skipped",
            detail=f"{len(examples)} new escalations, fewer than {request.min_examples}",
        )  # fmt: skip
        services.ledger.record_cycle(cycle)
        return DistillPrepared(job=None, examples=len(examples), prepared_at=now, cycle=cycle)
    check_base(services, base)
    name = f"{request.policy}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now))}"
    job = training_job(services, base, name, examples, request.options, False)
    return DistillPrepared(job=job, examples=len(examples), prepared_at=now)
