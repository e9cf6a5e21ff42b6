"""uvicorn HTTP protocols that tag each connection with who is calling.

uvicorn copies `app_state` into every request's `scope["state"]`; giving each connection its own
copy with the SO_PEERCRED of the Unix-socket peer (or a TCP marker) lets the app log the caller
and require a token on TCP, without touching uvicorn's request parsing.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from clawctl.api.peer import PEER_KEY, TRANSPORT_KEY
from clawctl.serving.caller import PeerCred

_UCRED = struct.Struct("3i")


def peer_credentials(sock: socket.socket) -> PeerCred | None:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCred(pid=pid, uid=uid, gid=gid)


def _tag(app_state: dict[str, Any], transport: asyncio.BaseTransport) -> dict[str, Any]:
    sock = transport.get_extra_info("socket")
    state = dict(app_state)
    if sock is not None and sock.family == socket.AF_UNIX:
        state[TRANSPORT_KEY] = "unix"
        state[PEER_KEY] = peer_credentials(sock)
    else:
        state[TRANSPORT_KEY] = "tcp"
    return state


class PeerH11Protocol(H11Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.app_state = _tag(self.app_state, transport)
        super().connection_made(transport)


def protocol_class() -> type[asyncio.Protocol]:
    """httptools when installed (faster), else h11; both tagged."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return PeerH11Protocol

    class PeerHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self.app_state = _tag(self.app_state, transport)
            super().connection_made(transport)

    return PeerHttpToolsProtocol
