"""`clawctl profile`: edge profiles (detect, list, show)."""

from __future__ import annotations

import typer

from clawctl.cli._console import emit_json, out, table
from clawctl.cli._options import JsonOption

app = typer.Typer(help="Edge device profiles: detect, list, show.", no_args_is_help=True)


@app.command()
def detect(json_: JsonOption = False) -> None:
    """Detect this device and print the profile clawd would use.

    Example: clawctl profile detect --json
    """
    from clawctl.config import load_paths
    from clawctl.profiles import DeviceFacts, detect

    facts = DeviceFacts.probe()
    profile = detect(load_paths(), facts)
    if json_:
        emit_json({"profile": profile.model_dump(mode="json"), "facts": facts.__dict__})
        return
    out.print(f"{profile.name}: {profile.description}")
    out.print(
        f"  detected from: arch={facts.arch} memory={facts.memory_mb} MiB "
        f"cores={facts.physical_cores} model={facts.device_tree_model or '-'} "
        f"tegra={'yes' if facts.nv_tegra else 'no'}"
    )


@app.command("list")
def list_profiles(json_: JsonOption = False) -> None:
    """List the available profiles.

    Example: clawctl profile list
    """
    from clawctl.config import load_paths
    from clawctl.profiles import list_profiles

    profiles = list_profiles(load_paths())
    if json_:
        emit_json(profiles)
        return
    grid = table("NAME", "THREADS", "N_CTX", "KV", "BUDGET", "INT4", "INT2", "DESCRIPTION")
    for p in profiles:
        grid.add_row(
            p.name,
            str(p.threads or "auto"),
            str(p.n_ctx),
            p.kv_cache_type,
            f"{p.memory_budget_mb} MiB",
            p.int4_quant,
            p.int2_quant,
            p.description,
        )
    out.print(grid)


@app.command()
def show(name: str, json_: JsonOption = False) -> None:
    """Show one profile ('auto' shows the detected one).

    Example: clawctl profile show rpi5-8gb
    """
    from clawctl.config import load_paths
    from clawctl.profiles import load_profile

    profile = load_profile(load_paths(), name)
    if json_:
        emit_json(profile)
        return
    grid = table("FIELD", "VALUE")
    for key, value in profile.model_dump(exclude={"match"}).items():
        grid.add_row(key, str(value))
    out.print(grid)
