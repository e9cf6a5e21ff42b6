"""The remote tier: any OpenAI-compatible server, or a pool of them, reached with the official
`openai` client.

Streaming is passed through piece by piece. Failures (connection refused, timeouts, 5xx/429,
bodies that are not OpenAI-shaped, an answer with no text) move the request to the pool's next
endpoint, and after a round through the pool it is retried with exponential backoff, but only
before the first piece of text: once text has reached the caller a retry would repeat it.
`timeout_seconds` bounds each read (so a slow server fails in time) and, across attempts, the
wait for the first token; one attempt gets `attempt_timeout_seconds`, or an even share of what is
left among the endpoints still to try, so a server that hangs leaves time for the next.

Each endpoint has its own circuit breaker (a server that keeps failing is skipped for
`breaker_cooldown_seconds`, so requests go elsewhere or fall back at once instead of each waiting
out a timeout) and honours `Retry-After` (a 429 or 503 that asks for time gets it: that endpoint
is skipped until then). `failover = "least_recent_failure"` tries the endpoint that failed
longest ago first. Every attempt of one request carries the same `X-Request-ID`, so a proxy or
server that logs or deduplicates by it sees one request, and it is the id of the request's one
ledger row (`claw.request_id`); the SDK's own retries are off, so attempts never multiply.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import time
import uuid
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clawctl.engines.base import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, ChatTurn, ToolSpec
from clawctl.schemas.policy import Endpoint, Tier

MAX_RETRY_AFTER_SECONDS = 3600.0  # a longer ask is read as an hour: the breaker covers the rest


class RemoteFailure(Exception):
    """The remote tier could not answer; `message` says why (for logs and `claw.reason`)."""

    def __init__(
        self, message: str, after_text: bool = False, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.after_text = after_text
        self.retry_after = retry_after  # seconds the server asked for (429/503 Retry-After)


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header as seconds from now: delta-seconds or an HTTP date (RFC 9110)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER_SECONDS)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    delta = when.timestamp() - (time.time() if now is None else now)
    return min(max(delta, 0.0), MAX_RETRY_AFTER_SECONDS)


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
    request_id: str | None = None  # clawd's (the ledger row's): every attempt sends it

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


class _Endpoint:
    """One server of the pool: its client, circuit breaker, Retry-After and last failure."""

    def __init__(self, spec: Endpoint, tier: Tier, env: Mapping[str, str], transport: Any) -> None:
        self.spec = spec
        self.tier = tier
        self.breaker = CircuitBreaker(tier.breaker_failures, tier.breaker_cooldown_seconds)
        self.cool_until = 0.0  # monotonic time before which the server asked not to be called
        self.last_failure = 0.0  # monotonic; 0: never failed
        self._env = env
        self._transport = transport
        self._client: Any = None

    def base_url(self) -> str | None:
        if self.spec.base_url:
            return self.spec.base_url
        return self._env.get(self.spec.base_url_env or "") or None

    def label(self) -> str:
        return self.base_url() or f"${self.spec.base_url_env}"

    def available(self, now: float) -> bool:
        return self.base_url() is not None and not self.breaker.open and now >= self.cool_until

    def record(self, failure: RemoteFailure | None) -> None:
        self.breaker.record(failure is None)
        if failure is not None:
            self.last_failure = time.monotonic()
            if failure.retry_after is not None:
                self.cool_until = self.last_failure + failure.retry_after

    def _api_key(self) -> str:
        spec = self.spec
        if spec.api_key_file:
            try:
                return Path(spec.api_key_file).expanduser().read_text().strip()
            except OSError as exc:
                raise RemoteFailure(f"cannot read API key file: {exc.strerror}") from None
        if spec.api_key_env:
            return self._env.get(spec.api_key_env, "") or "none"
        return "none"

    def client(self) -> Any:
        if self._client is None:
            import openai

            http_client: Any = None
            if self._transport is not None:
                import httpx

                http_client = httpx.AsyncClient(transport=self._transport)
            self._client = openai.AsyncOpenAI(
                base_url=self.base_url(),
                api_key=self._api_key(),
                timeout=self.tier.timeout_seconds,
                max_retries=0,  # retries are ours: only before the first token
                http_client=http_client,
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()


class RemoteTier:
    def __init__(self, tier: Tier, env: Mapping[str, str], transport: Any = None) -> None:
        """`transport`: an httpx async transport for the SDK's HTTP client (tests route the
        remote tier to an in-process ASGI app with `httpx.ASGITransport`); None: the network."""
        self.tier = tier
        self.endpoints = [_Endpoint(spec, tier, env, transport) for spec in tier.pool()]

    def configured(self) -> str | None:
        """Why this tier cannot be used, or None when it can."""
        if all(e.base_url() is None for e in self.endpoints):
            names = [e.spec.base_url_env for e in self.endpoints]
            return (
                f"remote tier {self.tier.name}: set {' or '.join(map(str, names))} to its base URL"
            )
        return None

    def unavailable(self) -> str | None:
        """Why no request could be sent now (unconfigured, or every endpoint's breaker open)."""
        problem = self.configured()
        if problem is None and all(e.breaker.open for e in self.endpoints):
            return "circuit open"
        return problem

    def _order(self) -> list[_Endpoint]:
        if self.tier.failover == "least_recent_failure":
            return sorted(self.endpoints, key=lambda e: e.last_failure)
        return list(self.endpoints)

    async def stream(self, request: RemoteRequest) -> AsyncGenerator[str | RemoteDone, None]:
        """Text pieces, then one `RemoteDone`; raises `RemoteFailure`."""
        problem = self.configured()
        if problem:
            raise RemoteFailure(problem)
        request_id = request.request_id or uuid.uuid4().hex
        deadline = time.monotonic() + self.tier.timeout_seconds
        failures: list[str] = []
        for attempt in range(self.tier.retries + 1):
            order = self._order()
            for position, endpoint in enumerate(order):
                now = time.monotonic()
                if now >= deadline:
                    break
                if not endpoint.available(now):
                    continue
                left = sum(e.available(now) for e in order[position:])
                share = self.tier.attempt_timeout_seconds or (deadline - now) / left
                attempt_deadline = min(deadline, now + share)
                sent_text = False
                try:
                    async with contextlib.aclosing(
                        self._one_attempt(endpoint, request, attempt_deadline, request_id)
                    ) as pieces:
                        async for item in pieces:
                            if isinstance(item, str):
                                sent_text = True
                            yield item
                except RemoteFailure as failure:
                    endpoint.record(failure)
                    if sent_text:
                        raise RemoteFailure(failure.message, after_text=True) from None
                    failures.append(failure.message)
                    continue
                endpoint.record(None)
                return
            live = [e for e in self.endpoints if e.base_url() and not e.breaker.open]
            if attempt == self.tier.retries or not live:
                break
            now = time.monotonic()
            # Back off; and when every server asked for time (Retry-After), wait for the first.
            wait = max(0.25 * (2**attempt), min(e.cool_until for e in live) - now)
            if now + wait >= deadline:
                break
            await asyncio.sleep(wait)
        if not failures:
            raise RemoteFailure(f"remote tier {self.tier.name} is failing; circuit open")
        raise RemoteFailure("; ".join(dict.fromkeys(failures)))

    async def _one_attempt(
        self, endpoint: _Endpoint, request: RemoteRequest, deadline: float, request_id: str
    ) -> AsyncGenerator[str | RemoteDone, None]:
        import openai

        client = endpoint.client()
        common: dict[str, Any] = {
            "model": self.tier.model,
            "extra_headers": {"X-Request-ID": request_id},
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
            raise RemoteFailure(
                f"remote tier {self.tier.name} timed out ({endpoint.label()})"
            ) from None
        except openai.APIStatusError as exc:
            asked = retry_after_seconds(exc.response.headers.get("retry-after"))
            raise RemoteFailure(
                f"remote tier {self.tier.name} answered {exc.status_code} ({endpoint.label()})",
                retry_after=asked if exc.status_code in (429, 503) else None,
            ) from None
        except openai.APIConnectionError:
            raise RemoteFailure(
                f"remote tier {self.tier.name} is unreachable ({endpoint.label()})"
            ) from None
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
        for endpoint in self.endpoints:
            await endpoint.aclose()
