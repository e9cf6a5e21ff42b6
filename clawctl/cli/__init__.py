"""The `clawctl` command line: the root app, its groups, and the one place errors become exit codes.

Exit codes: 0 ok, 1 operation failed, 2 bad input, 3 daemon unreachable. Command modules import
nothing heavy at module level, so `clawctl --help` stays fast.
"""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperGroup

from clawctl import __version__
from clawctl.cli import (
    adapters,
    chat,
    daemon,
    distill,
    fleet,
    ledger,
    models,
    profile,
    route,
    service,
    snapshot,
)
from clawctl.cli._console import err
from clawctl.errors import ClawError


class ClawGroup(TyperGroup):
    """Turns every `ClawError` into one line on stderr and its exit code."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except ClawError as exc:
            from rich.markup import escape  # messages name config sections: "[fleet] …"

            err.print(f"[red]error:[/red] {escape(exc.message)}", markup=True, highlight=False)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None


def _env_epilog() -> str:
    from clawctl.envvars import ENV_VARS

    rows = "\n\n".join(f"{v.name}: {v.description}" for v in ENV_VARS)
    return f"Environment:\n\n{rows}"


app = typer.Typer(
    cls=ClawGroup,
    help="OpenClaw Edge: run small language models cheaply and dependably on this box.",
    epilog=_env_epilog(),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)
app.add_typer(models.app, name="models")
app.add_typer(adapters.app, name="adapters")
app.add_typer(profile.app, name="profile")
app.add_typer(service.app, name="service")
app.add_typer(snapshot.app, name="snapshot")
app.add_typer(ledger.app, name="ledger")
app.add_typer(route.app, name="route")
app.add_typer(distill.app, name="distill")
app.add_typer(fleet.app, name="fleet")
chat.register(app)
daemon.register(app)


@app.callback(invoke_without_command=True)
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    if version:
        print(__version__)
        raise typer.Exit(0)


def main() -> None:
    from clawctl import forkguard

    forkguard.install("clawctl")
    app()
