"""Ollama's native API (`/api/...`) through a real clawd and the official `ollama` client.

The client speaks TCP with a bearer token here, as OpenClaw's `ollama` provider does (baseUrl is
the server root); one test also reaches the same routes over the Unix socket. SmolLM2-135M
never calls a tool from a bare question, and Ollama has no `tool_choice` to force one, so the
tool-call tests give it two earlier calls to follow, which it does at temperature 0 (tried: a
bare question, "Call get_weather for Paris", a system prompt asking for calls; all answered in
text). A bare question with tools is still tested for what must hold either way.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest
from pydantic import BaseModel, Field

from tests.conftest import WEATHER_TOOL, Daemon, serve, tcp_config, wait_for

pytestmark = pytest.mark.integration
MODEL = "smollm2-135m"
EMBEDDER = "minilm-l6"
TOKEN = "ollama-face-token"
GREEDY: dict[str, Any] = {"temperature": 0, "num_predict": 24}
CALLING: dict[str, Any] = {"temperature": 0, "num_predict": 60}  # room for a whole call
WEATHER = WEATHER_TOOL
HI = [{"role": "user", "content": "Say hi to the reader."}]


def _call(city: str) -> dict[str, Any]:
    """An assistant turn calling get_weather as Ollama clients send it: object arguments."""
    return {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": city}}}],
    }


# Two questions answered by calls, then a third: SmolLM2 follows with a call.
FOLLOW = [
    {"role": "user", "content": "Weather in Paris?"},
    _call("Paris"),
    {"role": "user", "content": "Weather in London?"},
    _call("London"),
    {"role": "user", "content": "Weather in Rome?"},
]


class Served:
    def __init__(self, daemon: Daemon, port: int) -> None:
        self.daemon = daemon
        self.base_url = f"http://127.0.0.1:{port}"

    def client(self) -> ollama.Client:
        return ollama.Client(
            host=self.base_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120
        )

    def http(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120
        )


@pytest.fixture(scope="module")
def served(embed_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """clawd with SmolLM2 and MiniLM, on its socket and on loopback TCP with a token."""
    base = tmp_path_factory.mktemp("ollama")
    config, port = tcp_config(base, TOKEN)
    with serve(embed_home, base, CLAW_CONFIG=str(config)) as daemon:
        yield Served(daemon, port)


@pytest.fixture
def client(served: Served) -> Iterator[ollama.Client]:
    with served.client() as c:
        yield c


def _served_context(client: ollama.Client) -> int:
    shown = client.show(MODEL)
    info = shown.modelinfo or {}
    return int(info[f"{info['general.architecture']}.context_length"])


# --- models ---------------------------------------------------------------------------------


def test_version(served: Served) -> None:
    with served.http() as http:
        response = http.get("/api/version")
    assert response.status_code == 200
    major, minor, _ = response.json()["version"].split(".")
    assert (int(major), int(minor)) >= (0, 5)  # clients enable tools and `format` schemas


def test_list_shows_installed_models(client: ollama.Client) -> None:
    listed = {m.model: m for m in client.list().models}
    assert {MODEL, EMBEDDER} <= set(listed)
    smol = listed[MODEL]
    assert (smol.size or 0) > 0
    assert smol.digest
    assert smol.details is not None
    assert smol.details.format == "gguf"
    assert smol.details.family == "llama"
    assert smol.details.parameter_size == "134.52M"


def test_show_capabilities_and_context(client: ollama.Client) -> None:
    shown = client.show(f"{MODEL}:latest")  # Ollama's default tag names the same model
    assert shown.capabilities == ["completion", "tools"]
    info = shown.modelinfo or {}
    arch = info["general.architecture"]
    assert arch == "llama"
    served = info[f"{arch}.context_length"]
    assert isinstance(served, int)
    assert 0 < served <= info["clawd.trained_context_length"] == 8192
    assert shown.parameters == f"num_ctx {served}"
    assert shown.template  # the GGUF's chat template
    embedder = client.show(EMBEDDER)
    assert embedder.capabilities == ["embedding"]
    policy = client.show("cascade")  # the shipped policy: its remote tier is asked with tools
    assert policy.capabilities == ["completion", "tools"]


def test_ps_lists_a_loaded_model(client: ollama.Client) -> None:
    client.chat(model=MODEL, messages=HI, options=GREEDY, keep_alive="10m")
    running = {m.model: m for m in client.ps().models}
    assert MODEL in running
    loaded = running[MODEL]
    assert loaded.context_length == _served_context(client)
    assert (loaded.size or 0) > 0
    assert loaded.expires_at is not None
    left = loaded.expires_at - datetime.now(timezone.utc)
    assert timedelta(minutes=9) < left <= timedelta(minutes=10)  # keep_alive "10m"


def test_keep_alive_forever_is_a_date_and_past_any_date_is_refused(served: Served) -> None:
    """A keep_alive beyond any representable expiry (the fuzz test found 1e300 made /api/ps
    fail) is a 400; the longest one, "always", lists with an expiry decades ahead."""
    body: dict[str, Any] = {"model": MODEL, "messages": HI, "max_tokens": 1}
    with served.http() as http:
        bad = http.post("/v1/chat/completions", json={**body, "claw": {"keep_alive": 1e300}})
        assert bad.status_code == 400, bad.text
        assert "keep_alive" in bad.json()["error"]["message"]
        kept = http.post("/v1/chat/completions", json={**body, "claw": {"keep_alive": 2**31}})
        assert kept.status_code == 200, kept.text
        listed = http.get("/api/ps")
    assert listed.status_code == 200, listed.text
    (model,) = [m for m in listed.json()["models"] if m["name"] == MODEL]
    assert datetime.fromisoformat(model["expires_at"]).year > datetime.now(timezone.utc).year + 60


def test_preload_without_messages(client: ollama.Client) -> None:
    reply = client.chat(model=MODEL, messages=[])
    assert reply.done
    assert reply.done_reason == "load"


# --- chat and generate ----------------------------------------------------------------------


def test_chat_answers(client: ollama.Client) -> None:
    reply = client.chat(model=MODEL, messages=HI, options=GREEDY)
    assert reply.done
    assert reply.done_reason in ("stop", "length")
    assert reply.message.role == "assistant"
    assert reply.message.content
    assert reply.message.tool_calls is None
    assert (reply.prompt_eval_count or 0) > 0
    assert 0 < (reply.eval_count or 0) <= 24
    assert (reply.total_duration or 0) > 0


def test_chat_streams_chunks_then_done(client: ollama.Client) -> None:
    # A question of its own: a repeated greedy one is replayed whole from the answer cache.
    ask = [{"role": "user", "content": "Name three colours."}]
    chunks = list(client.chat(model=MODEL, messages=ask, options=GREEDY, stream=True))
    *parts, last = chunks
    assert len(parts) >= 2
    assert not any(part.done for part in parts)
    assert all(part.prompt_eval_count is None for part in parts)
    assert last.done
    assert last.done_reason in ("stop", "length")
    assert (last.prompt_eval_count or 0) > 0
    assert (last.eval_count or 0) > 0
    streamed = "".join(part.message.content or "" for part in chunks)
    whole = client.chat(model=MODEL, messages=ask, options=GREEDY)
    assert streamed == whole.message.content  # greedy: the same answer either way


def test_generate(client: ollama.Client) -> None:
    reply = client.generate(model=MODEL, prompt="The capital of France is", options=GREEDY)
    assert reply.done
    assert reply.response
    assert (reply.eval_count or 0) > 0
    raw = client.generate(
        model=MODEL, prompt="The capital of France is", raw=True, options=GREEDY, stream=True
    )
    chunks = list(raw)
    assert chunks[-1].done
    assert (chunks[-1].prompt_eval_count or 0) > 0
    assert "".join(c.response or "" for c in chunks).strip()


# --- tools ----------------------------------------------------------------------------------


def test_tool_call_has_object_arguments(client: ollama.Client) -> None:
    reply = client.chat(model=MODEL, messages=FOLLOW, tools=[WEATHER], options=CALLING)
    assert reply.done_reason == "stop"  # Ollama's, also for a call
    calls = reply.message.tool_calls or []
    assert len(calls) == 1
    assert calls[0].function.name == "get_weather"
    assert dict(calls[0].function.arguments) == {"city": "Rome"}
    assert "<tool_call>" not in (reply.message.content or "")


def test_streamed_tool_call_arrives_whole(served: Served) -> None:
    """Raw NDJSON, to see the fields the client drops: one line carries the call, with
    `index` and `id`, and the last line is `done`."""
    body = {
        "model": MODEL,
        "messages": FOLLOW,
        "tools": [WEATHER],
        "options": CALLING,
    }
    with served.http() as http, http.stream("POST", "/api/chat", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in response.iter_lines() if line]
    with_calls = [line for line in lines if line["message"].get("tool_calls")]
    assert len(with_calls) == 1
    [call] = with_calls[0]["message"]["tool_calls"]
    assert call["function"] == {"index": 0, "name": "get_weather", "arguments": {"city": "Rome"}}
    assert call["id"]
    assert not with_calls[0]["done"]
    last = lines[-1]
    assert last["done"] is True
    assert last["done_reason"] == "stop"
    assert last["prompt_eval_count"] > 0
    assert last["eval_count"] > 0
    assert "tool_call" not in "".join(line["message"]["content"] for line in lines)


def test_tools_offered_answer_is_text_or_valid_call(client: ollama.Client) -> None:
    """No forced call in Ollama: whatever SmolLM2 does, the markup never leaks into content
    and a call it makes is a valid one."""
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = client.chat(model=MODEL, messages=ask, tools=[WEATHER], options=GREEDY)
    assert reply.done
    assert "<tool_call>" not in (reply.message.content or "")
    for call in reply.message.tool_calls or ():
        assert call.function.name == "get_weather"
        assert isinstance(call.function.arguments["city"], str)
    assert reply.message.content or reply.message.tool_calls


def test_tool_result_round_trip(client: ollama.Client) -> None:
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        _call("Paris"),
        {"role": "tool", "tool_name": "get_weather", "content": "21 degrees and sunny"},
    ]
    reply = client.chat(model=MODEL, messages=messages, tools=[WEATHER], options=GREEDY)
    assert reply.done
    assert (reply.prompt_eval_count or 0) > 20
    assert reply.message.content or reply.message.tool_calls
    # The same history as the client's own types send it.
    typed = [
        ollama.Message(role="user", content="What is the weather in Paris?"),
        ollama.Message(
            role="assistant",
            tool_calls=[
                ollama.Message.ToolCall(
                    function=ollama.Message.ToolCall.Function(
                        name="get_weather", arguments={"city": "Paris"}
                    )
                )
            ],
        ),
        ollama.Message(role="tool", tool_name="get_weather", content="21 degrees and sunny"),
    ]
    again = client.chat(model=MODEL, messages=typed, tools=[WEATHER], options=GREEDY)
    assert again.message.content == reply.message.content
    assert again.prompt_eval_count == reply.prompt_eval_count


def test_the_next_turn_starts_from_the_answer_computed_ahead(
    fresh_home: Path, tmp_path: Path
) -> None:
    """OpenClaw's `ollama` provider shape (a context message last, moved behind the new turns
    on the next call): after a whole answer clawd computes it as the next request will render
    it, so that request reuses more than the whole first prompt, the answer included."""
    context = {"role": "user", "content": "(Monday.)"}
    ask = [  # an agent's preamble is long: short prompts are not worth computing ahead
        {"role": "system", "content": " ".join(["You are a careful, friendly writer."] * 12)},
        {"role": "user", "content": "Write two sentences about the sea."},
    ]
    config, port = tcp_config(tmp_path, TOKEN)
    with serve(fresh_home, tmp_path, CLAW_CONFIG=str(config)) as daemon:
        face = Served(daemon, port)
        with face.client() as client:
            first = client.chat(model=MODEL, messages=[*ask, context], options=GREEDY)
            assert first.message.content

            def anticipated() -> int:
                with daemon.client() as http:
                    loaded = http.get("/health").json()["loaded"]
                return sum(int(m["anticipated_tokens"]) for m in loaded)

            wait_for("the next turn's prefix to be computed", lambda: anticipated() > 0)
            second = client.chat(
                model=MODEL,
                messages=[
                    *ask,
                    {"role": "assistant", "content": first.message.content},
                    {"role": "user", "content": "And one about rivers?"},
                    context,
                ],
                options=GREEDY,
            )
        with daemon.client() as http:
            exported = http.get("/admin/ledger/export", params={"format": "json"})
    assert exported.status_code == 200, exported.text
    (last,) = [r for r in exported.json() if r["prompt_tokens"] == second.prompt_eval_count]
    assert last["prefill_tokens_saved"] > (first.prompt_eval_count or 0)
    assert last["prefill_tokens_saved"] < last["prompt_tokens"]


# --- format ---------------------------------------------------------------------------------


def test_format_json_gives_an_object(client: ollama.Client) -> None:
    ask = [{"role": "user", "content": "Describe Paris as JSON."}]
    reply = client.chat(
        model=MODEL, messages=ask, format="json", options={"temperature": 0, "num_predict": 80}
    )
    assert reply.done_reason == "stop"  # the grammar closed the object
    assert isinstance(json.loads(reply.message.content or ""), dict)


class City(BaseModel):
    name: str = Field(max_length=30)
    rank: int


def test_format_schema_gives_a_valid_instance(client: ollama.Client) -> None:
    ask = "Name a big city and its rank by size."
    reply = client.generate(
        model=MODEL,
        prompt=ask,
        format=City.model_json_schema(),
        options={"temperature": 0, "num_predict": 60},
    )
    city = City.model_validate_json(reply.response or "")
    assert city.name
    chat = client.chat(
        model=MODEL,
        messages=[{"role": "user", "content": ask}],
        format=City.model_json_schema(),
        options={"temperature": 0, "num_predict": 60},
        stream=True,
    )
    City.model_validate_json("".join(chunk.message.content or "" for chunk in chat))


# --- options --------------------------------------------------------------------------------


def test_num_predict_limits_eval_count(client: ollama.Client) -> None:
    reply = client.chat(model=MODEL, messages=HI, options={"temperature": 0, "num_predict": 3})
    assert reply.eval_count == 3
    assert reply.done_reason == "length"


def test_seed_repeats_a_sampled_answer(served: Served) -> None:
    """temperature 1 with a seed: the same text twice. The answer cache is off for these
    (`claw.cache`), so both are sampled, not one replayed."""

    def sample(seed: int) -> str:
        body = {
            "model": MODEL,
            "prompt": "Write a word.",
            "stream": False,
            "options": {
                "temperature": 1.0,
                "top_k": 0,
                "top_p": 1.0,
                "seed": seed,
                "num_predict": 16,
            },
            "claw": {"cache": False},
        }
        with served.http() as http:
            response = http.post("/api/generate", json=body)
        assert response.status_code == 200, response.text
        text: str = response.json()["response"]
        return text

    first = sample(1234)
    assert first
    assert sample(1234) == first


def test_stop_ends_the_answer_before_it(client: ollama.Client) -> None:
    free = client.generate(model=MODEL, prompt="Count: one, two, three,", options=GREEDY)
    text = free.response or ""
    words = text.split()
    assert len(words) >= 4, text
    stop = words[2]
    cut = client.generate(
        model=MODEL, prompt="Count: one, two, three,", options={**GREEDY, "stop": [stop]}
    )
    assert cut.done_reason == "stop"
    assert cut.response == text[: text.index(stop)]


def test_num_ctx_above_the_profile_is_clamped(client: ollama.Client) -> None:
    served = _served_context(client)
    reply = client.chat(
        model=MODEL, messages=HI, options={**GREEDY, "num_ctx": served * 64, "num_gpu": 99}
    )
    assert reply.done
    assert reply.message.content
    running = {m.model: m for m in client.ps().models}
    assert running[MODEL].context_length == served


def test_think_false_is_fine_and_think_true_is_refused(client: ollama.Client) -> None:
    reply = client.chat(model=MODEL, messages=HI, options=GREEDY, think=False)
    assert reply.message.content
    with pytest.raises(ollama.ResponseError) as refused:
        client.chat(model=MODEL, messages=HI, options=GREEDY, think=True)
    assert refused.value.status_code == 400
    assert "thinking" in refused.value.error


# --- embeddings -----------------------------------------------------------------------------


def test_embed(client: ollama.Client) -> None:
    result = client.embed(model=EMBEDDER, input=["a cat sat on the mat", "stock prices fell"])
    assert len(result.embeddings) == 2
    for vector in result.embeddings:
        assert len(vector) == 384
        assert abs(sum(x * x for x in vector) - 1.0) < 1e-3  # unit length, as Ollama's
    assert (result.prompt_eval_count or 0) > 0
    one = client.embed(model=EMBEDDER, input="a cat sat on the mat")
    assert one.embeddings[0] == pytest.approx(result.embeddings[0], abs=1e-5)


def test_embed_with_a_chat_model_is_refused(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as refused:
        client.embed(model=MODEL, input="hello")
    assert refused.value.status_code == 400
    assert "embedding model" in refused.value.error


# --- errors ---------------------------------------------------------------------------------


def test_unknown_model_is_a_404(client: ollama.Client) -> None:
    for name, call in (
        ("llama3:8b", lambda: client.chat(model="llama3:8b", messages=HI)),
        ("no-such-model", lambda: client.generate(model="no-such-model", prompt="hi")),
        ("no-such-model", lambda: client.show("no-such-model")),
    ):
        with pytest.raises(ollama.ResponseError) as missing:
            call()
        assert missing.value.status_code == 404
        assert name in missing.value.error


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/api/chat", b"{not json", "not valid JSON"),
        ("/api/chat", b'{"messages": []}', "model"),
        ("/api/generate", b'{"model": "smollm2-135m", "prompt": "hi", "options": {"top_p": 7}}',
         "top_p"),
        ("/api/chat", json.dumps({"model": MODEL, "messages": HI, "tools": [WEATHER, WEATHER]})
         .encode(), "unique"),
        ("/api/chat", json.dumps({"model": MODEL, "messages": HI, "format": "yaml"}).encode(),
         "format"),
        ("/api/embed", b'{"model": "minilm-l6", "input": ""}', "must not be empty"),
    ],
)  # fmt: skip
def test_bad_input_is_a_400_in_ollamas_shape(
    served: Served, path: str, body: bytes, needle: str
) -> None:
    with served.http() as http:
        response = http.post(path, content=body)
    assert response.status_code == 400, response.text
    error = response.json()
    assert set(error) == {"error"}
    assert isinstance(error["error"], str)
    assert needle in error["error"]


def test_errors_outside_routes_take_ollamas_shape(served: Served) -> None:
    with served.http() as http:
        missing = http.get("/api/nothing-here")
    assert missing.status_code == 404
    assert isinstance(missing.json()["error"], str)
    with httpx.Client(base_url=served.base_url) as anonymous:
        denied = anonymous.post("/api/chat", json={"model": MODEL, "messages": HI})
        openai_denied = anonymous.get("/v1/models")
    assert denied.status_code == 401
    assert isinstance(denied.json()["error"], str)
    assert openai_denied.status_code == 401
    assert openai_denied.json()["error"]["code"] == "invalid_api_key"  # OpenAI's shape there


def test_the_unix_socket_serves_the_same_api(served: Served) -> None:
    transport = httpx.HTTPTransport(uds=str(served.daemon.socket))
    with ollama.Client(host="http://clawd", transport=transport, timeout=120) as local:
        reply = local.chat(model=MODEL, messages=HI, options=GREEDY)
    assert reply.done
    assert reply.message.content
