"""Admin routes for the daemon's ledger and its distillation data (`/admin/ledger…`,
`/admin/distill…`).

clawd holds the ledger's one connection on its event loop; these queries are indexed by time and
answer in milliseconds for a box's ledger, so they run there rather than in a thread that would
need a second connection. Exports are sent as whole bodies in the requested format.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response

from clawctl.errors import BadInput
from clawctl.fleet.ledger_shipper import fleet_summary
from clawctl.schemas.ledger import AuditListing, ExportFormat, GroupBy, LedgerSummary
from clawctl.services import Services

router = APIRouter(prefix="/admin")


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


@router.get("/ledger/summary")
async def ledger_summary(
    request: Request, by: GroupBy = "app", since: float | None = None, fleet: bool = False
) -> LedgerSummary:
    """Totals per `by` and per day for rows at or after `since` (a Unix time); with `fleet`,
    every box's rows from the fleet ledger (Postgres, queried in a worker thread)."""
    services = _services(request)
    if fleet:
        dsn = services.config.fleet_ledger_dsn
        if dsn is None:
            raise BadInput(
                "there is no fleet ledger: set [fleet] ledger_dsn_file in clawd.toml "
                "(docs/fleet.md)",
                param="fleet",
            )
        rows, days = await asyncio.gather(
            asyncio.to_thread(fleet_summary, dsn, by, since),
            asyncio.to_thread(fleet_summary, dsn, "day", since),
        )
        return LedgerSummary(by=by, since=since, rows=rows, days=days, fleet=True)
    if by == "box":
        raise BadInput("group by box with --fleet: this box's ledger holds one box", param="by")
    ledger = services.ledger
    return LedgerSummary(
        by=by, since=since, rows=ledger.summary(by, since), days=ledger.summary("day", since)
    )


@router.get("/ledger/audits")
async def ledger_audits(request: Request, policy: str, since: float | None = None) -> AuditListing:
    """A policy's audit pairs: local answers, the next tier's, and whether they agreed."""
    return AuditListing(audits=_services(request).ledger.audits(policy, since))


@router.get("/ledger/export")
async def ledger_export(
    request: Request, format: ExportFormat = "csv", since: float | None = None
) -> Response:
    media = "text/csv" if format == "csv" else "application/json"
    return Response(_services(request).ledger.export(format, since), media_type=media)


@router.get("/distill/export")
async def distill_export(
    request: Request, since: float | None = None, policy: str | None = None
) -> Response:
    """Escalated requests with the answers that replaced the local one, as chat JSONL."""
    examples = _services(request).ledger.examples(since, policy)
    body = "".join(example.chat_line() + "\n" for example in examples)
    return Response(body, media_type="application/x-ndjson")
