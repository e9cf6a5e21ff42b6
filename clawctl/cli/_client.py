"""The one way CLI commands get a client for clawd (imported lazily: keeps --help fast)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from clawctl.client import ClawClient


def daemon_client() -> ClawClient:
    from clawctl.client import ClawClient
    from clawctl.config import load_client_config

    return ClawClient(load_client_config())
