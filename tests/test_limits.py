"""One oversized request must not stall every app.

- the body cap: 413 `request_too_large` before anything is parsed, for a declared Content-Length
  and for a chunked body (counted as it streams), over the Unix socket and over TCP; a body
  within the cap passes whole, and upload routes are exempt;
- prompts that cannot fit the context are refused before they are tokenized (a lower bound on
  their tokens from their byte length), with the usual `context_length_exceeded`;
- a long prompt is tokenized off the model's thread: the requests behind it are served meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from starlette.types import Message, Receive, Scope, Send

from clawctl.api.limits import BodyLimit
from clawctl.engines.base import (
    ChatTurn,
    EngineSettings,
    Finished,
    PreparedPrompt,
    PreparesConcurrently,
    Prompt,
    SamplingParams,
    TokenEvent,
    generate,
)
from clawctl.errors import ContextOverflow
from clawctl.runtime.jobs import Failed, Started
from clawctl.runtime.preparer import LONG_PROMPT_CHARS
from tests.conftest import Daemon, serve, tcp_config
from tests.fakes import FakeEngine
from tests.test_scheduler import collect, manager

CAP = 16 << 20  # the shipped default, [daemon] max_body_bytes
MODEL = "smollm2-135m"


# --- the body cap, in-process -------------------------------------------------------------


@dataclass
class Echo:
    """An ASGI app that answers with how many body bytes it received, and in how many messages."""

    calls: int = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls += 1
        size, messages = 0, 0
        while True:
            message = await receive()
            messages += 1
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = json.dumps({"size": size, "messages": messages}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})


def _post(app: BodyLimit, path: str, content: bytes | AsyncIterator[bytes]) -> httpx.Response:
    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://clawd") as client:
            return await client.post(path, content=content)

    return asyncio.run(call())


async def _chunks(count: int, size: int) -> AsyncIterator[bytes]:
    for _ in range(count):
        yield b"x" * size


def _assert_413(response: httpx.Response) -> None:
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "request_too_large"
    assert error["type"] == "invalid_request_error"
    assert "max_body_bytes" in error["message"]


def test_declared_length_over_the_cap_is_refused_unread() -> None:
    echo = Echo()
    _assert_413(_post(BodyLimit(echo, max_bytes=1000), "/v1/chat/completions", b"x" * 1001))
    assert echo.calls == 0


def test_chunked_body_is_counted_as_it_streams() -> None:
    echo = Echo()
    response = _post(BodyLimit(echo, max_bytes=1000), "/v1/completions", _chunks(11, 100))
    _assert_413(response)
    assert echo.calls == 0


def test_body_within_the_cap_reaches_the_app_whole() -> None:
    echo = Echo()
    app = BodyLimit(echo, max_bytes=1000)
    exact = _post(app, "/v1/completions", b"x" * 1000)
    chunked = _post(app, "/v1/completions", _chunks(10, 100))
    assert exact.status_code == chunked.status_code == 200
    assert exact.json() == {"size": 1000, "messages": 1}
    assert chunked.json() == {"size": 1000, "messages": 1}  # handed over as one message


@pytest.mark.parametrize(
    "path", ["/admin/models/upload", "/admin/adapters/upload", "/admin/snapshots/import"]
)
def test_upload_routes_are_exempt(path: str) -> None:
    echo = Echo()
    response = _post(BodyLimit(echo, max_bytes=1000), path, _chunks(50, 100))
    assert response.status_code == 200
    assert response.json()["size"] == 5000


def test_later_receives_reach_the_server() -> None:
    """After the body, the app still hears the client disconnect (how a streaming response
    notices that its reader left)."""
    heard: list[str] = []
    incoming: list[Message] = [
        {"type": "http.request", "body": b"ab", "more_body": True},
        {"type": "http.request", "body": b"c", "more_body": False},
        {"type": "http.disconnect"},
    ]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        heard.append(repr(await receive()))
        heard.append((await receive())["type"])

    async def receive() -> Message:
        return incoming.pop(0)

    async def send(message: Message) -> None:
        raise AssertionError("nothing is sent")

    scope: Scope = {"type": "http", "path": "/v1/completions", "headers": []}
    asyncio.run(BodyLimit(app, max_bytes=10)(scope, receive, send))
    assert heard == [
        repr({"type": "http.request", "body": b"abc", "more_body": False}),
        "http.disconnect",
    ]


# --- long prompts are tokenized off the model's thread -------------------------------------


@dataclass
class GatedEngine(FakeEngine):
    """A fake engine whose off-thread preparation waits at a gate the test opens."""

    gate: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)
    preparers: set[int] = field(default_factory=set)

    def prepare_concurrently(self, prompt: Prompt) -> PreparedPrompt:
        self.preparers.add(threading.get_ident())
        self.entered.set()
        assert self.gate.wait(60)
        words = (prompt.text or "").split()
        if len(words) >= self.n_ctx:
            raise ContextOverflow("too long for the fake context", param="prompt")
        return PreparedPrompt([self.vocab.setdefault(w, len(self.vocab)) for w in words])


class GatedLoader:
    def __init__(self) -> None:
        self.engines: list[GatedEngine] = []

    def __call__(self, settings: EngineSettings) -> GatedEngine:
        engine = GatedEngine(settings)
        self.engines.append(engine)
        return engine


LONG = "start" + " " * LONG_PROMPT_CHARS + "end"


def test_requests_behind_a_long_prompt_are_served_while_it_is_tokenized() -> None:
    loader = GatedLoader()
    assert isinstance(GatedEngine(EngineSettings(Path("x"), 512, 64, 1)), PreparesConcurrently)

    async def scenario() -> None:
        mgr = manager(loader, ["a"])  # type: ignore[arg-type]
        big = mgr.submit("a", Prompt(text=LONG), SamplingParams())
        assert await asyncio.to_thread(lambda: _wait_engine(loader).entered.wait(60))
        # The long prompt is being tokenized (the gate is shut): short ones come and go.
        for i in range(3):
            events = await asyncio.wait_for(collect(mgr, "a", f"one two {i}"), 60)
            assert [e.text for e in events if isinstance(e, TokenEvent)] == [
                "one ",
                "two ",
                f"{i} ",
            ]
            assert isinstance(events[-1], Finished)
        assert big.job.events.empty()  # not started: still being prepared
        loader.engines[0].gate.set()
        events = [event async for event in big.events()]
        assert isinstance(events[0], Started)
        assert events[0].prompt_tokens == 2
        assert [e.text for e in events if isinstance(e, TokenEvent)] == ["start ", "end "]
        await mgr.stop()

    asyncio.run(scenario())
    [engine] = loader.engines
    assert len(engine.threads) == 1  # every other call stayed on the model's thread
    assert engine.preparers
    assert engine.preparers.isdisjoint(engine.threads)
    assert engine.closed


def test_a_long_prompt_that_cannot_fit_fails_from_the_preparer() -> None:
    loader = GatedLoader()

    async def scenario() -> None:
        mgr = manager(loader, ["a"])  # type: ignore[arg-type]
        handle = mgr.submit("a", Prompt(text="w " * LONG_PROMPT_CHARS), SamplingParams())
        assert await asyncio.to_thread(lambda: _wait_engine(loader).entered.wait(60))
        loader.engines[0].gate.set()
        events = [event async for event in handle.events()]
        assert len(events) == 1
        assert isinstance(events[0], Failed)
        assert events[0].error.code == "context_length_exceeded"
        assert (await collect(mgr, "a", "still here"))[-1].finish_reason == "length"  # type: ignore[union-attr]
        await mgr.stop()

    asyncio.run(scenario())


def test_stopping_waits_for_a_prompt_being_tokenized() -> None:
    loader = GatedLoader()

    async def scenario() -> None:
        mgr = manager(loader, ["a"])  # type: ignore[arg-type]
        handle = mgr.submit("a", Prompt(text=LONG), SamplingParams())
        assert await asyncio.to_thread(lambda: _wait_engine(loader).entered.wait(60))
        stopping = asyncio.create_task(mgr.stop(timeout=60))
        await asyncio.sleep(0)  # the worker has been told to stop while the gate is shut
        loader.engines[0].gate.set()
        events = [event async for event in handle.events()]
        assert isinstance(events[-1], Finished)  # answered, not dropped at shutdown
        await stopping

    asyncio.run(scenario())
    assert loader.engines[0].closed


def _wait_engine(loader: GatedLoader) -> GatedEngine:
    """The engine, once the model's thread has loaded it."""
    while not loader.engines:
        threading.Event().wait(0.01)
    return loader.engines[0]


