"""Audits: a request a local tier answered, answered again by the next tier after the response
(`[audit]` in its policy), so calibration gets labels from live traffic instead of a file the
user must write (`clawctl route calibrate --from-ledger`).

The second answer runs as a background task: the caller already has its response, and the task
is cancelled if clawd stops. The next tier answers greedily with the same prompt (a remote tier
through its pool, a local one as a request of its own, which the ledger records under the app
`clawd-audit`). Agreement is graded as calibration grades an answer against a label: the same
last number, the same yes/no, or the stronger answer contained in the local one, so audits fit
tasks with short answers (classification, extraction, arithmetic); long free text rarely agrees
word for word and would read as disagreement.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from clawctl.engines.base import Prompt
from clawctl.routing.calibrate import grade
from clawctl.schemas.ledger import AuditPair
from clawctl.schemas.policy import Policy, Tier
from clawctl.services import Services
from clawctl.serving.tier_call import ask_local, ask_remote

log = logging.getLogger("clawd.audit")
APP = "clawd-audit"


@dataclass(frozen=True)
class AuditJob:
    request_id: str
    policy: Policy
    tier: Tier
    next_tier: Tier
    prompt: Prompt
    max_tokens: int | None
    answer: str
    features: dict[str, float | None]


def agree(answer: str, stronger: str) -> bool:
    """Whether a local answer says what the stronger tier's does (see the module docstring)."""
    if not stronger.strip():
        return False
    said, asked = answer.strip(), stronger.strip()
    return grade(said, asked) or said.casefold() == asked.casefold()


def start(services: Services, job: AuditJob) -> bool:
    """Audit `job` in the background if its policy's share and budget allow; True if started."""
    if not services.audits.take(job.policy.name, job.policy.audit):
        return False
    task = asyncio.get_running_loop().create_task(_run(services, job))
    services.background.add(task)
    task.add_done_callback(services.background.discard)
    return True


async def _run(services: Services, job: AuditJob) -> None:
    tier = job.next_tier
    try:
        if tier.kind == "remote":
            request_id = f"{job.request_id}-audit"
            answer = await ask_remote(services, tier, job.prompt, job.max_tokens, request_id)
        else:
            answer = await ask_local(services, tier, job.prompt, job.max_tokens, APP)
    except Exception as exc:  # an audit that fails is skipped, never retried
        log.warning("audit of %s on %s failed: %s", job.request_id, tier.name, exc)
        return
    pair = AuditPair(
        request_id=job.request_id, ts=time.time(), policy=job.policy.name, tier=job.tier.name,
        next_tier=tier.name, features=job.features, answer=job.answer,
        next_answer=answer.text, agree=agree(job.answer, answer.text), cost=answer.cost,
    )  # fmt: skip
    services.ledger.record_audit(pair)
    services.adjuster.observe_audit(job.policy, job.tier, pair.agree)
