"""The cascade's decisions, fallbacks and ledger rows, in-process: the real app and serving core
on the fake engine (its scripted uncertainty drives the real entropy meter) and a fake
OpenAI-compatible remote tier reached through `httpx.ASGITransport`. No model, no second daemon:
what only real processes prove stays in tests/test_routing.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from clawctl.api.app import create_app
from clawctl.config import load_daemon_config
from clawctl.services import Services
from tests.conftest import copy_home
from tests.fakes import FakeLoader

REMOTE_ANSWER = "the remote tier knows"
POLICY = """
name = "{name}"
start = "small"
on_remote_failure = "{on_failure}"

[[tiers]]
name = "small"
kind = "local"
model = "smollm2-135m"
[tiers.escalate]
max_entropy = 1.0

[[tiers]]
name = "remote"
kind = "remote"
base_url = "http://remote.test/v1"
model = "big"
timeout_seconds = 10
retries = 1
price_input = 1.0
price_output = 2.0
"""


@dataclass
class FakeRemote:
    """An OpenAI-compatible server in-process: answers REMOTE_ANSWER, or fails as scripted."""

    fail: list[int] = field(default_factory=list)  # status codes for the next attempts
    requests: list[dict[str, Any]] = field(default_factory=list)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            body = json.loads(await request.body())
            self.requests.append(body)
            if self.fail:
                status = self.fail.pop(0)
                return JSONResponse({"error": {"message": "busy", "type": "x"}}, status)
            return StreamingResponse(self._chunks(body), media_type="text/event-stream")

        return app

    async def _chunks(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        words = REMOTE_ANSWER.split()
        for i, word in enumerate(words):
            piece = word if i == 0 else " " + word
            chunk = {
                "id": "r",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": body["model"],
                "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}],
            }
            yield f"data: {json.dumps(chunk)}\n\n".encode()
        end = {
            "id": "r",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": body["model"],
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 7, "completion_tokens": len(words), "total_tokens": 11},
        }
        yield f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n".encode()


Scenario = Callable[[httpx.AsyncClient, Services], Awaitable[None]]


@pytest.fixture
def home(claw_home: Path, session_home: Path) -> Path:
    copy_home(session_home, claw_home)
    for name, on_failure in (("cascade-test", "degraded"), ("strict-test", "error")):
        policy = claw_home / "config" / "policies" / f"{name}.toml"
        policy.parent.mkdir(parents=True, exist_ok=True)
        policy.write_text(POLICY.format(name=name, on_failure=on_failure))
    return claw_home


def run(remote: FakeRemote, scenario: Scenario) -> Services:
    """Serve the real app on fake engines, with `remote` as every remote tier, for `scenario`."""
    services = Services.build(load_daemon_config(), load_engine=FakeLoader(stateful=False))
    services.remote_transport = httpx.ASGITransport(app=remote.app())
    app = create_app(services)

    async def main() -> None:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://clawd") as client:
                await scenario(client, services)

    asyncio.run(main())
    return services


def ask(words: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "cascade-test",
        "messages": [{"role": "user", "content": words}],
        "temperature": 0,
        "claw": {"cache": False},
        **extra,
    }


def test_a_confident_local_answer_never_reaches_the_remote(home: Path) -> None:
    remote = FakeRemote()
    rows: list[Any] = []

    async def scenario(client: httpx.AsyncClient, services: Services) -> None:
        reply = (await client.post("/v1/chat/completions", json=ask("alpha beta gamma"))).json()
        assert reply["choices"][0]["message"]["content"].split() == ["alpha", "beta", "gamma"]
        claw = reply["claw"]
        assert claw["path"] == ["small"]
        assert not claw["escalated"]
        assert claw["cost"] == 0.0
        assert claw["entropy"]["max_entropy"] < 1.0
        rows.extend(services.ledger.rows())

    run(remote, scenario)
    assert remote.requests == []
    assert [(r.tier_path, r.remote_cost) for r in rows] == [("small", 0.0)]


def test_an_unsure_token_escalates_and_the_ledger_prices_it(home: Path) -> None:
    remote = FakeRemote()
    rows: list[Any] = []

    async def scenario(client: httpx.AsyncClient, services: Services) -> None:
        reply = (await client.post("/v1/chat/completions", json=ask("alpha ?beta gamma"))).json()
        assert reply["choices"][0]["message"]["content"] == REMOTE_ANSWER
        claw = reply["claw"]
        assert claw["path"] == ["small", "remote"]
        assert claw["escalated"]
        assert "max_entropy" in claw["reason"]
        assert claw["usage_by_tier"]["small"]["completion_tokens"] == 2  # stopped at "?beta"
        # the remote's 7 prompt and 4 completion tokens at 1.0 and 2.0 per million
        assert claw["cost"] == pytest.approx((7 * 1.0 + 4 * 2.0) / 1e6)
        rows.extend(services.ledger.rows())

    run(remote, scenario)
    assert len(remote.requests) == 1
    sent = remote.requests[0]
    assert sent["model"] == "big"
    assert sent["messages"][-1]["content"] == "alpha ?beta gamma"
    assert [r.tier_path for r in rows] == ["small>remote"]
    assert rows[0].remote_cost == pytest.approx((7 * 1.0 + 4 * 2.0) / 1e6)
    assert rows[0].escalation_reason


def test_a_streamed_escalation_shows_only_the_answering_tier(home: Path) -> None:
    remote = FakeRemote()

    async def scenario(client: httpx.AsyncClient, _: Services) -> None:
        text, tiers = "", set()
        body = ask("one two ?three four", stream=True)
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            tiers.add(response.headers.get("x-claw-tier"))
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                for choice in chunk.get("choices", []):
                    text += choice["delta"].get("content") or ""
        assert text == REMOTE_ANSWER
        assert "one" not in text

    run(remote, scenario)
    assert len(remote.requests) == 1


def test_a_remote_that_fails_once_is_retried(home: Path) -> None:
    remote = FakeRemote(fail=[503])

    async def scenario(client: httpx.AsyncClient, _: Services) -> None:
        reply = (await client.post("/v1/chat/completions", json=ask("?why"))).json()
        assert reply["choices"][0]["message"]["content"] == REMOTE_ANSWER
        assert not reply["claw"]["degraded"]

    run(remote, scenario)
    assert len(remote.requests) == 2


def test_a_failing_remote_gives_the_local_answer_marked_degraded(home: Path) -> None:
    remote = FakeRemote(fail=[503, 503])

    async def scenario(client: httpx.AsyncClient, services: Services) -> None:
        reply = (await client.post("/v1/chat/completions", json=ask("red ?green blue"))).json()
        assert reply["claw"]["degraded"]
        assert reply["choices"][0]["message"]["content"].split() == ["red", "?green", "blue"]

    run(remote, scenario)
    assert len(remote.requests) == 2  # the first attempt and its one retry


def test_a_failing_remote_is_an_error_when_the_policy_says_so(home: Path) -> None:
    remote = FakeRemote(fail=[500, 500])

    async def scenario(client: httpx.AsyncClient, _: Services) -> None:
        response = await client.post(
            "/v1/chat/completions", json=ask("red ?green", model="strict-test")
        )
        assert response.status_code == 502
        error = response.json()["error"]
        assert error["code"] == "remote_tier_failed"
        assert "remote" in error["message"]

    run(remote, scenario)
