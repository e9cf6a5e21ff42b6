"""Server-sent events in OpenAI's streaming format ("data: {json}\n\n", ending "data: [DONE]").

Per-token frames are the hot path of a streaming response: instead of building and serializing a
pydantic chunk for every token, `TokenFrames` serializes the chunk model once around a marker and
then splices each token's JSON string into it, so the wire shape still comes from the schema.
The Ollama face streams NDJSON (one JSON object per line) with the same splicing: `NDJSON_LINE`
is its framing.
"""

from __future__ import annotations

import json

from pydantic import BaseModel

from clawctl.errors import ClawError
from clawctl.schemas.openai import ErrorBody, ErrorEnvelope

DONE = b"data: [DONE]\n\n"
SSE_FRAME = (b"data: ", b"\n\n")  # what goes before and after each chunk's JSON
NDJSON_LINE = (b"", b"\n")
_MARKER = "\x00claw-token\x00"


def frame(model: BaseModel) -> bytes:
    return b"data: " + model.model_dump_json(exclude_none=True).encode() + b"\n\n"


def error_frame(exc: ClawError) -> bytes:
    body = ErrorBody(message=exc.message, type=exc.type, param=exc.param, code=exc.code)
    return frame(ErrorEnvelope(error=body))


class TokenFrames:
    """Frames (SSE by default, or `NDJSON_LINE`) for a chunk model whose one text field varies
    per token."""

    marker = _MARKER

    def __init__(self, template: BaseModel, framing: tuple[bytes, bytes] = SSE_FRAME) -> None:
        text = template.model_dump_json(exclude_none=True)
        before, found, after = text.partition(json.dumps(_MARKER))
        if not found:
            raise ValueError("the template chunk must carry TokenFrames.marker as its text")
        self._before = framing[0] + before.encode()
        self._after = after.encode() + framing[1]

    def __call__(self, text: str) -> bytes:
        return self._before + json.dumps(text, ensure_ascii=False).encode() + self._after
