"""A recording proxy: forwards every request to an upstream server unchanged (streams included)
and appends each JSON request body to a JSONL file, so a real agent's calls can be replayed
against any server (`bench/agents.py` replays OpenClaw's).

    python bench/capture_proxy.py --listen 127.0.0.1:11436 --upstream http://127.0.0.1:11435 \
        --out bench/data/openclaw_session.jsonl
"""

from __future__ import annotations

import argparse
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

HOP_HEADERS = frozenset({"host", "content-length", "connection", "transfer-encoding"})


def build_app(upstream: str, out: Path) -> FastAPI:
    app = FastAPI()
    client = httpx.AsyncClient(base_url=upstream, timeout=None)
    lock = threading.Lock()

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def forward(path: str, request: Request) -> StreamingResponse:
        body = await request.body()
        if body:
            with lock, out.open("a") as sink:
                record = {"path": "/" + path, "body": json.loads(body)}
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        upstream_request = client.build_request(
            request.method, "/" + path, content=body, headers=headers
        )
        response = await client.send(upstream_request, stream=True)

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in response.aiter_raw():
                    yield chunk
            finally:
                await response.aclose()

        passed = {k: v for k, v in response.headers.items() if k.lower() not in HOP_HEADERS}
        passed.pop("content-encoding", None)
        return StreamingResponse(relay(), status_code=response.status_code, headers=passed)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:11436")
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    host, port = args.listen.rsplit(":", 1)
    uvicorn.run(build_app(args.upstream, args.out), host=host, port=int(port), log_level="warning")


if __name__ == "__main__":
    main()
