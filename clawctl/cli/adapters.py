"""`clawctl adapters`: LoRA adapters per base model (install, list, show, rm, verify)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from clawctl.cli._console import RichProgress, emit_json, err, human_bytes, out, table
from clawctl.cli._options import JsonOption

if TYPE_CHECKING:
    from clawctl.store.adapters import AdapterStore

app = typer.Typer(help="LoRA adapters (GGUF) per base model.", no_args_is_help=True)
Base = Annotated[str, typer.Option("--base", "-b", help="Base model name.")]


def _store() -> AdapterStore:
    from clawctl.config import load_paths
    from clawctl.store.adapters import AdapterStore
    from clawctl.store.models import ModelStore

    return AdapterStore(ModelStore(load_paths()))


@app.command()
def install(
    ref: Annotated[str, typer.Argument(help="A LoRA GGUF file or http(s) URL.")],
    base: Base,
    name: Annotated[str | None, typer.Option(help="Name (default: from the file).")] = None,
    sha256: Annotated[str | None, typer.Option(help="Expected sha256 (pinning).")] = None,
    json_: JsonOption = False,
) -> None:
    """Verify a LoRA adapter against its base model and install it (no daemon restart needed).

    Example: clawctl adapters install ./sql-lora.gguf --base smollm2-135m --name sql
    """
    with RichProgress() as progress:
        manifest = _store().install(ref, base=base, name=name, sha256=sha256, progress=progress)
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
    manifests = _store().installed(base)
    if json_:
        emit_json(manifests)
        return
    grid = table("BASE", "NAME", "RANK", "ALPHA", "TENSORS", "SIZE", "DIGEST")
    for m in manifests:
        grid.add_row(
            m.base,
            m.name,
            str(m.rank),
            f"{m.alpha:g}",
            str(len(m.targets)),
            human_bytes(m.size),
            m.digest[:12],
        )
    out.print(grid if manifests else "no adapters installed")


@app.command()
def show(name: str, base: Base, json_: JsonOption = False) -> None:
    """Show one adapter's manifest.

    Example: clawctl adapters show sql --base smollm2-135m
    """
    manifest = _store().get(base, name)
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
    manifest = _store().remove(base, name)
    err.print(f"removed {manifest.name} ({manifest.base})")


@app.command()
def verify(json_: JsonOption = False) -> None:
    """Re-hash every adapter's bytes.

    Example: clawctl adapters verify
    """
    from clawctl.errors import IntegrityError

    results = _store().verify()
    if json_:
        emit_json({"results": [{"base": m.base, "name": m.name, "ok": ok} for m, ok in results]})
    else:
        grid = table("BASE", "NAME", "STATUS")
        for m, ok in results:
            grid.add_row(m.base, m.name, "ok" if ok else "[red]MISMATCH[/red]")
        out.print(grid if results else "no adapters installed")
    bad = [m.name for m, ok in results if not ok]
    if bad:
        raise IntegrityError(f"damaged adapters: {', '.join(bad)}; install them again")
