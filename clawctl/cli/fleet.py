"""`clawctl fleet`: this box's link to the fleet's object storage (status, push, pull).

clawd does the talking: it holds the credentials and the snapshots, the CLI only asks it.
"""

from __future__ import annotations

from typing import Annotated

import typer

from clawctl.cli._client import daemon_client
from clawctl.cli._console import emit_json, err, human_bytes, out, table
from clawctl.cli._options import JsonOption, parse_duration
from clawctl.schemas.fleet import FleetGcRequest, FleetPullRequest, FleetPushRequest

app = typer.Typer(
    help="Share frozen state with other boxes through S3 storage: status, push, pull, sync, gc.",
    no_args_is_help=True,
)


@app.command()
def status(json_: JsonOption = False) -> None:
    """Where the fleet store is, whether it answers, and what this box sent and fetched.

    Example: clawctl fleet status --json
    """
    with daemon_client() as client:
        result = client.fleet_status()
    if json_:
        emit_json(result)
        return
    rows: list[tuple[str, str]] = []
    if result.enabled:
        reach = "yes" if result.reachable else f"no: {result.problem}"
        measured = f"{result.bandwidth_mb_s} MB/s" if result.bandwidth_mb_s else "not measured yet"
        rows += [
            ("store", f"{result.endpoint} bucket {result.bucket}, prefix {result.prefix}/"),
            ("this box", result.box),
            ("reachable", reach),
            ("uploads waiting", str(result.queued)),
            ("uploaded", f"{result.uploaded} (+{result.already_there} another box had sent)"),
            ("upload errors", f"{result.upload_errors} {result.last_upload_error or ''}".strip()),
            ("fetched", f"{result.fetched} ({human_bytes(result.fetched_bytes)})"),
            ("refused on fetch", str(result.fetch_refused)),
            ("fetch bandwidth", measured),
            ("named snapshots", ", ".join(result.named) or "-"),
        ]
    if result.ledger:
        held = "nothing yet" if result.ledger_position is None else f"row {result.ledger_position}"
        rows += [
            ("ledger rows shipped", f"{result.ledger_shipped} (Postgres holds up to {held})"),
            ("ledger error", result.ledger_error or "-"),
        ]
    if not rows:
        out.print("the fleet is off (set [fleet] endpoint in clawd.toml; see docs/fleet.md)")
        return
    grid = table("SETTING", "VALUE")
    for name, value in rows:
        grid.add_row(name, value)
    out.print(grid)


@app.command()
def push(
    name: Annotated[str | None, typer.Argument(help="A named snapshot; none: all of them.")] = None,
    json_: JsonOption = False,
) -> None:
    """Queue snapshots for upload (clawd uploads in the background; see `fleet status`).

    Example: clawctl fleet push manual
    """
    with daemon_client() as client:
        result = client.fleet_push(FleetPushRequest(name=name))
    if json_:
        emit_json(result)
        return
    err.print(f"queued {result.queued} snapshot(s) for the fleet")


@app.command()
def pull(
    name: str,
    as_name: Annotated[str | None, typer.Option("--as", help="Store it under this name.")] = None,
    json_: JsonOption = False,
) -> None:
    """Fetch a named snapshot another box pushed into this box's store (verified whole).

    Example: clawctl fleet pull manual
    """
    with daemon_client() as client:
        info = client.fleet_pull(FleetPullRequest(name=name, as_name=as_name))
    if json_:
        emit_json(info)
        return
    err.print(f"pulled {info.name}: {info.tokens} tokens, {human_bytes(info.stored_size)}")


@app.command()
def sync(json_: JsonOption = False) -> None:
    """Both ways: queue this box's snapshots for upload and pull the named ones it lacks.

    Example: clawctl fleet sync
    """
    with daemon_client() as client:
        result = client.fleet_sync()
    if json_:
        emit_json(result)
        return
    pulled = ", ".join(result.pulled) or "none"
    err.print(f"queued {result.queued} snapshot(s) for upload; pulled {pulled}")


@app.command()
def gc(
    older_than: Annotated[
        str, typer.Option("--older-than", help="Unused for this long (e.g. 30d, 12h).")
    ] = "30d",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only count what would go.")] = False,
    json_: JsonOption = False,
) -> None:
    """Remove fleet objects no box has uploaded or fetched within a retention window (named
    snapshots are kept), with the pointers that name them.

    Example: clawctl fleet gc --older-than 30d --dry-run
    """
    request = FleetGcRequest(older_than_seconds=parse_duration(older_than), dry_run=dry_run)
    with daemon_client() as client:
        result = client.fleet_gc(request)
    if json_:
        emit_json(result)
        return
    verb = "would remove" if result.dry_run else "removed"
    err.print(
        f"{verb} {result.objects} object(s), {human_bytes(result.bytes)}, and "
        f"{result.pointers} pointer(s); kept {result.kept}"
    )
