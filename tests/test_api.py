"""The OpenAI-compatible API of a real clawd subprocess, serving the real default model, through
the official `openai` client over the Unix socket and raw httpx for malformed input."""

from __future__ import annotations

import concurrent.futures
import json
import os
import stat
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import Daemon

pytestmark = pytest.mark.integration
MODEL = "smollm2-135m"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture
def oai(daemon: Daemon) -> Iterator[openai.OpenAI]:
    with daemon.openai() as client:
        yield client


def test_socket_is_group_only(daemon: Daemon) -> None:
    mode = stat.S_IMODE(daemon.socket.stat().st_mode)
    assert mode == 0o660


def test_chat_completion_non_streaming(oai: openai.OpenAI) -> None:
    reply = oai.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=16, temperature=0
    )
    assert reply.object == "chat.completion"
    assert reply.model == MODEL
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > 5
    assert 0 < reply.usage.completion_tokens <= 16
    claw = (reply.model_extra or {})["claw"]
    assert claw["model"] == MODEL
    assert len(claw["digest"]) == 64
    assert claw["timings"]["total_ms"] > 0


def test_chat_completion_streaming_matches_non_streaming(oai: openai.OpenAI) -> None:
    kwargs = {"model": MODEL, "messages": QUESTION, "max_tokens": 24, "temperature": 0}
    whole = oai.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    stream = oai.chat.completions.create(
        **kwargs,
        stream=True,  # type: ignore[call-overload]
        stream_options={"include_usage": True},
    )
    pieces, finish, usage, claw = [], None, None, None
    for chunk in stream:
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
        usage = chunk.usage or usage
        claw = (chunk.model_extra or {}).get("claw") or claw
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage is not None
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert claw is not None
    assert claw["model"] == MODEL


def test_completions_endpoint(oai: openai.OpenAI) -> None:
    result = oai.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert result.object == "text_completion"
    assert "Paris" in result.choices[0].text
    assert result.usage is not None
    assert result.usage.completion_tokens <= 8
    streamed = oai.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == result.choices[0].text


def test_stop_sequence_and_max_tokens(oai: openai.OpenAI) -> None:
    text = oai.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=30, temperature=0, stop=[" 7"]
    ).choices[0]
    assert text.finish_reason == "stop"
    assert "7" not in text.text
    assert "5" in text.text


def test_models_list_and_get(oai: openai.OpenAI) -> None:
    ids = [m.id for m in oai.models.list()]
    assert MODEL in ids
    assert oai.models.retrieve(MODEL).id == MODEL


def test_eight_concurrent_clients_all_answered(oai: openai.OpenAI) -> None:
    def ask(i: int) -> str:
        reply = oai.chat.completions.create(
            model=MODEL,
            temperature=0,
            max_tokens=12,
            messages=[{"role": "user", "content": f"What is {i} plus {i}?"}],
        )
        return reply.choices[0].message.content or ""

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert len(answers) == 8
    assert all(answer.strip() for answer in answers)


def test_health_metrics_and_caller_logged(daemon: Daemon, oai: openai.OpenAI) -> None:
    oai.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=4, extra_body={"claw": {"app": "pytest-app"}}
    )
    with daemon.client() as client:
        health = client.get("/health").json()
        assert health["status"] == "ok"
        assert health["profile"] == "x86-small"
        assert MODEL in [m["name"] for m in health["loaded"]]
        metrics = client.get("/metrics").text
    assert 'clawd_requests_total{endpoint="chat",status="200"}' in metrics
    assert "clawd_completion_tokens_total" in metrics
    # The same usage under OpenTelemetry's GenAI names, for dashboards across a fleet.
    labels = (
        f'gen_ai_operation_name="chat",gen_ai_provider_name="clawd",gen_ai_request_model="{MODEL}"'
    )
    for kind in ("input", "output"):
        assert f'gen_ai_client_token_usage_count{{{labels},gen_ai_token_type="{kind}"}}' in metrics
    assert f"gen_ai_client_operation_duration_seconds_count{{{labels}}}" in metrics
    log = daemon.log_text()
    assert f"uid={os.getuid()} pid={os.getpid()} app=pytest-app" in log


def _error(response: httpx.Response) -> dict[str, str]:
    body = response.json()
    assert set(body) == {"error"}
    assert {"message", "type", "param", "code"} <= set(body["error"])
    return dict(body["error"])


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b'{"messages": "hello"}', 400, "messages"),
        (
            b'{"model": "smollm2-135m", "messages": [{"role": "wizard", "content": "x"}]}',
            400,
            "role",
        ),
        (
            b'{"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}',
            404,
            "no-such-model",
        ),
        (
            b'{"model": "smollm2-135m", "max_tokens": 0, "messages": [{"role": "user", '
            b'"content": "x"}]}',
            400,
            "max_tokens",
        ),
        (
            b'{"model": "smollm2-135m", "max_tokens": "many", "messages": [{"role": "user", '
            b'"content": "x"}]}',
            400,
            "max_tokens",
        ),
        (
            b'{"model": "smollm2-135m", "claw": {"teleport": true}, "messages": [{"role": "user",'
            b' "content": "x"}]}',
            400,
            "claw.teleport",
        ),
        (
            b'{"model": "smollm2-135m", "temperature": 9, "messages": [{"role": "user", '
            b'"content": "x"}]}',
            400,
            "temperature",
        ),
    ],
)
def test_bad_chat_input_gets_openai_error(
    daemon: Daemon, body: bytes, status: int, fragment: str
) -> None:
    with daemon.client() as client:
        response = client.post(
            "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
    assert response.status_code == status
    error = _error(response)
    assert fragment in error["message"]
    assert "Traceback" not in response.text


def test_prompt_longer_than_context_names_token_counts(daemon: Daemon) -> None:
    long = "word " * 6000
    with daemon.client() as client:
        response = client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": long}]},
        )
        streamed = client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "stream": True, "messages": [{"role": "user", "content": long}]},
        )
    for reply in (response, streamed):
        assert reply.status_code == 400
        error = _error(reply)
        assert error["code"] == "context_length_exceeded"
        assert "4096" in error["message"]
        assert "tokens" in error["message"]


def test_empty_prompt_is_a_400_and_the_model_keeps_serving(daemon: Daemon) -> None:
    """Found by the API fuzz test: an empty prompt tokenizes to nothing (SmolLM2 adds no BOS)."""
    with daemon.client() as client:
        for body in ({"prompt": ""}, {"prompt": []}):
            response = client.post("/v1/completions", json={"model": MODEL, **body})
            assert response.status_code == 400
            assert "empty" in _error(response)["message"]
    assert daemon.complete("Still here:", max_tokens=2)["usage"]["completion_tokens"] >= 1


def test_unknown_route_and_method(daemon: Daemon) -> None:
    with daemon.client() as client:
        assert _error(client.get("/v1/nothing-here"))["code"] == "not_found"
        assert client.get("/v1/chat/completions").status_code == 405


def test_body_without_json_content_type_is_accepted(daemon: Daemon) -> None:
    """`curl --unix-socket … -d '{…}'` sends form encoding; OpenAI-style servers accept it."""
    body = json.dumps({"model": MODEL, "messages": QUESTION, "max_tokens": 4})
    with daemon.client() as client:
        response = client.post(
            "/v1/chat/completions",
            content=body,
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"]
