"""Tool calls and structured output through a real clawd and the official openai client.

SmolLM2-135M's template knows no tools, so these also prove the Hermes-style tool prompt: the
model is told the `<tool_call>` syntax, the grammar holds it to a valid call, and the API turns
the text into OpenAI `tool_calls`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from tests.conftest import Daemon, serve, wait_for

pytestmark = pytest.mark.integration
MODEL = "smollm2-135m"
WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
HOSTILE: dict[str, Any] = {  # what OpenClaw's tools carry: keywords no grammar takes as they are
    "type": "function",
    "function": {
        "name": "write_file",
        "description": "Write a file.",
        "parameters": {
            "type": "object",
            "properties": {
                "path": {"type": "string", "pattern": "[^/]+"},
                "content": {"type": "string", "maxLength": 65536},
                "meta": {"type": "object", "patternProperties": {"^x-": {"type": "string"}}},
            },
            "required": ["path", "content"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _checked_weather(arguments: str) -> dict[str, Any]:
    decoded = json.loads(arguments)
    assert isinstance(decoded, dict)
    assert set(decoded) == {"city", "unit"}
    assert isinstance(decoded["city"], str)
    assert len(decoded["city"]) <= 40
    assert decoded["unit"] in ("celsius", "fahrenheit")
    return decoded


def test_required_call_is_a_valid_call(daemon: Daemon) -> None:
    with daemon.openai() as client:
        reply = client.chat.completions.create(
            model=MODEL,
            messages=ASK,  # type: ignore[arg-type]
            tools=[WEATHER, HOSTILE],  # type: ignore[list-item]
            tool_choice="required",
            parallel_tool_calls=False,
            temperature=0,
            max_tokens=80,
        )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert len(calls) == 1
    call = calls[0]
    assert call.id
    assert call.type == "function"
    assert call.function.name in ("get_weather", "write_file")  # type: ignore[union-attr]
    arguments = json.loads(call.function.arguments)  # type: ignore[union-attr]
    assert isinstance(arguments, dict)
    assert "<tool_call>" not in (choice.message.content or "")


def test_streamed_named_call_accumulates(daemon: Daemon) -> None:
    with daemon.openai() as client:
        stream = client.chat.completions.create(
            model=MODEL,
            messages=ASK,  # type: ignore[arg-type]
            tools=[WEATHER, HOSTILE],  # type: ignore[list-item]
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            parallel_tool_calls=False,
            temperature=0,
            max_tokens=80,
            stream=True,
            stream_options={"include_usage": True},
        )
        calls: dict[int, dict[str, str]] = {}
        content, finish, usage = "", None, None
        pieces = 0  # chunks that carried a piece of arguments
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                content += choice.delta.content or ""
                for delta in choice.delta.tool_calls or ():
                    entry = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                    if delta.id:
                        assert not entry["id"], "an id is sent once, with the name"
                        entry["id"] = delta.id
                        assert delta.function is not None
                        assert not delta.function.arguments, "the call starts before its arguments"
                    if delta.function and delta.function.name:
                        entry["name"] += delta.function.name
                    if delta.function and delta.function.arguments:
                        entry["arguments"] += delta.function.arguments
                        pieces += 1
                finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert usage is not None
    assert usage.completion_tokens > 0
    assert list(calls) == [0]
    assert calls[0]["id"]
    assert calls[0]["name"] == "get_weather"
    _checked_weather(calls[0]["arguments"])
    assert pieces > 1, "the arguments stream as the model writes them"
    assert "tool_call" not in content


def test_a_call_the_token_limit_cuts(daemon: Daemon) -> None:
    """Streamed, as OpenAI does: the call and what of its arguments was written, then
    `finish_reason` "length" (not "tool_calls"). Whole, every call returned is checked, so the
    cut call is returned as the text it is."""
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": ASK,
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "temperature": 0,
        "max_tokens": 20,  # the tags and the name, then a few tokens of the arguments
        "claw": {"cache": False},
    }
    with daemon.client() as http:
        whole = http.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert whole["finish_reason"] == "length"
    assert whole["message"]["tool_calls"] is None
    text = whole["message"]["content"]
    assert text.startswith('<tool_call>\n{"name": "get_weather", "arguments": {')
    streamed, name, finish = "", "", None
    with (
        daemon.client() as http,
        http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response,
    ):
        for line in response.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    assert not choice["delta"].get("content")
                    for delta in choice["delta"].get("tool_calls") or ():
                        name += delta["function"].get("name") or ""
                        streamed += delta["function"].get("arguments") or ""
                    finish = choice.get("finish_reason") or finish
    assert (name, finish) == ("get_weather", "length")
    assert text.endswith(streamed)
    with pytest.raises(ValueError, match=r"Expecting|Unterminated"):
        json.loads(streamed)


def test_tool_results_render_and_the_answer_is_text(daemon: Daemon) -> None:
    with daemon.openai() as client:
        reply = client.chat.completions.create(
            model=MODEL,
            messages=[  # type: ignore[list-item]
                *ASK,
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {
                                "name": "get_weather",
                                "arguments": '{"city": "Paris", "unit": "celsius"}',
                            },
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees, sunny"},
            ],
            tools=[WEATHER],  # type: ignore[list-item]
            tool_choice="none",
            temperature=0,
            max_tokens=24,
        )
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert choice.message.tool_calls is None
    assert choice.message.content


def test_json_schema_response_format(daemon: Daemon) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}, "rank": {"type": "integer"}},
        "required": ["city", "rank"],
        "additionalProperties": False,
    }
    with daemon.openai() as client:
        reply = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Name a big city and its rank by size."}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "city", "schema": schema, "strict": True},
            },
            temperature=0,
            max_tokens=60,
        )
    decoded = json.loads(reply.choices[0].message.content or "")
    assert set(decoded) == {"city", "rank"}
    assert isinstance(decoded["city"], str)
    assert isinstance(decoded["rank"], int)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "not in tools"),
        ({"tool_choice": "required"}, "needs tools"),
        ({"tools": [{"function": {"name": "x"}}]}, "type"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "name"),
        ({"tools": [WEATHER, WEATHER]}, "unique"),
        ({"tool_choice": "sometimes", "tools": [WEATHER]}, "tool_choice"),
        ({"messages": [*ASK, {"role": "tool", "tool_call_id": "x", "content": "1"}]},
         "no earlier"),
        ({"messages": [*ASK, {"role": "tool", "content": "1"}]}, "tool_call_id"),
        ({"response_format": {"type": "json_schema"}}, "json_schema"),
    ],
)  # fmt: skip
def test_bad_tool_input_is_a_400(daemon: Daemon, body: dict[str, Any], needle: str) -> None:
    request = {"model": MODEL, "messages": ASK, "max_tokens": 4, **body}
    with httpx.Client(
        transport=httpx.HTTPTransport(uds=str(daemon.socket)), base_url="http://clawd"
    ) as client:
        response = client.post("/v1/chat/completions", json=request)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert needle in error["message"]


class Forecast(BaseModel):
    """What `get_forecast` takes: the SDK turns this model into the tool's schema."""

    city: str = Field(max_length=40)
    days: int = Field(ge=1, le=7)


