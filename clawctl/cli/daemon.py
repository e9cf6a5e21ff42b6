"""Daemon-facing commands: `serve`, `status`, `ps`, `env`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from clawctl.cli._client import daemon_client
from clawctl.cli._console import emit_json, human_bytes, out, table
from clawctl.cli._options import JsonOption


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        socket: Annotated[Path | None, typer.Option(help="Unix socket path.")] = None,
        profile: Annotated[str | None, typer.Option(help="Edge profile name or 'auto'.")] = None,
    ) -> None:
        """Run clawd in the foreground (same as the `clawd` command).

        Example: clawctl serve --profile x86-small
        """
        from clawctl.clawd.main import run
        from clawctl.config import load_daemon_config

        raise typer.Exit(run(load_daemon_config(socket=socket, profile=profile)))

    @app.command()
    def status(json_: JsonOption = False) -> None:
        """Show whether clawd is up, where, and with which profile.

        Example: clawctl status --json
        """
        with daemon_client() as client:
            health = client.health()
        if json_:
            emit_json(health)
            return
        out.print(
            f"clawd {health.version} is up (pid {health.pid}, "
            f"{health.uptime_seconds:.0f}s) on {health.socket}"
        )
        out.print(
            f"profile {health.profile}, default model {health.default_model}, "
            f"{len(health.loaded)} model(s) loaded, "
            f"budget {human_bytes(health.memory_budget_bytes)}"
        )
        cache = health.cache
        if cache is not None:
            matching = f"semantic ({cache.semantic_model})" if cache.semantic_model else "exact"
            out.print(
                f"answer cache: {cache.entries} answers ({human_bytes(cache.bytes)}), "
                f"{cache.exact_hits} exact and {cache.semantic_hits} semantic hits, "
                f"{cache.misses} misses; matching {matching}"
            )

    @app.command()
    def ps(json_: JsonOption = False) -> None:
        """List the models clawd has loaded.

        Example: clawctl ps
        """
        with daemon_client() as client:
            loaded = client.health().loaded
        if json_:
            emit_json(loaded)
            return
        grid = table(
            "NAME", "MEMORY", "CTX", "KV CELLS", "ACTIVE", "QUEUED", "AHEAD", "UNLOADS IN",
            "LOADED",
        )  # fmt: skip
        for m in loaded:
            expires = "busy" if m.expires_in is None else f"{m.expires_in:.0f}s"
            since = time.strftime("%H:%M:%S", time.localtime(m.loaded_at))
            grid.add_row(
                m.name if m.draft is None else f"{m.name} (draft {m.draft})",
                human_bytes(m.memory_bytes),
                str(m.n_ctx),
                f"{m.kv_cells_used}/{m.kv_cells} {m.kv_layout}",
                str(m.active_requests),
                str(m.queued_requests),
                str(m.anticipated_tokens),
                expires,
                since,
            )
        out.print(grid if loaded else "no models loaded")

    @app.command()
    def env(json_: JsonOption = False) -> None:
        """Show the CLAW_* environment variables and the paths they resolve to.

        Example: clawctl env
        """
        from clawctl.config import ENV_VARS, load_client_config

        config = load_client_config()
        paths = {
            "data_dir": str(config.paths.data_dir),
            "cache_dir": str(config.paths.cache_dir),
            "config_dir": str(config.paths.config_dir),
            "socket": str(config.socket_path),
            "download_cache": str(config.paths.download_cache),
        }
        if json_:
            emit_json({"variables": [v.__dict__ for v in ENV_VARS], "paths": paths})
            return
        grid = table("VARIABLE", "DEFAULT", "MEANING")
        for v in ENV_VARS:
            grid.add_row(v.name, v.default, v.description)
        out.print(grid)
        out.print()
        for key, value in paths.items():
            out.print(f"{key}: {value}")
