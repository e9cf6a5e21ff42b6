"""`clawctl fleet`: this box's link to the fleet's object storage (status, push, pull).

clawd does the talking: it holds the credentials and the snapshots, the CLI only asks it.
"""

from __future__ import annotations

from typing import Annotated

import typer

from clawctl.cli._client import daemon_client
from clawctl.cli._console import emit_json, err, human_bytes, out, table
from clawctl.cli._options import JsonOption
from clawctl.schemas.fleet import FleetPullRequest, FleetPushRequest

app = typer.Typer(
    help="Share frozen state with other boxes through S3 storage: status, push, pull.",
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
    if not result.enabled:
        out.print("the fleet is off (set [fleet] endpoint in clawd.toml; see docs/fleet.md)")
        return
    grid = table("SETTING", "VALUE")
    reach = "yes" if result.reachable else f"no: {result.problem}"
    bandwidth = f"{result.bandwidth_mb_s} MB/s" if result.bandwidth_mb_s else "not measured yet"
    rows = [
        ("store", f"{result.endpoint} bucket {result.bucket}, prefix {result.prefix}/"),
        ("this box", result.box),
        ("reachable", reach),
        ("uploads waiting", str(result.queued)),
        ("uploaded", f"{result.uploaded} (+{result.already_there} another box had sent)"),
        ("upload errors", f"{result.upload_errors} {result.last_upload_error or ''}".strip()),
        ("fetched", f"{result.fetched} ({human_bytes(result.fetched_bytes)})"),
        ("refused on fetch", str(result.fetch_refused)),
        ("fetch bandwidth", bandwidth),
        ("named snapshots", ", ".join(result.named) or "-"),
    ]
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
