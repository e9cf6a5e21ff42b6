"""systemd integration: READY/STOPPING/STATUS and the watchdog heartbeat via sd_notify.

The `sdnotify` package finds NOTIFY_SOCKET itself; when it is unset every call is a no-op, so the
daemon behaves the same outside systemd.
"""

from __future__ import annotations

import asyncio

import sdnotify

from clawctl.config import SystemdEnv


class Notifier:
    def __init__(self, env: SystemdEnv) -> None:
        self.env = env
        self._notifier = sdnotify.SystemdNotifier() if env.notify_socket else None

    def send(self, message: str) -> None:
        if self._notifier is not None:
            self._notifier.notify(message)

    def ready(self, status: str) -> None:
        self.send(f"READY=1\nSTATUS={status}")

    def stopping(self) -> None:
        self.send("STOPPING=1\nSTATUS=draining requests")

    async def watchdog(self) -> None:
        """Ping at half the watchdog interval while the event loop is alive."""
        if self._notifier is None or not self.env.watchdog_usec:
            return
        interval = self.env.watchdog_usec / 2_000_000
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(interval)
