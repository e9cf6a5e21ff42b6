"""`clawctl adapters`: LoRA adapters per base model (install, list, show, rm, verify), in clawd's
store: every command is one call to the daemon, which verifies and installs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clawctl.cli._client import daemon_client
from clawctl.cli._console import RichProgress, emit_json, err, human_bytes, out, table
from clawctl.cli._options import JsonOption
from clawctl.errors import BadInput, IntegrityError
from clawctl.schemas.adapters import AdapterInstallRequest

app = typer.Typer(help="LoRA adapters (GGUF) per base model.", no_args_is_help=True)
Base = Annotated[str, typer.Option("--base", "-b", help="Base model name.")]


@app.command()
def install(
    ref: Annotated[str, typer.Argument(help="A LoRA GGUF file or http(s) URL.")],
    base: Base,
    name: Annotated[str | None, typer.Option(help="Name (default: from the file).")] = None,
    sha256: Annotated[str | None, typer.Option(help="Expected sha256 (pinning).")] = None,
    json_: JsonOption = False,
) -> None:
    """Verify a LoRA adapter against its base model and install it (no daemon restart needed).

    A local file is uploaded to clawd; a URL is fetched by clawd.

    Example: clawctl adapters install ./sql-lora.gguf --base smollm2-135m --name sql
    """
    if not ref.startswith(("http://", "https://")) and not Path(ref).expanduser().is_file():
        raise BadInput(f"no such file: {ref}")
    with daemon_client() as client, RichProgress() as progress:
        if ref.startswith(("http://", "https://")):
            request = AdapterInstallRequest(url=ref, base=base, name=name, sha256=sha256)
            manifest = client.install_adapter(request, progress)
        else:
            manifest = client.upload_adapter(
                Path(ref).expanduser(), base=base, name=name, sha256=sha256, progress=progress
            )
    if json_:
        emit_json(manifest)
        return
    err.print(
        f"installed {manifest.name} for {manifest.base}: rank {manifest.rank}, alpha "
        f"{manifest.alpha:g}, {len(manifest.targets)} tensors, {human_bytes(manifest.size)}"
    )


@app.command("list")
def list_(
    base: Annotated[str | None, typer.Option("--base", "-b", help="Only this base.")] = None,
    json_: JsonOption = False,
) -> None:
    """List installed adapters.

    Example: clawctl adapters list --base smollm2-135m
    """
    with daemon_client() as client:
        listing = client.list_adapters(base)
    if json_:
        emit_json(listing.adapters)
        return
    grid = table("BASE", "NAME", "RANK", "ALPHA", "TENSORS", "SIZE", "DIGEST")
    for m in listing.adapters:
        grid.add_row(
            m.base,
            m.name,
            str(m.rank),
            f"{m.alpha:g}",
            str(len(m.targets)),
            human_bytes(m.size),
            m.digest[:12],
        )
    out.print(grid if listing.adapters else "no adapters installed")


@app.command()
def show(name: str, base: Base, json_: JsonOption = False) -> None:
    """Show one adapter's manifest.

    Example: clawctl adapters show sql --base smollm2-135m
    """
    with daemon_client() as client:
        manifest = client.show_adapter(base, name)
    if json_:
        emit_json(manifest)
        return
    grid = table("FIELD", "VALUE")
    for key, value in manifest.model_dump(exclude={"targets"}).items():
        grid.add_row(key, str(value))
    grid.add_row(
        "targets", ", ".join(manifest.targets[:6]) + (" …" if len(manifest.targets) > 6 else "")
    )
    out.print(grid)


@app.command()
def rm(name: str, base: Base) -> None:
    """Remove an adapter (a request using it right now finishes first).

    Example: clawctl adapters rm sql --base smollm2-135m
    """
    with daemon_client() as client:
        manifest = client.remove_adapter(base, name)
    err.print(f"removed {manifest.name} ({manifest.base})")


@app.command()
def verify(json_: JsonOption = False) -> None:
    """Re-hash every adapter's bytes.

    Example: clawctl adapters verify
    """
    with daemon_client() as client:
        report = client.verify_adapters()
    if json_:
        emit_json(report.results)
    else:
        grid = table("BASE", "NAME", "STATUS")
        for r in report.results:
            grid.add_row(r.base, r.name, "ok" if r.ok else "[red]MISMATCH[/red]")
        out.print(grid if report.results else "no adapters installed")
    bad = [r.name for r in report.results if not r.ok]
    if bad:
        raise IntegrityError(f"damaged adapters: {', '.join(bad)}; install them again")
