"""`clawctl service install`: render and install the systemd units."""

from __future__ import annotations

from typing import Annotated

import typer

from clawctl.cli._console import err, out

app = typer.Typer(help="systemd service: install the clawd units.", no_args_is_help=True)


@app.command()
def install(
    user: Annotated[bool, typer.Option("--user", help="Install as a user service.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the units only.")] = False,
) -> None:
    """Render clawd.service, clawd.socket and clawd.toml and install them.

    Example: clawctl service install --user --dry-run
    """
    from clawctl.clawd.units import install_units, render_units

    units = render_units(user=user)
    if dry_run:
        for unit in units:
            out.print(f"# {unit.target}", markup=False)
            out.print(unit.text, markup=False)
        return
    for line in install_units(units, user=user):
        err.print(line, markup=False)