# --- the llama engine: the early refusal, and tokenizing beside a decoding thread ------------

UNIT = "\n" + " " * 80  # one token of SmolLM2's vocabulary, its longest (81 bytes)


@pytest.fixture(scope="module")
def model_thread(smollm2_gguf: Path) -> Iterator[ModelThread]:
    thread = ModelThread(smollm2_gguf)
    yield thread
    thread.close()


class ModelThread:
    """A llama engine on a thread of its own, the way a worker drives it: it prepares prompts
    handed to it, and while `decoding` is on, runs greedy generations one after another."""

    def __init__(self, path: Path) -> None:
        from clawctl.engines.llama.engine import load_llama_engine

        settings = EngineSettings(path, n_ctx=4096, n_batch=512, n_threads=2, parallel=2)
        self.engine = load_llama_engine(settings)  # loaded here, used only by the thread below
        self.steps = 0
        self.decoding = threading.Event()
        self._calls: queue.SimpleQueue[Prompt | None] = queue.SimpleQueue()
        self._results: queue.SimpleQueue[PreparedPrompt | ContextOverflow] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        params = SamplingParams(max_tokens=64, temperature=0)
        while True:
            try:
                prompt = self._calls.get(timeout=0.01)
            except queue.Empty:
                prompt = None
            else:
                if prompt is None:
                    break
                try:
                    self._results.put(self.engine.prepare(prompt))
                except ContextOverflow as exc:
                    self._results.put(exc)
            if self.decoding.is_set():
                prepared = self.engine.prepare(Prompt(text="Once upon a time"))
                for _ in generate(self.engine, prepared, params):
                    self.steps += 1

    def on_thread(self, prompt: Prompt) -> PreparedPrompt | ContextOverflow:
        """`prepare` on the model's own thread."""
        self._calls.put(prompt)
        return self._results.get(timeout=120)

    def close(self) -> None:
        self._calls.put(None)
        self.thread.join(60)
        self.engine.close()


