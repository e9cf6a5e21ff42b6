"""The FastAPI application factory. The lifespan owns the services' start and stop; nothing here
is module-level state, so tests build as many apps as they like."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from clawctl import __version__
from clawctl.api import ollama_routes, openai_routes
from clawctl.api.admin import adapters as admin_adapters
from clawctl.api.admin import distill as admin_distill
from clawctl.api.admin import fleet as admin_fleet
from clawctl.api.admin import health as admin_health
from clawctl.api.admin import ledger as admin_ledger
from clawctl.api.admin import models as admin_models
from clawctl.api.admin import policies as admin_policies
from clawctl.api.admin import snapshots as admin_snapshots
from clawctl.api.errors import error_response, install_error_handlers
from clawctl.api.limits import BodyLimit
from clawctl.api.openapi import install_openapi
from clawctl.api.peer import transport_of
from clawctl.errors import Forbidden, Unauthorized
from clawctl.services import Services
from clawctl.serving.dedup import Flights


class TcpTokenGuard:
    """Unix-socket callers are trusted by socket permissions; TCP callers need the bearer token.

    A plain ASGI middleware (not BaseHTTPMiddleware) so streaming responses pass through untouched.
    """

    def __init__(self, app: ASGIApp, token: str | None, admin: bool = False) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode() if token else None
        self.admin = admin  # may TCP callers change the daemon's data?

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and transport_of(dict(scope.get("state", {}))) == "tcp":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if self.expected is None or not hmac.compare_digest(given, self.expected):
                denied = Unauthorized("missing or wrong bearer token")
                await error_response(scope["path"], denied)(scope, receive, send)
                return
            changes = scope["method"] not in ("GET", "HEAD")
            if changes and scope["path"].startswith("/admin/") and not self.admin:
                refused = Forbidden(
                    "changing the daemon's data over TCP is off; use the Unix socket, or set "
                    "[tcp] admin = true in clawd.toml"
                )
                await error_response(scope["path"], refused)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(services: Services) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        services.manager.start()
        try:
            yield
        finally:
            await services.stop()

    app = FastAPI(title="clawd", version=__version__, lifespan=lifespan)
    app.state.services = services
    app.state.flights = Flights()
    install_error_handlers(app)

    app.add_middleware(BodyLimit, max_bytes=services.config.max_body_bytes)  # inside the guard
    app.add_middleware(
        TcpTokenGuard, token=services.config.tcp_token, admin=services.config.tcp_admin
    )
    app.include_router(openai_routes.router)
    app.include_router(ollama_routes.router)
    for admin in (
        admin_health,
        admin_models,
        admin_adapters,
        admin_snapshots,
        admin_ledger,
        admin_policies,
        admin_fleet,
        admin_distill,
    ):
        app.include_router(admin.router)
    install_openapi(app, {**openai_routes.BODIES, **ollama_routes.BODIES})
    return app
