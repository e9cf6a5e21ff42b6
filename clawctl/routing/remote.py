"""The remote tier: any OpenAI-compatible server, reached with the official `openai` client.

Streaming is passed through piece by piece. Failures (connection refused, timeouts, 5xx/429,
bodies that are not OpenAI-shaped, an answer with no text) are retried with exponential backoff,
but only before the first piece of text: once text has reached the caller a retry would repeat
it. `timeout_seconds` bounds each read (so a slow server fails in time) and, across retries, the
wait for the first token. A circuit breaker per tier stops calling a server that keeps failing for
`breaker_cooldown_seconds`, so requests fall back at once instead of each waiting out a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clawctl.engines.base import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, ChatTurn, ToolSpec
from clawctl.schemas.policy import Tier


class RemoteFailure(Exception):
    """The remote tier could not answer; `message` says why (for logs and `claw.reason`)."""

    def __init__(self, message: str, after_text: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.after_text = after_text


@dataclass(frozen=True)
class RemoteDone:
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    usage_reported: bool


class CircuitBreaker:
    """Closed until `failures` in a row; then open for `cooldown` seconds; then one trial."""

    def __init__(self, failures: int, cooldown: float) -> None:
        self.failures = failures
        self.cooldown = cooldown
        self._consecutive = 0
        self._opened_at: float | None = None

    @property
    def open(self) -> bool:
        if self._opened_at is None:
            return False
        # after the cooldown: half-open, one request may try
        return time.monotonic() - self._opened_at < self.cooldown

    def record(self, ok: bool) -> None:
        if ok:
            self._consecutive = 0
            self._opened_at = None
            return
        self._consecutive += 1
        if self._consecutive >= self.failures:
            self._opened_at = time.monotonic()


@dataclass(frozen=True)
class RemoteRequest:
    """What the remote tier is asked: chat messages (with the tools offered, the calls made and
    their results) or a plain text prompt. `tool_choice` and the JSON output are the client's
    own request, passed on: the remote server applies its own constraints."""

    messages: tuple[ChatTurn, ...] | None
    text: str | None
    max_tokens: int | None
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: str | None = None  # "auto", "required" or a tool's name; None: unset
    parallel_tool_calls: bool = True
    json_output: bool = False
    response_schema: str | None = None  # JSON text

    def chat_arguments(self) -> dict[str, Any]:
        """The chat request's messages, tools and output format in OpenAI's shape."""
        arguments: dict[str, Any] = {"messages": [_message(t) for t in self.messages or ()]}
        if self.tools:
            arguments["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": t.name,
                        "description": t.description,
                        "parameters": json.loads(t.parameters),
                    },
                }
                for t in self.tools
            ]
            arguments["parallel_tool_calls"] = self.parallel_tool_calls
            if self.tool_choice in ("auto", "required"):
                arguments["tool_choice"] = self.tool_choice
            elif self.tool_choice is not None:
                function = {"name": self.tool_choice}
                arguments["tool_choice"] = {"type": "function", "function": function}
        if self.response_schema is not None:
            schema = {"name": "answer", "schema": json.loads(self.response_schema)}
            arguments["response_format"] = {"type": "json_schema", "json_schema": schema}
        elif self.json_output:
            arguments["response_format"] = {"type": "json_object"}
        return arguments


def _message(turn: ChatTurn) -> dict[str, Any]:
    message: dict[str, Any] = {"role": turn.role, "content": turn.content}
    if turn.tool_calls:
        message["content"] = turn.content or None
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in turn.tool_calls
        ]
    if turn.tool_call_id is not None:
        message["tool_call_id"] = turn.tool_call_id
    if turn.name is not None and turn.role != "tool":
        message["name"] = turn.name
    return message


class _CallPieces:
    """The remote's streamed `delta.tool_calls`, gathered by index: each call's name and its
    argument fragments. A finished call becomes the `<tool_call>` text the local tiers write,
    so one parser turns every tier's calls into the API's `tool_calls`."""

    def __init__(self) -> None:
        self._names: dict[int, str] = {}
        self._arguments: dict[int, list[str]] = {}

    def add(self, deltas: Any) -> None:
        for delta in deltas or ():
            index = int(getattr(delta, "index", 0) or 0)
            function = getattr(delta, "function", None)
            if function is None:
                continue
            if function.name:
                self._names[index] = self._names.get(index, "") + function.name
            if function.arguments:
                self._arguments.setdefault(index, []).append(function.arguments)

    def texts(self, tier: str) -> list[str]:
        texts = []
        for index in sorted(self._names):
            raw = "".join(self._arguments.get(index, ())) or "{}"
            try:
                arguments = json.loads(raw)
            except ValueError:
                raise RemoteFailure(
                    f"remote tier {tier} sent tool-call arguments that are not JSON"
                ) from None
            if not isinstance(arguments, dict):
                raise RemoteFailure(
                    f"remote tier {tier} sent tool-call arguments that are not an object"
                )
            call = json.dumps({"name": self._names[index], "arguments": arguments})
            texts.append(f"{TOOL_CALL_OPEN}\n{call}\n{TOOL_CALL_CLOSE}")
        return texts


class RemoteTier:
    def __init__(self, tier: Tier, env: Mapping[str, str], transport: Any = None) -> None:
        """`transport`: an httpx async transport for the SDK's HTTP client (tests route the
        remote tier to an in-process ASGI app with `httpx.ASGITransport`); None: the network."""
        self.tier = tier
        self.breaker = CircuitBreaker(tier.breaker_failures, tier.breaker_cooldown_seconds)
        self._env = env
        self._transport = transport
        self._client: Any = None

    def configured(self) -> str | None:
        """Why this tier cannot be used, or None when it can."""
        if self._base_url() is None:
            return f"remote tier {self.tier.name}: set {self.tier.base_url_env} to its base URL"
        return None

    def _base_url(self) -> str | None:
        if self.tier.base_url:
            return self.tier.base_url
        return self._env.get(self.tier.base_url_env or "") or None

    def _api_key(self) -> str:
        tier = self.tier
        if tier.api_key_file:
            try:
                return Path(tier.api_key_file).expanduser().read_text().strip()
            except OSError as exc:
                raise RemoteFailure(f"cannot read API key file: {exc.strerror}") from None
        if tier.api_key_env:
            return self._env.get(tier.api_key_env, "") or "none"
        return "none"

    def _get_client(self) -> Any:
        if self._client is None:
            import openai

            http_client: Any = None
            if self._transport is not None:
                import httpx

                http_client = httpx.AsyncClient(transport=self._transport)
            self._client = openai.AsyncOpenAI(
                base_url=self._base_url(),
                api_key=self._api_key(),
                timeout=self.tier.timeout_seconds,
                max_retries=0,  # retries are ours: only before the first token
                http_client=http_client,
            )
        return self._client

    async def stream(self, request: RemoteRequest) -> AsyncGenerator[str | RemoteDone, None]:
        """Text pieces, then one `RemoteDone`; raises `RemoteFailure`."""
        problem = self.configured()
        if problem:
            raise RemoteFailure(problem)
        if self.breaker.open:
            raise RemoteFailure(f"remote tier {self.tier.name} is failing; circuit open")
        deadline = time.monotonic() + self.tier.timeout_seconds
        attempt = 0
        while True:
            sent_text = False
            try:
                async with contextlib.aclosing(self._one_attempt(request, deadline)) as pieces:
                    async for item in pieces:
                        if isinstance(item, str):
                            sent_text = True
                        yield item
                self.breaker.record(True)
                return
            except RemoteFailure as failure:
                retryable = not sent_text and attempt < self.tier.retries
                backoff = 0.25 * (2**attempt)
                if not retryable or time.monotonic() + backoff >= deadline:
                    self.breaker.record(False)
                    raise RemoteFailure(failure.message, after_text=sent_text) from None
                attempt += 1
                await asyncio.sleep(backoff)

    async def _one_attempt(
        self, request: RemoteRequest, deadline: float
    ) -> AsyncGenerator[str | RemoteDone, None]:
        import openai

        client = self._get_client()
        common: dict[str, Any] = {
            "model": self.tier.model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": request.temperature,
            "top_p": request.top_p,
        }
        if request.max_tokens is not None:
            common["max_tokens"] = request.max_tokens
        if request.stop:
            common["stop"] = list(request.stop)
        if request.seed is not None:
            common["seed"] = request.seed
        chat = request.messages is not None
        stream: Any = None
        try:
            if chat:
                create = client.chat.completions.create(**request.chat_arguments(), **common)
            else:
                create = client.completions.create(prompt=request.text or "", **common)
            stream = await asyncio.wait_for(create, max(0.01, deadline - time.monotonic()))
            pieces, finish, usage, calls = 0, None, None, _CallPieces()
            iterator = stream.__aiter__()
            while True:
                try:
                    if pieces == 0:  # the first token is bounded by the overall deadline
                        remaining = max(0.01, deadline - time.monotonic())
                        chunk = await asyncio.wait_for(iterator.__anext__(), remaining)
                    else:  # later ones by the client's per-read timeout
                        chunk = await iterator.__anext__()
                except StopAsyncIteration:
                    break
                if getattr(chunk, "usage", None) is not None:
                    usage = chunk.usage
                for choice in chunk.choices or ():
                    text = choice.delta.content if chat else choice.text
                    if text:
                        pieces += 1
                        yield text
                    if chat:
                        calls.add(choice.delta.tool_calls)
                    if choice.finish_reason:
                        finish = choice.finish_reason
        except (RemoteFailure, GeneratorExit):
            raise
        except (asyncio.TimeoutError, openai.APITimeoutError):
            raise RemoteFailure(f"remote tier {self.tier.name} timed out") from None
        except openai.APIStatusError as exc:
            raise RemoteFailure(
                f"remote tier {self.tier.name} answered {exc.status_code}"
            ) from None
        except openai.APIConnectionError:
            raise RemoteFailure(f"remote tier {self.tier.name} is unreachable") from None
        except Exception as exc:  # malformed bodies surface as many exception types
            raise RemoteFailure(
                f"remote tier {self.tier.name} sent an unusable answer ({type(exc).__name__})"
            ) from None
        finally:
            if stream is not None:  # a caller that went away stops the remote generation too
                await stream.close()
        for text in calls.texts(self.tier.name):
            pieces += 1
            yield text
        if finish is None or (pieces == 0 and finish != "length"):
            raise RemoteFailure(f"remote tier {self.tier.name} sent no answer")
        yield RemoteDone(
            prompt_tokens=int(usage.prompt_tokens) if usage else 0,
            completion_tokens=int(usage.completion_tokens) if usage else pieces,
            finish_reason=finish,
            usage_reported=usage is not None,
        )

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
