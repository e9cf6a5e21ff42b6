"""`clawctl distill`: turn escalations into fine-tuning data for a LoRA of the local model."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from clawctl.cli._console import err
from clawctl.cli._options import parse_duration

app = typer.Typer(
    help="Distillation data: escalated requests with the answers that replaced the local one.",
    no_args_is_help=True,
)


@app.command()
def export(
    out: Annotated[Path, typer.Option("--out", help="JSONL file to write (chat format).")],
    since: Annotated[str | None, typer.Option(help="Only the last span, e.g. 7d.")] = None,
    policy: Annotated[str | None, typer.Option(help="Only this policy's requests.")] = None,
) -> None:
    """Write escalated requests and their remote answers as `{"messages": [...]}` lines.

    Only policies with `store_prompts = true` keep prompts; see docs/adapters.md for the path
    from this file to a GGUF LoRA and back through `clawctl adapters install`.

    Example: clawctl distill export --since 30d --policy cascade --out escalations.jsonl
    """
    from clawctl.cli._client import daemon_client
    from clawctl.fsutil import atomic_write

    start = time.time() - parse_duration(since) if since else None
    with daemon_client() as client:
        data = b"".join(client.distill_export(start, policy))
    atomic_write(out, data)
    examples = data.count(b"\n")
    err.print(f"wrote {examples} examples to {out}")
