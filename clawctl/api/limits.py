"""The request body cap: one oversized request must not make clawd read, parse and tokenize
megabytes while every other app waits.

A plain ASGI middleware (not BaseHTTPMiddleware, so streamed responses and disconnect detection
pass through untouched) that runs before any route parses anything. A declared Content-Length
over the cap is answered 413 at once, without reading the body; a body without one (chunked) is
read here, counting bytes, and refused as soon as it passes the cap, so at most `max_bytes` are
ever held. A body within the cap is handed to the app as one message, and later `receive()`
calls (disconnect detection while a response streams) go to the server as before.

Uploads (model and adapter files, snapshot imports) are exempt: their routes stream the body to
a temp file in the data dir instead of holding it.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clawctl.api.errors import error_response
from clawctl.errors import RequestTooLarge

UPLOAD_PATHS = frozenset(
    {"/admin/models/upload", "/admin/adapters/upload", "/admin/snapshots/import"}
)


class BodyLimit:
    """413 in the face's error shape (`code: request_too_large`) for bodies over
    `max_bytes`, except on `exempt` paths."""

    def __init__(self, app: ASGIApp, max_bytes: int, exempt: frozenset[str] = UPLOAD_PATHS) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(f"is {declared} bytes", scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its body was complete: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(f"passed {self.max_bytes} bytes", scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, _Replay(b"".join(chunks), receive), send)

    async def _refuse(self, what: str, scope: Scope, receive: Receive, send: Send) -> None:
        error = RequestTooLarge(
            f"the request body {what}; clawd reads at most {self.max_bytes} bytes "
            "([daemon] max_body_bytes in clawd.toml)"
        )
        await error_response(scope["path"], error)(scope, receive, send)


class _Replay:
    """`receive` for the app: the whole body once, then the server's own messages."""

    def __init__(self, body: bytes, receive: Receive) -> None:
        self._body: bytes | None = body
        self._receive = receive

    async def __call__(self) -> Message:
        if self._body is not None:
            body, self._body = self._body, None
            return {"type": "http.request", "body": body, "more_body": False}
        return await self._receive()


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server rejects a malformed one before we see it
    return None
