"""NDJSON responses for long admin operations: relay `JobLine`s as they come."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from clawctl.schemas.jobs import JobLine

NDJSON = "application/x-ndjson"


def ndjson(lines: AsyncIterator[JobLine]) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        async for line in lines:
            yield (line.model_dump_json() + "\n").encode()

    return StreamingResponse(body(), media_type=NDJSON)