def test_prompts_that_cannot_fit_are_refused_before_tokenizing(model_thread: ModelThread) -> None:
    n_ctx = model_thread.engine.n_ctx
    fits = model_thread.on_thread(Prompt(text=UNIT * (n_ctx - 96)))
    assert isinstance(fits, PreparedPrompt)
    assert len(fits.tokens) == n_ctx - 96  # the bound is tight: each unit is one token
    early = model_thread.on_thread(Prompt(text=UNIT * (n_ctx + 4)))
    assert isinstance(early, ContextOverflow)
    assert "at least" in early.message  # refused from its length alone
    huge = model_thread.on_thread(Prompt(chat=(ChatTurn("user", "word " * 2_000_000),)))
    assert isinstance(huge, ContextOverflow)
    assert "at least" in huge.message
    assert huge.param == "messages"
    counted = model_thread.on_thread(Prompt(text="lorem ipsum dolor sit amet " * 2000))
    assert isinstance(counted, ContextOverflow)  # within the bound: tokenized, and counted
    assert "at least" not in counted.message
    assert f"holds {n_ctx}" in counted.message
    tokens = model_thread.on_thread(Prompt(tokens=tuple(range(n_ctx))))
    assert isinstance(tokens, ContextOverflow)


def test_tokenizing_beside_the_decoding_thread_gives_the_same_tokens(
    model_thread: ModelThread,
) -> None:
    prompts = [
        Prompt(text=UNIT * 3000),
        Prompt(text="The quick brown fox jumps over the lazy dog. " * 80),
        Prompt(chat=(ChatTurn("system", "Be brief."), ChatTurn("user", "hello " * 500))),
    ]
    expected = [model_thread.on_thread(p) for p in prompts]
    model_thread.decoding.set()
    try:
        while model_thread.steps == 0:
            threading.Event().wait(0.01)
        engine = model_thread.engine
        assert isinstance(engine, PreparesConcurrently)
        before = model_thread.steps
        concurrent = [engine.prepare_concurrently(p) for p in prompts for _ in range(3)]
        during = model_thread.steps - before
    finally:
        model_thread.decoding.clear()
    assert concurrent == [e for e in expected for _ in range(3)]
    assert during > 0  # the model's thread went on decoding meanwhile


