"""What every face (OpenAI's, Ollama's) does the same on the wire.

Request bodies are JSON whatever the Content-Type (`curl -d` sends form encoding; llama.cpp's,
OpenAI's and Ollama's servers all parse it as JSON anyway), validated by the face's pydantic
model, with validation errors raised as `BadInput` so api/errors.py gives them the face's error
shape. FastAPI cannot see such bodies, so each face lists its models in a `BODIES` table that
`api/openapi.py` adds to the OpenAPI document. Answers carry the tier that gave them in
`x-claw-tier`, and streams ask proxies not to buffer them. A whole (non-streamed) answer offers
anticipation only after its last byte went out (`anticipate_after`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask

from clawctl.api.errors import validation_error
from clawctl.engines.base import ToolCall
from clawctl.serving.dedup import Answer

Body = TypeVar("Body", bound=BaseModel)
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def json_body(model: type[Body]) -> Callable[[Request], Awaitable[Body]]:
    """A FastAPI dependency parsing the request body as `model`."""

    async def parse(request: Request) -> Body:
        try:
            return model.model_validate_json(await request.body())
        except ValidationError as exc:
            raise validation_error(exc.errors()) from None

    return parse


def answer_headers(answer: Answer, streamed: bool = False) -> dict[str, str]:
    """Response headers of an answer: `x-claw-tier` names the tier of a routed request."""
    headers = dict(STREAM_HEADERS) if streamed else {}
    if answer.tier_name is not None:
        headers["x-claw-tier"] = answer.tier_name
    return headers


def anticipate_after(answer: Answer, content: str, calls: Sequence[ToolCall]) -> BackgroundTask:
    """A response's background task offering the answer's anticipation: it runs after the
    response is sent, so computing ahead never delays delivering it, and on the event loop
    (a coroutine), like the streaming faces' offers, not in Starlette's thread pool."""

    async def offer() -> None:
        answer.anticipate(content, calls)

    return BackgroundTask(offer)
