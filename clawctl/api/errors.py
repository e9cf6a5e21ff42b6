"""The one place errors become OpenAI error envelopes `{"error": {message, type, param, code}}`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from clawctl.errors import BadInput, ClawError, Overloaded
from clawctl.schemas.openai import ErrorBody, ErrorEnvelope

log = logging.getLogger("clawd.api")
RETRY_AFTER_SECONDS = "2"


def envelope(
    status: int, message: str, type_: str, code: str | None, param: str | None = None
) -> JSONResponse:
    body = ErrorEnvelope(error=ErrorBody(message=message, type=type_, param=param, code=code))
    headers = {"Retry-After": RETRY_AFTER_SECONDS} if status == 503 else None
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def claw_error_response(exc: ClawError) -> JSONResponse:
    return envelope(exc.http_status, exc.message, exc.type, exc.code, exc.param)


def validation_error(errors: Sequence[Any]) -> BadInput:
    """One readable line from pydantic's or FastAPI's error list (the first error)."""
    first = errors[0] if errors else {"msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return BadInput("request body is not valid JSON")
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    return BadInput(message, param=param)


def install_error_handlers(app: FastAPI) -> None:
    async def on_claw_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ClawError)
        if isinstance(exc, Overloaded):
            log.warning("overloaded: %s", exc.message)
        return claw_error_response(exc)

    async def on_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return claw_error_response(validation_error(exc.errors()))

    async def on_http(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        code = "not_found" if exc.status_code == 404 else "http_error"
        return envelope(exc.status_code, str(exc.detail), "invalid_request_error", code)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return envelope(500, "internal error; see clawd's log", "server_error", "internal_error")

    app.add_exception_handler(ClawError, on_claw_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
