"""`clawctl snapshot`: frozen llama.cpp states (named, sessions, prefix pool) in clawd's store.

Every command is a call to the daemon; export and import move the file's bytes over the socket
(the daemon verifies both ways), so the CLI never opens the daemon's snapshot directory.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from clawctl.cli._client import daemon_client
from clawctl.cli._console import RichProgress, emit_json, err, human_bytes, out, table
from clawctl.cli._options import JsonOption, ModelOption, parse_duration, parse_size
from clawctl.errors import BadInput, IntegrityError
from clawctl.schemas.snapshots import PruneRequest

app = typer.Typer(
    help="Frozen model state: save, list, show, load, rm, prune, verify, export, import.",
    no_args_is_help=True,
)


def _read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    if prompt_file is not None:
        if not prompt_file.is_file():
            raise BadInput(f"no such file: {prompt_file}")
        return prompt_file.read_text(encoding="utf-8")
    if prompt is None:
        raise BadInput("give the prompt with --prompt-file FILE or --prompt TEXT")
    return prompt


PromptFile = Annotated[Path | None, typer.Option("--prompt-file", "-f", help="Prompt text file.")]
PromptText = Annotated[str | None, typer.Option("--prompt", "-p", help="Prompt text.")]


@app.command()
def save(
    name: str,
    model: ModelOption = None,
    prompt_file: PromptFile = None,
    prompt: PromptText = None,
    json_: JsonOption = False,
) -> None:
    """Prefill a prompt once in clawd and freeze the state under NAME.

    Example: clawctl snapshot save manual --model smollm2-135m --prompt-file manual.txt
    """
    text = _read_prompt(prompt, prompt_file)
    body = {"prompt": text, "max_tokens": 1, "claw": {"snapshot": {"save": name}}}
    if model:
        body["model"] = model
    with daemon_client() as client:
        result = client.complete(body)
        listing = client.list_snapshots()
    # the same shape as `snapshot import` and a `snapshot list` entry
    info = next(e for e in listing.snapshots if e.kind == "named" and e.name == name)
    if json_:
        emit_json(info)
        return
    err.print(
        f"saved {name}: {info.tokens} tokens, {human_bytes(info.stored_size)} on disk "
        f"({info.stored_size / info.raw_size:.2f} of the raw state), "
        f"prefill took {result.claw.timings.prompt_ms if result.claw else 0:.0f} ms"
    )


@app.command()
def load(
    name: str,
    model: ModelOption = None,
    prompt_file: PromptFile = None,
    prompt: PromptText = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate.")] = 128,
    json_: JsonOption = False,
) -> None:
    """Hydrate NAME in clawd and continue the prompt (which starts with the frozen text).

    Example: clawctl snapshot load manual --prompt-file manual-plus-question.txt
    """
    text = _read_prompt(prompt, prompt_file)
    body = {
        "prompt": text,
        "max_tokens": max_tokens,
        "temperature": 0,
        "claw": {"snapshot": {"load": name}},
    }
    if model:
        body["model"] = model
    with daemon_client() as client:
        result = client.complete(body)
    if json_:
        emit_json(result)
        return
    out.print(result.choices[0].text, markup=False)
    if result.claw:
        err.print(
            f"[dim]hydrated {result.claw.prefill_tokens_saved} tokens; first token after "
            f"{result.claw.timings.prompt_ms:.0f} ms[/dim]"
        )


@app.command("list")
def list_(json_: JsonOption = False) -> None:
    """List named snapshots, sessions and prefix-pool entries.

    Example: clawctl snapshot list --json
    """
    with daemon_client() as client:
        listing = client.list_snapshots()
    if json_:
        emit_json(listing.snapshots)
        return
    entries = listing.snapshots
    grid = table("KIND", "NAME", "TOKENS", "ON DISK", "RATIO", "KV", "MODEL", "LAST USED")
    for e in entries:
        grid.add_row(
            e.kind,
            e.name[:24],
            str(e.tokens),
            human_bytes(e.stored_size),
            f"{e.stored_size / max(e.raw_size, 1):.2f}",
            e.kv_type,
            e.model_sha256[:12],
            time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used)),
        )
    out.print(grid if entries else "no snapshots")


@app.command()
def show(name: str, json_: JsonOption = False) -> None:
    """Show one snapshot's header (identity, size, chunks).

    Example: clawctl snapshot show manual
    """
    with daemon_client() as client:
        detail = client.show_snapshot(name)
    if json_:
        emit_json(detail)
        return
    identity = detail.identity
    grid = table("FIELD", "VALUE")
    rows = {
        "kind": detail.kind,
        "name": detail.name,
        "tokens": str(detail.n_tokens),
        "raw size": human_bytes(detail.raw_size),
        "on disk": human_bytes(detail.stored_size),
        "filter": detail.filter,
        "chunks": str(len(detail.chunks)),
        "model": identity.model_sha256,
        "state format": identity.state_format,
        "n_ctx": str(identity.n_ctx),
        "KV": f"{identity.type_k}/{identity.type_v}",
        "flash attention": str(identity.flash_attn),
        "adapters": ", ".join(f"{a.sha256[:12]}@{a.scale}" for a in identity.adapters) or "-",
        "created": detail.created_at.isoformat(timespec="seconds"),
    }
    for key, value in rows.items():
        grid.add_row(key, value)
    out.print(grid)


@app.command()
def rm(name: str) -> None:
    """Remove a snapshot (named, session or pool entry).

    Example: clawctl snapshot rm manual
    """
    with daemon_client() as client:
        removed = client.remove_snapshot(name)
    err.print(f"removed {removed.name} ({removed.kind})")


@app.command()
def prune(
    max_bytes: Annotated[str | None, typer.Option(help="Keep at most this much, e.g. 2GB.")] = None,
    older_than: Annotated[str | None, typer.Option(help="Drop unused for, e.g. 7d.")] = None,
    named: Annotated[bool, typer.Option(help="Include named snapshots.")] = False,
    json_: JsonOption = False,
) -> None:
    """Remove least recently used session and pool snapshots.

    Example: clawctl snapshot prune --max-bytes 1GB --older-than 7d
    """
    if max_bytes is None and older_than is None:
        raise BadInput("give --max-bytes and/or --older-than")
    request = PruneRequest(
        max_bytes=parse_size(max_bytes) if max_bytes else None,
        older_than_seconds=parse_duration(older_than) if older_than else None,
        named=named,
    )
    with daemon_client() as client:
        result = client.prune_snapshots(request)
    if json_:
        emit_json(result)
        return
    err.print(f"removed {len(result.removed)} snapshot(s)")


@app.command()
def verify(json_: JsonOption = False) -> None:
    """Check every snapshot's header, payload and checksums.

    Example: clawctl snapshot verify
    """
    with daemon_client() as client:
        report = client.verify_snapshots()
    reports = report.reports
    if json_:
        emit_json(report.reports)
    else:
        grid = table("KIND", "NAME", "STATUS")
        for r in reports:
            grid.add_row(r.kind, r.name[:32], "ok" if r.ok else f"[red]{r.problem}[/red]")
        out.print(grid if reports else "no snapshots")
    bad = [r.name for r in reports if not r.ok]
    if bad:
        raise IntegrityError(f"damaged snapshots: {', '.join(bad)}; rm them")


@app.command()
def export(name: str, dest: Path) -> None:
    """Copy a verified snapshot from clawd to a file.

    Example: clawctl snapshot export manual /media/usb/manual.snap
    """
    with daemon_client() as client, RichProgress() as progress:
        client.export_snapshot(name, dest, progress)
    err.print(f"exported {name} to {dest}")


@app.command("import")
def import_(
    source: Path,
    name: Annotated[str | None, typer.Option(help="Name in the store.")] = None,
    json_: JsonOption = False,
) -> None:
    """Send a snapshot file to clawd, which verifies it and adds it as a named snapshot.

    Example: clawctl snapshot import /media/usb/manual.snap --name manual
    """
    if not source.is_file():
        raise BadInput(f"no such file: {source}")
    with daemon_client() as client, RichProgress() as progress:
        info = client.import_snapshot(source, name, progress)
    if json_:
        emit_json(info)
        return
    err.print(f"imported {info.name} ({info.tokens} tokens)")
