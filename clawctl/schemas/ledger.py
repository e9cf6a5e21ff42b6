"""The ledger as clawd's admin API reports it: spend and savings grouped by app, tier, model or day.

`SummaryRow` is both what the ledger's query returns and what `clawctl ledger summary` renders:
one type across the boundary.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

GroupBy = Literal["app", "tier", "model", "day", "box"]  # "box": the fleet ledger only
ExportFormat = Literal["csv", "json"]


class SummaryRow(BaseModel):
    model_config = ConfigDict(frozen=True)

    key: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    prefill_tokens_saved: int
    remote_cost: float
    all_remote_cost: float
    cached: int = 0
    tokens_saved: int = 0
    cost_saved: float = 0.0

    @property
    def saved_cost(self) -> float:
        """Saved against all-remote: by local answers, escalation and the answer cache."""
        return self.all_remote_cost - self.remote_cost


class LedgerSummary(BaseModel):
    """Totals grouped by `by`, and per day (the CLI's chart) over the same span."""

    by: GroupBy
    since: float | None
    rows: list[SummaryRow]
    days: list[SummaryRow]
    fleet: bool = False  # every box's rows (the fleet ledger), not this box's


class AuditPair(BaseModel):
    """A request a local tier answered, answered again by the next tier in the background
    (`[audit]` in the policy): the label is whether they agree."""

    model_config = ConfigDict(frozen=True)

    request_id: str
    ts: float
    policy: str
    tier: str
    next_tier: str
    features: dict[str, float | None]  # the local answer's meter summaries
    answer: str
    next_answer: str
    agree: bool
    cost: float  # what the audit's answer cost at the next tier's prices


class AuditListing(BaseModel):
    audits: list[AuditPair]