class CityFact(BaseModel):
    name: str = Field(max_length=40)
    country: str = Field(max_length=40)


def test_sdk_stream_helper_accumulates_a_valid_call(daemon: Daemon) -> None:
    """The openai SDK's own `.stream()` helper: its events and final completion hold the call
    whole, with arguments the SDK parses into the tool's pydantic model."""
    tool = openai.pydantic_function_tool(Forecast, name="get_forecast")
    with (
        daemon.openai() as client,
        client.chat.completions.stream(
            model=MODEL,
            messages=[{"role": "user", "content": "Forecast for Paris, next 3 days?"}],
            tools=[tool],
            tool_choice="required",
            parallel_tool_calls=False,
            temperature=0,
            max_tokens=80,
        ) as stream,
    ):
        done = [e for e in stream if e.type == "tool_calls.function.arguments.done"]
        final = stream.get_final_completion()
    assert len(done) == 1
    assert done[0].name == "get_forecast"
    call = (final.choices[0].message.tool_calls or [])[0]
    assert final.choices[0].finish_reason == "tool_calls"
    parsed = call.function.parsed_arguments
    assert isinstance(parsed, Forecast)
    assert 1 <= parsed.days <= 7


def test_sdk_parse_gives_the_pydantic_model(daemon: Daemon) -> None:
    """`.parse()` with a pydantic model sends a strict json_schema response_format; the
    grammar makes the answer that model."""
    with daemon.openai() as client:
        reply = client.chat.completions.parse(
            model=MODEL,
            messages=[{"role": "user", "content": "Name a large city in Italy and its country."}],
            response_format=CityFact,
            temperature=0,
            max_tokens=60,
        )
    parsed = reply.choices[0].message.parsed
    assert isinstance(parsed, CityFact)
    assert parsed.name
    assert parsed.country


def test_the_call_after_a_tool_step_starts_from_an_anticipated_prefix(
    fresh_home: Path, tmp_path: Path
) -> None:
    """OpenClaw's shape: a context message last, moved behind the new turns on the next call.
    While the client runs its tool, clawd computes the call as the next request will render it,
    so that request starts from a prefix longer than the whole first prompt (without
    anticipation it would reuse only what came before the moved message)."""
    context = {"role": "user", "content": "(It is Monday.)"}
    with serve(fresh_home, tmp_path) as daemon, daemon.openai() as client:
        first = client.chat.completions.create(
            model=MODEL,
            messages=[*ASK, context],  # type: ignore[list-item]
            tools=[WEATHER],  # type: ignore[list-item]
            tool_choice="required",
            temperature=0,
            max_tokens=64,
        )
        (call,) = first.choices[0].message.tool_calls or []
        assert first.usage is not None

        def anticipated() -> int:
            with daemon.client() as http:
                (model,) = http.get("/health").json()["loaded"]
            return int(model["anticipated_tokens"])

        wait_for("the next call's prefix to be computed", lambda: anticipated() > 0)
        second = client.chat.completions.create(
            model=MODEL,
            messages=[  # type: ignore[list-item]
                *ASK,
                first.choices[0].message.model_dump(exclude_none=True),  # as a client sends it back
                {"role": "tool", "tool_call_id": call.id, "content": "21 degrees, sunny"},
                context,
            ],
            tools=[WEATHER],  # type: ignore[list-item]
            temperature=0,
            max_tokens=8,
        )
    saved = (second.model_extra or {})["claw"]["prefill_tokens_saved"]
    assert saved > first.usage.prompt_tokens
    assert second.usage is not None
    assert saved < second.usage.prompt_tokens
