"""`clawd`: the daemon process. Loads the config, binds its sockets, serves the API with uvicorn.

Shaped like uvicorn's own main → Config → Server: `run()` is the whole program and returns an
exit code (0 after a clean SIGTERM drain, 3 when start-up fails), so `clawctl serve` and the
`clawd` console script share it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from pathlib import Path
from types import FrameType

import uvicorn

from clawctl.api.app import create_app
from clawctl.clawd.protocol import protocol_class
from clawctl.clawd.sockets import listening_sockets
from clawctl.clawd.systemd import Notifier
from clawctl.config import DaemonConfig, load_daemon_config
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
    _configure_logging(config.log_level)
    log.info("effective config: %s", config.redacted())
    services = Services.build(config)
    sockets, owned = listening_sockets(config)
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
    try:
        server.run(sockets=sockets)
    finally:
        for sock in sockets:
            sock.close()
        if owned is not None:
            with contextlib.suppress(FileNotFoundError):
                Path(owned).unlink()
    return 0 if server.started else STARTUP_FAILURE


def main() -> None:
    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        print(
            "usage: clawd\n\nThe OpenClaw Edge daemon; configured by clawd.toml and CLAW_* "
            "variables (see 'clawctl env')."
        )
        raise SystemExit(0)
    try:
        code = run(load_daemon_config())
    except ClawError as exc:
        print(f"clawd: {exc.message}", file=sys.stderr)
        code = exc.exit_code if exc.exit_code != 1 else STARTUP_FAILURE
    raise SystemExit(code)
