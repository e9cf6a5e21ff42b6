"""`clawctl snapshot`: frozen llama.cpp states (named, sessions, prefix pool)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from clawctl.cli._client import daemon_client
from clawctl.cli._console import RichProgress, emit_json, err, human_bytes, out, table
from clawctl.cli._options import JsonOption, ModelOption, parse_duration, parse_size
from clawctl.errors import BadInput

if TYPE_CHECKING:
    from clawctl.store.snapshots import SnapshotStore

app = typer.Typer(
    help="Frozen model state: save, list, show, load, rm, prune, verify, export, import.",
    no_args_is_help=True,
)


def _store() -> SnapshotStore:
    from clawctl.config import load_paths
    from clawctl.store.snapshots import SnapshotStore

    return SnapshotStore(load_paths(), budget_bytes=0)


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
    info = _store().info(*_store().find(name, "named"))
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
    entries = _store().entries()
    if json_:
        emit_json(entries)
        return
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
    from clawctl.store.snapshot_format import read_header

    kind, path = _store().find(name)
    header = read_header(path)
    if json_:
        emit_json(
            header.model_copy(update={"tokens": []}).model_dump(mode="json")
            | {"kind": kind, "path": str(path), "n_tokens": len(header.tokens)}
        )
        return
    identity = header.identity
    grid = table("FIELD", "VALUE")
    rows = {
        "kind": kind,
        "name": header.name,
        "path": str(path),
        "tokens": str(len(header.tokens)),
        "raw size": human_bytes(header.raw_size),
        "on disk": human_bytes(path.stat().st_size),
        "filter": header.filter,
        "chunks": str(len(header.chunks)),
        "model": identity.model_sha256,
        "state format": identity.state_format,
        "n_ctx": str(identity.n_ctx),
        "KV": f"{identity.type_k}/{identity.type_v}",
        "flash attention": str(identity.flash_attn),
        "adapters": ", ".join(f"{a.sha256[:12]}@{a.scale}" for a in identity.adapters) or "-",
        "created": header.created_at.isoformat(timespec="seconds"),
    }
    for key, value in rows.items():
        grid.add_row(key, value)
    out.print(grid)


@app.command()
def rm(name: str) -> None:
    """Remove a snapshot (named, session or pool entry).

    Example: clawctl snapshot rm manual
    """
    path = _store().remove(name)
    err.print(f"removed {path.name}")


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
    kinds = ("named", "session", "pool") if named else ("session", "pool")
    removed = _store().prune(
        parse_size(max_bytes) if max_bytes else None,
        parse_duration(older_than) if older_than else None,
        kinds,  # type: ignore[arg-type]
    )
    if json_:
        emit_json({"removed": [str(p) for p in removed]})
        return
    err.print(f"removed {len(removed)} snapshot(s)")


@app.command()
def verify(json_: JsonOption = False) -> None:
    """Check every snapshot's header, payload and checksums.

    Example: clawctl snapshot verify
    """
    from clawctl.errors import IntegrityError

    reports = _store().verify()
    if json_:
        emit_json(reports)
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
    """Copy a verified snapshot to a file.

    Example: clawctl snapshot export manual /media/usb/manual.snap
    """
    with RichProgress() as progress:
        path = _store().export(name, dest, progress)
    err.print(f"exported {name} to {path}")


@app.command("import")
def import_(
    source: Path,
    name: Annotated[str | None, typer.Option(help="Name in the store.")] = None,
    json_: JsonOption = False,
) -> None:
    """Verify a snapshot file and add it as a named snapshot.

    Example: clawctl snapshot import /media/usb/manual.snap --name manual
    """
    with RichProgress() as progress:
        info = _store().import_(source, name, progress)
    if json_:
        emit_json(info)
        return
    err.print(f"imported {info.name} ({info.tokens} tokens)")
