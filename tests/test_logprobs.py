"""`logprobs` and `top_logprobs` on chat completions, through a real clawd and the openai SDK."""

from __future__ import annotations

import math
from typing import Any

import pytest

from tests.conftest import WEATHER_TOOL, Daemon

pytestmark = pytest.mark.integration
MODEL = "smollm2-135m"
ASK: list[Any] = [{"role": "user", "content": "Name three colours."}]


def test_each_token_has_its_logprob_and_the_top_alternatives(daemon: Daemon) -> None:
    with daemon.openai() as client:
        reply = client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3
        )
    choice = reply.choices[0]
    assert choice.logprobs is not None
    entries = choice.logprobs.content or []
    assert reply.usage is not None
    assert len(entries) == reply.usage.completion_tokens
    assert "".join(e.token for e in entries) == choice.message.content
    for entry in entries:
        assert entry.logprob <= 0
        assert bytes(entry.bytes or []).decode() == entry.token
        top = entry.top_logprobs
        assert len(top) == 3
        assert [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True)
        # Greedy: the token taken is the most likely one, with its own logprob.
        assert top[0].token == entry.token
        assert math.isclose(top[0].logprob, entry.logprob)
        assert sum(math.exp(t.logprob) for t in top) <= 1.0 + 1e-6


def test_streamed_entries_are_the_same_tokens(daemon: Daemon) -> None:
    with daemon.openai() as client:
        whole = client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=12, temperature=0, logprobs=True
        )
        streamed: list[tuple[str, float]] = []
        text = []
        for chunk in client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=12, temperature=0, logprobs=True, stream=True
        ):
            for choice in chunk.choices:
                text.append(choice.delta.content or "")
                if choice.logprobs is not None:
                    streamed += [(e.token, e.logprob) for e in choice.logprobs.content or ()]
    expected = [(e.token, e.logprob) for e in (whole.choices[0].logprobs.content or ())]  # type: ignore[union-attr]
    assert [t for t, _ in streamed] == [t for t, _ in expected]
    for (_, mine), (_, theirs) in zip(streamed, expected, strict=True):
        assert math.isclose(mine, theirs, abs_tol=1e-3)
    assert "".join(text) == whole.choices[0].message.content
    for entry in whole.choices[0].logprobs.content or ():  # type: ignore[union-attr]
        assert entry.top_logprobs == []  # none asked


def test_a_tool_call_has_the_logprobs_of_its_tokens(daemon: Daemon) -> None:
    """Under a grammar the sampled tokens keep their unconstrained logprobs (the model's view,
    as llama.cpp's server reports them)."""
    with daemon.openai() as client:
        reply = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "What is the weather in Paris?"}],
            tools=[WEATHER_TOOL],  # type: ignore[list-item]
            tool_choice="required",
            max_tokens=60,
            temperature=0,
            logprobs=True,
        )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    entries = choice.logprobs.content or []  # type: ignore[union-attr]
    assert reply.usage is not None
    assert len(entries) == reply.usage.completion_tokens
    assert all(e.logprob <= 0 for e in entries)


def test_without_logprobs_there_are_none(daemon: Daemon) -> None:
    with daemon.openai() as client:
        reply = client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=4, temperature=0
        )
    assert reply.choices[0].logprobs is None


def test_top_logprobs_without_logprobs_is_a_400(daemon: Daemon) -> None:
    with daemon.client() as client:
        body = {"model": MODEL, "messages": ASK, "top_logprobs": 2}
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 400
        assert "top_logprobs" in response.json()["error"]["message"]
        too_many = client.post(
            "/v1/chat/completions", json={**body, "logprobs": True, "top_logprobs": 21}
        )
        assert too_many.status_code == 400


def test_completions_take_logprobs_in_their_legacy_shape(daemon: Daemon) -> None:
    with daemon.openai() as client:
        whole = client.completions.create(
            model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0, logprobs=2
        )
        pieces: list[str] = []
        streamed: list[tuple[str, float, int]] = []
        for chunk in client.completions.create(
            model=MODEL,
            prompt="The capital of France is",
            max_tokens=6,
            temperature=0,
            logprobs=2,
            stream=True,
        ):
            for choice in chunk.choices:
                pieces.append(choice.text)
                if choice.logprobs is not None:
                    lp = choice.logprobs
                    streamed += zip(
                        lp.tokens or [], lp.token_logprobs or [], lp.text_offset or [], strict=True
                    )
    lp = whole.choices[0].logprobs
    assert lp is not None
    assert "".join(lp.tokens or []) == whole.choices[0].text
    assert len(lp.tokens or []) == (whole.usage.completion_tokens if whole.usage else -1)
    offsets = lp.text_offset or []
    assert offsets[0] == 0
    tokens, logprobs, tops = lp.tokens or [], lp.token_logprobs or [], lp.top_logprobs or []
    assert all(b - a == len(t) for a, b, t in zip(offsets, offsets[1:], tokens, strict=False))
    for token, logprob, top in zip(tokens, logprobs, tops, strict=True):
        assert logprob <= 0
        assert len(top) == 2
        assert max(top.values()) == pytest.approx(logprob)  # greedy: the best one was taken
        assert token in top
    assert [t for t, _, _ in streamed] == lp.tokens
    assert [o for _, _, o in streamed] == offsets
    assert "".join(pieces) == whole.choices[0].text


def test_echo_with_logprobs_is_a_400(daemon: Daemon) -> None:
    with daemon.client() as client:
        body = {"model": MODEL, "prompt": "Hi", "echo": True, "logprobs": 1}
        response = client.post("/v1/completions", json=body)
    assert response.status_code == 400
    assert "echo" in response.json()["error"]["message"]
