"""`clawctl ledger`: what each app spent and what caching saved (asks clawd, which owns it)."""

from __future__ import annotations

import sys
import time
from typing import Annotated, Literal

import typer

from clawctl.cli._client import daemon_client
from clawctl.cli._console import emit_json, out, table
from clawctl.cli._options import JsonOption, parse_duration

app = typer.Typer(
    help="The token ledger: spend and savings per app, tier, model or day.", no_args_is_help=True
)
Since = Annotated[str | None, typer.Option(help="Only the last span, e.g. 1d, 12h, 30m.")]
BAR = 40


def _since(span: str | None) -> float | None:
    if span is None:
        return None
    return time.time() - parse_duration(span)


@app.command()
def summary(
    since: Since = None,
    by: Annotated[
        Literal["app", "tier", "model", "day", "box"],
        typer.Option(help="Group by (box: with --fleet)."),
    ] = "app",
    fleet: Annotated[
        bool, typer.Option("--fleet", help="Every box's rows, from the fleet ledger.")
    ] = False,
    json_: JsonOption = False,
) -> None:
    """Totals per app (or tier, model, day, box), with a chart of tokens and savings per day.

    Example: clawctl ledger summary --since 7d --by app
    Example: clawctl ledger summary --fleet --by box
    """
    with daemon_client() as client:
        report = client.ledger_summary(by, _since(since), fleet)
    rows = report.rows
    if json_:
        emit_json(rows)
        return
    grid = table(
        by.upper(),
        "REQUESTS",
        "PROMPT",
        "COMPLETION",
        "PREFILL SAVED",
        "CACHED",
        "CACHE SAVED",
        "REMOTE COST",
        "SAVED COST",
    )
    for r in rows:
        grid.add_row(
            r.key,
            str(r.requests),
            str(r.prompt_tokens),
            str(r.completion_tokens),
            str(r.prefill_tokens_saved),
            str(r.cached),
            str(r.tokens_saved),
            f"{r.remote_cost:.4f}",
            f"{r.saved_cost:.4f}",
        )
    out.print(grid if rows else "no requests in that span")
    days = report.days
    if days:
        top = max(
            max(d.prompt_tokens + d.completion_tokens, d.prefill_tokens_saved + d.tokens_saved)
            for d in days
        )
        out.print("\ntokens computed (#) and avoided by snapshots and the cache (=) per day")
        for d in days:
            used = round(BAR * (d.prompt_tokens + d.completion_tokens) / max(top, 1))
            avoided = d.prefill_tokens_saved + d.tokens_saved
            saved = round(BAR * avoided / max(top, 1))
            out.print(
                f"{d.key}  {'#' * used:<{BAR}} {d.prompt_tokens + d.completion_tokens}",
                markup=False,
            )
            out.print(f"{'':10}  {'=' * saved:<{BAR}} {avoided}", markup=False)


@app.command()
def export(
    format_: Annotated[Literal["csv", "json"], typer.Option("--format", help="Output format.")],
    since: Since = None,
) -> None:
    """Every ledger row, as CSV or JSON on stdout.

    Example: clawctl ledger export --format csv --since 1d > today.csv
    """
    with daemon_client() as client:
        for chunk in client.ledger_export(format_, _since(since)):
            sys.stdout.buffer.write(chunk)
    sys.stdout.flush()


@app.command()
def audits(
    policy: Annotated[str, typer.Option(help="The routing policy whose audits to show.")],
    since: Since = None,
    json_: JsonOption = False,
) -> None:
    """Audited requests: what the local tier answered, what the next tier answered, and whether
    they agreed (the labels `clawctl route calibrate --from-ledger` fits on).

    Example: clawctl ledger audits --policy cascade --since 7d
    """
    with daemon_client() as client:
        listing = client.ledger_audits(policy, _since(since))
    if json_:
        emit_json(listing.audits)
        return
    if not listing.audits:
        out.print(f"no audited requests of {policy} (give the policy an [audit] share)")
        return
    grid = table("WHEN", "TIER", "NEXT", "AGREE", "ANSWER", "NEXT ANSWER")
    for pair in listing.audits:
        grid.add_row(
            time.strftime("%Y-%m-%d %H:%M", time.localtime(pair.ts)),
            pair.tier,
            pair.next_tier,
            "yes" if pair.agree else "no",
            pair.answer[:40],
            pair.next_answer[:40],
        )
    agreed = sum(pair.agree for pair in listing.audits)
    out.print(grid)
    out.print(f"{agreed} of {len(listing.audits)} agreed ({agreed / len(listing.audits):.0%})")
