"""The tiers one request ran on, and what they add up to: tokens, costs, the escalation story.

`GenerationRun` appends a `TierRun` for every tier it starts; responses (`claw`), the ledger and
the metrics all read these totals, so they always agree with each other.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from clawctl.schemas.openai import Usage
from clawctl.schemas.policy import Policy, Tier
from clawctl.schemas.signals import Signals


@dataclass
class TierRun:
    """What one tier did for this request."""

    tier: Tier
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    signals: Signals | None = None
    escalated: str | None = None  # why it handed over (or, with "kept", why it could not)
    failed: str | None = None  # a remote tier's failure
    started: float = field(default_factory=time.perf_counter)

    @property
    def cost(self) -> float:
        return self.tier.cost(self.prompt_tokens, self.completion_tokens)

    @property
    def handed_over(self) -> bool:
        return self.escalated is not None and "kept" not in self.escalated


@dataclass
class TierPath:
    policy: Policy | None
    runs: list[TierRun] = field(default_factory=list)

    @property
    def last(self) -> TierRun:
        return self.runs[-1]

    @property
    def escalated(self) -> bool:
        return any(run.handed_over for run in self.runs)

    @property
    def reason(self) -> str | None:
        reasons = [
            f"{run.tier.name}: {run.escalated or run.failed}"
            for run in self.runs
            if run.escalated or run.failed
        ]
        return "; ".join(reasons) or None

    @property
    def names(self) -> list[str]:
        return [run.tier.name for run in self.runs]

    @property
    def text(self) -> str:
        return ">".join(self.names) or "-"

    @property
    def signals(self) -> Signals | None:
        """The meter's view of the last local tier that ran."""
        return next((run.signals for run in reversed(self.runs) if run.signals), None)

    def local_prompt_tokens(self) -> int:
        return next((r.prompt_tokens for r in self.runs if r.tier.kind == "local"), 0)

    @property
    def cost(self) -> float:
        return sum(run.cost for run in self.runs)

    @property
    def all_remote_cost(self) -> float:
        """What the answer would have cost on the policy's remote tier alone."""
        remote = self.policy.remote if self.policy else None
        if remote is None or not self.runs:
            return 0.0
        answered = self.last
        prompt = self.local_prompt_tokens() or answered.prompt_tokens
        return remote.cost(prompt, answered.completion_tokens)

    def usage_by_tier(self) -> dict[str, Usage]:
        totals: dict[str, tuple[int, int]] = {}
        for run in self.runs:
            p, c = totals.get(run.tier.name, (0, 0))
            totals[run.tier.name] = (p + run.prompt_tokens, c + run.completion_tokens)
        return {
            name: Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)
            for name, (p, c) in totals.items()
        }

    def usage(self) -> Usage:
        """Tokens of every tier the request ran on (what it consumed, not just the answer)."""
        p = sum(run.prompt_tokens for run in self.runs)
        c = sum(run.completion_tokens for run in self.runs)
        return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)
