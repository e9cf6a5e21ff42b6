"""Who is calling: the connection facts clawd attaches to each request's ASGI state.

clawd's uvicorn protocol puts these in the per-connection state (see clawd/protocol.py); routes and
middleware read them here. Unix-socket callers are identified by SO_PEERCRED; TCP callers by token.
"""

from __future__ import annotations

from typing import Any, Literal

from clawctl.serving.caller import PeerCred

PEER_KEY = "claw_peer"
TRANSPORT_KEY = "claw_transport"
Transport = Literal["unix", "tcp"]


def peer_of(state: dict[str, Any]) -> PeerCred | None:
    peer = state.get(PEER_KEY)
    return peer if isinstance(peer, PeerCred) else None


def transport_of(state: dict[str, Any]) -> Transport:
    return "tcp" if state.get(TRANSPORT_KEY) == "tcp" else "unix"
