"""The one place errors become response bodies. Each face has its own shape, chosen by the
request's path so no route decides it: OpenAI's envelope `{"error": {message, type, param,
code}}` everywhere, except under `/api/` (the Ollama face), where Ollama clients expect
`{"error": "message"}` (the ollama Python client reads `error` as a string into
`ResponseError`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from clawctl.errors import BadInput, ClawError, Overloaded
from clawctl.schemas.ollama import ErrorResponse
from clawctl.schemas.openai import ErrorBody, ErrorEnvelope

log = logging.getLogger("clawd.api")
RETRY_AFTER_SECONDS = "2"
OLLAMA_PREFIX = "/api/"


def error_response(path: str, exc: ClawError) -> JSONResponse:
    """`exc` as the response of the face `path` belongs to."""
    return _shaped(path, exc.http_status, exc.message, exc.type, exc.code, exc.param)


def _shaped(
    path: str, status: int, message: str, type_: str, code: str, param: str | None = None
) -> JSONResponse:
    headers = {"Retry-After": RETRY_AFTER_SECONDS} if status == 503 else None
    body: ErrorResponse | ErrorEnvelope
    if path.startswith(OLLAMA_PREFIX):
        body = ErrorResponse(error=message)
    else:
        body = ErrorEnvelope(error=ErrorBody(message=message, type=type_, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


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
    async def on_claw_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ClawError)
        if isinstance(exc, Overloaded):
            log.warning("overloaded: %s", exc.message)
        return error_response(request.url.path, exc)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(request.url.path, validation_error(exc.errors()))

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        code = "not_found" if exc.status_code == 404 else "http_error"
        return _shaped(
            request.url.path, exc.status_code, str(exc.detail), "invalid_request_error", code
        )

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        # ClawError's own type and code are server_error / internal_error
        return error_response(request.url.path, ClawError("internal error; see clawd's log"))

    app.add_exception_handler(ClawError, on_claw_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