# --- a real clawd: the cap over both transports, and the early refusal ----------------------


@dataclass
class Capped:
    daemon: Daemon
    tcp_url: str


@pytest.fixture(scope="module")
def capped(session_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Capped]:
    """A real clawd with the default cap, on its socket and on TCP with a token."""
    directory = tmp_path_factory.mktemp("capped")
    config, port = tcp_config(directory, "cap-token")
    with serve(session_home, directory, CLAW_CONFIG=str(config)) as daemon:
        yield Capped(daemon, f"http://127.0.0.1:{port}")


def _chat_body(size: int) -> bytes:
    """A chat request of exactly `size` bytes, nearly all of it the user's message."""
    head = b'{"model": "%s", "max_tokens": 1, "messages": [{"role": "user", "content": "' % (
        MODEL.encode()
    )
    tail = b'"}]}'
    return (
        head
        + b"a " * ((size - len(head) - len(tail)) // 2)
        + b"a" * ((size - len(head) - len(tail)) % 2)
        + tail
    )


@pytest.mark.integration
def test_oversized_bodies_get_413_on_both_transports(capped: Capped) -> None:
    over = _chat_body(CAP + 1)
    with capped.daemon.client() as unix:
        _assert_413(unix.post("/v1/chat/completions", content=over))

        def stream() -> Iterator[bytes]:
            for start in range(0, len(over), 1 << 20):
                yield over[start : start + (1 << 20)]

        _assert_413(unix.post("/v1/chat/completions", content=stream()))  # chunked
    tcp = httpx.post(
        f"{capped.tcp_url}/v1/chat/completions",
        content=over,
        headers={"Authorization": "Bearer cap-token"},
        timeout=120,
    )
    _assert_413(tcp)
    assert capped.daemon.complete("Still serving:", max_tokens=2)["usage"]["completion_tokens"] >= 1


@pytest.mark.integration
def test_a_body_at_the_cap_is_read_and_refused_for_its_context(capped: Capped) -> None:
    """16 MiB of chat is parsed, then refused from its length alone (never tokenized: that took
    minutes before), with the same error as a prompt that was counted."""
    body = _chat_body(CAP)
    assert len(body) == CAP
    with capped.daemon.client() as unix:
        response = unix.post("/v1/chat/completions", content=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "at least" in error["message"]
    tcp = httpx.post(
        f"{capped.tcp_url}/v1/completions",
        json={"model": MODEL, "prompt": "x" * (CAP // 2), "max_tokens": 1},
        headers={"Authorization": "Bearer cap-token"},
        timeout=120,
    )
    assert tcp.status_code == 400
    assert tcp.json()["error"]["code"] == "context_length_exceeded"
