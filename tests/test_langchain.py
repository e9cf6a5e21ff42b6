"""LangChain's OpenAI chat model against a real clawd: `bind_tools` (invoked and streamed) and
`with_structured_output` by JSON Schema and by function calling, as LangChain agents use them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import httpx
import pytest
from langchain_core.messages import AIMessageChunk
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from tests.conftest import Daemon

pytestmark = pytest.mark.integration
MODEL = "smollm2-135m"
ASK = "What is the weather in Paris?"


@tool
def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
    """The current weather in a city."""
    return f"Sunny in {city}"


class City(BaseModel):
    """A city and the country it is in."""

    name: str = Field(max_length=40)
    country: str = Field(max_length=40)


@pytest.fixture
def http(daemon: Daemon) -> Iterator[httpx.Client]:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(daemon.socket)), timeout=120) as client:
        yield client


def chat_model(http: httpx.Client) -> ChatOpenAI:
    return ChatOpenAI(
        model=MODEL,
        base_url="http://clawd/v1",
        api_key="unused",  # type: ignore[arg-type]
        http_client=http,
        temperature=0,
        max_completion_tokens=80,
    )


def _checked(call: dict[str, object]) -> None:
    assert call["name"] == "get_weather"
    args = call["args"]
    assert isinstance(args, dict)
    assert set(args) == {"city", "unit"}
    assert isinstance(args["city"], str)
    assert args["unit"] in ("celsius", "fahrenheit")


def test_bind_tools_gives_a_tool_call(http: httpx.Client) -> None:
    llm = chat_model(http).bind_tools(
        [get_weather], tool_choice="get_weather", parallel_tool_calls=False
    )
    message = llm.invoke(ASK)
    assert len(message.tool_calls) == 1
    _checked(dict(message.tool_calls[0]))
    assert message.response_metadata["finish_reason"] == "tool_calls"


def test_bind_tools_streamed_accumulates_the_same_call(http: httpx.Client) -> None:
    llm = chat_model(http).bind_tools(
        [get_weather], tool_choice="get_weather", parallel_tool_calls=False
    )
    whole = llm.invoke(ASK)
    merged: AIMessageChunk | None = None
    for chunk in llm.stream(ASK):
        assert isinstance(chunk, AIMessageChunk)
        merged = chunk if merged is None else merged + chunk
    assert merged is not None
    assert not merged.content  # the call's markup never reaches the text
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [
        (c["name"], c["args"]) for c in whole.tool_calls
    ]


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output_gives_the_model(http: httpx.Client, method: str) -> None:
    llm = chat_model(http).with_structured_output(City, method=method)  # type: ignore[arg-type]
    city = llm.invoke("Name a large city in France and its country.")
    assert isinstance(city, City)
    assert city.name
    assert city.country
