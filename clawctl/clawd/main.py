"""`clawd`: the daemon process. Loads the config, binds its sockets, serves the API with uvicorn.

Shaped like uvicorn's own main → Config → Server: `run()` is the whole program and returns an
exit code (0 after a clean SIGTERM drain, 3 when start-up fails), so `clawctl serve` and the
`clawd` console script share it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys
from pathlib import Path
from types import FrameType

import uvicorn

from clawctl import __version__
from clawctl.api.app import create_app
from clawctl.clawd.lock import data_dir_lock
from clawctl.clawd.protocol import protocol_class
from clawctl.clawd.sockets import listening_sockets
from clawctl.clawd.systemd import Notifier
from clawctl.config import ENV_VARS, LOG_LEVELS, DaemonConfig, load_daemon_config
from clawctl.errors import ClawError
from clawctl.services import Services

log = logging.getLogger("clawd")
STARTUP_FAILURE = 3


class ClawServer(uvicorn.Server):
    """uvicorn's server plus sd_notify at the moments systemd cares about."""

    def __init__(self, config: uvicorn.Config, notifier: Notifier, status: str) -> None:
        super().__init__(config)
        self.notifier = notifier
        self.status = status
        self._watchdog: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self._watchdog = asyncio.get_running_loop().create_task(self.notifier.watchdog())
            self.notifier.ready(self.status)
            log.info("ready: %s", self.status)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Drain on SIGTERM/SIGINT and exit 0 (a second SIGINT forces exit).

        uvicorn's own handler re-raises the signal after shutdown, which would make a clean,
        systemd-requested stop look like a crash; we do not record it.
        """
        if not self.should_exit:
            log.info("signal %d: finishing in-flight requests, then exiting", sig)
            self.notifier.stopping()
            self.should_exit = True
        elif sig == signal.SIGINT:
            self.force_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        await super().shutdown(sockets=sockets)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run(config: DaemonConfig) -> int:
    """The whole daemon: bind the sockets (or refuse: a live clawd owns one), lock the data dir
    (or refuse: another clawd uses it), and only then build the services, which sweep snapshot
    temp files and prune the ledger. Returns the exit code."""
    _configure_logging(config.log_level)
    log.info("effective config: %s", config.redacted())
    sockets, owned = listening_sockets(config)
    server: ClawServer | None = None
    try:
        with data_dir_lock(config.paths.data_dir):
            services = Services.build(config)
            where = ", ".join(str(s.getsockname()) or "unix" for s in sockets)
            server = ClawServer(
                uvicorn.Config(
                    create_app(services),
                    http=protocol_class(),
                    lifespan="on",
                    log_level=config.log_level,
                    access_log=False,
                    timeout_graceful_shutdown=int(config.graceful_timeout_seconds) or None,
                ),
                Notifier(config.systemd),
                status=f"serving on {where} (profile {services.profile.name})",
            )
            server.run(sockets=sockets)
    finally:
        for sock in sockets:
            sock.close()
        if owned is not None:
            with contextlib.suppress(FileNotFoundError):
                Path(owned).unlink()
    return 0 if server is not None and server.started else STARTUP_FAILURE


def parser() -> argparse.ArgumentParser:
    """clawd's command line. Each option overrides its CLAW_* variable, which overrides
    clawd.toml; `config.load_daemon_config` applies them (it is the one reader of both)."""
    variables = "\n".join(f"  {v.name:<20} {v.description}" for v in ENV_VARS)
    command = argparse.ArgumentParser(
        prog="clawd",
        description="The OpenClaw Edge daemon: serves the OpenAI-compatible API and the admin\n"
        "routes on a Unix socket (and, opt-in, on TCP with a bearer token).",
        epilog=f"environment:\n{variables}\n\nexit codes: 0 stopped cleanly, 2 bad usage or "
        "config, 3 could not start\n(its socket or data dir is in use by another clawd).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    command.add_argument(
        "--socket",
        type=Path,
        metavar="PATH",
        help="Unix socket to serve (default: CLAW_SOCKET, [daemon] socket, <runtime dir>/"
        "clawd.sock)",
    )
    command.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="clawd.toml to read (default: CLAW_CONFIG, <config dir>/clawd.toml, the shipped one)",
    )
    command.add_argument(
        "--profile", metavar="NAME", help="edge profile name, or 'auto' to detect the device"
    )
    command.add_argument(
        "--tcp",
        metavar="HOST:PORT",
        help="also listen on TCP (overrides [tcp] listen); needs a token: [tcp] token_file, "
        "CLAW_TOKEN or --token-file",
    )
    command.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="file holding the bearer token TCP clients must send (overrides [tcp] token_file)",
    )
    command.add_argument(
        "--log-level", choices=LOG_LEVELS, metavar="LEVEL", help=", ".join(LOG_LEVELS)
    )
    command.add_argument("--version", action="version", version=f"clawd {__version__}")
    return command


def main(argv: list[str] | None = None) -> None:
    """The `clawd` console script. argparse itself exits 2 with the usage line on an unknown
    option or a stray argument, and 0 after --help or --version."""
    args = parser().parse_args(argv)
    try:
        config = load_daemon_config(
            socket=args.socket,
            profile=args.profile,
            config_file=args.config,
            tcp=args.tcp,
            token_file=args.token_file,
            log_level=args.log_level,
        )
        code = run(config)
    except ClawError as exc:
        print(f"clawd: {exc.message}", file=sys.stderr)
        code = exc.exit_code if exc.exit_code != 1 else STARTUP_FAILURE
    raise SystemExit(code)
