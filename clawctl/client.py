"""The typed client for clawd: httpx over the Unix socket (or TCP with a token).

The transport is injectable (httpx's `HTTPTransport(uds=…)`, `MockTransport`, an ASGI transport),
which is how the CLI talks to the daemon and how tests exercise the client. Error envelopes from
the daemon become the same `ClawError` subclasses the daemon raised.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import httpx
from pydantic import BaseModel

from clawctl.config import ClientConfig
from clawctl.errors import ClawError, DaemonUnavailable, error_class_for
from clawctl.schemas.admin import Health
from clawctl.schemas.jobs import JOB_LINE
from clawctl.schemas.openai import (
    ChatCompletion,
    ChatCompletionChunk,
    ClawInfo,
    Completion,
    ModelList,
    Usage,
)

Model = TypeVar("Model", bound=BaseModel)


class ProgressView(Protocol):
    """Where the client shows a long operation's progress and messages (the CLI: Rich)."""

    def start(self, description: str, total: int | None) -> None: ...

    def advance(self, amount: int) -> None: ...

    def message(self, text: str, level: str) -> None: ...


@dataclass(frozen=True)
class StreamEnd:
    """What the stream said after the text: why it ended and the daemon's `claw` report."""

    finish_reason: str | None
    claw: ClawInfo | None
    usage: Usage | None


class ClawClient:
    def __init__(
        self,
        config: ClientConfig,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 600.0,
    ) -> None:
        self.config = config
        headers = {"Authorization": f"Bearer {config.token}"} if config.token else {}
        if config.url:
            base_url = config.url.rstrip("/")
            self.where = config.url
        else:
            transport = transport or httpx.HTTPTransport(uds=str(config.socket_path))
            base_url = "http://clawd"
            self.where = str(config.socket_path)
        self._http = httpx.Client(
            base_url=base_url,
            transport=transport,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=5.0),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ClawClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _unavailable(self) -> DaemonUnavailable:
        return DaemonUnavailable(
            f"clawd is not reachable at {self.where}; start it with 'clawctl serve' "
            "(or 'make run', or 'systemctl start clawd')"
        )

    @staticmethod
    def _raise_for(response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        try:
            error = response.json()["error"]
            message, code, param = error["message"], error.get("code"), error.get("param")
        except (ValueError, KeyError, TypeError):
            message, code, param = response.text or response.reason_phrase, None, None
        raise error_class_for(code, response.status_code)(message, param=param)

    def _get(self, path: str) -> Any:
        try:
            response = self._http.get(path)
        except (httpx.ConnectError, httpx.RemoteProtocolError, FileNotFoundError):
            raise self._unavailable() from None
        self._raise_for(response)
        return response.json()

    def _call(
        self,
        method: str,
        path: str,
        response: type[Model],
        *,
        body: BaseModel | None = None,
        params: dict[str, Any] | None = None,
    ) -> Model:
        """One admin request with a typed body and a typed answer."""
        try:
            answer = self._http.request(
                method,
                path,
                content=None if body is None else body.model_dump_json(),
                headers={"Content-Type": "application/json"} if body is not None else None,
                params={k: v for k, v in (params or {}).items() if v is not None},
            )
        except (httpx.ConnectError, FileNotFoundError):
            raise self._unavailable() from None
        except httpx.RemoteProtocolError as exc:
            raise ClawError(f"clawd closed the connection: {exc}") from None
        self._raise_for(answer)
        return response.model_validate_json(answer.content)

    def _job(
        self,
        path: str,
        response: type[Model],
        progress: ProgressView,
        *,
        body: BaseModel | None = None,
        content: Iterator[bytes] | None = None,
        params: dict[str, Any] | None = None,
    ) -> Model:
        """A long admin operation: POST, then read its NDJSON `JobLine`s until the result."""
        if body is not None:
            content = iter([body.model_dump_json().encode()])
        try:
            with self._http.stream(
                "POST",
                path,
                content=content,
                params={k: v for k, v in (params or {}).items() if v is not None},
                headers={"Content-Type": "application/json"} if body is not None else None,
            ) as answer:
                if answer.status_code >= 400:
                    answer.read()
                    self._raise_for(answer)
                for raw in answer.iter_lines():
                    if not raw.strip():
                        continue
                    line = JOB_LINE.validate_json(raw)
                    if line.type == "start":
                        progress.start(line.description, line.total)
                    elif line.type == "advance":
                        progress.advance(line.amount)
                    elif line.type == "message":
                        progress.message(line.text, line.level)
                    elif line.type == "error":
                        raise error_class_for(line.code, line.status)(line.message)
                    else:
                        return response.model_validate(line.result)
        except (httpx.ConnectError, FileNotFoundError):
            raise self._unavailable() from None
        except httpx.RemoteProtocolError as exc:
            raise ClawError(f"clawd closed the stream early: {exc}") from None
        raise ClawError(f"clawd ended {path} without a result; see its log")

    def _download(self, path: str, params: dict[str, Any] | None = None) -> Iterator[bytes]:
        """A streamed GET (snapshot export, ledger export): the body in chunks."""
        try:
            with self._http.stream(
                "GET", path, params={k: v for k, v in (params or {}).items() if v is not None}
            ) as answer:
                if answer.status_code >= 400:
                    answer.read()
                    self._raise_for(answer)
                yield from answer.iter_bytes()
        except (httpx.ConnectError, FileNotFoundError):
            raise self._unavailable() from None
        except httpx.RemoteProtocolError as exc:
            raise ClawError(f"clawd closed the stream early: {exc}") from None

    # --- models (admin) ---

    # --- adapters (admin) ---

    # --- snapshots (admin) ---

    # --- ledger and distill (admin) ---

    # --- routing policies (admin) ---

    # --- health and OpenAI calls ---

    def health(self) -> Health:
        return Health.model_validate(self._get("/health"))

    def models(self) -> ModelList:
        return ModelList.model_validate(self._get("/v1/models"))

    def complete(self, body: dict[str, Any]) -> Completion:
        """A non-streaming /v1/completions call (snapshot save/load from the CLI)."""
        try:
            response = self._http.post("/v1/completions", json={**body, "stream": False})
        except (httpx.ConnectError, FileNotFoundError):
            raise self._unavailable() from None
        self._raise_for(response)
        return Completion.model_validate(response.json())

    def chat(self, body: dict[str, Any]) -> ChatCompletion:
        """A non-streaming /v1/chat/completions call."""
        try:
            response = self._http.post("/v1/chat/completions", json={**body, "stream": False})
        except (httpx.ConnectError, FileNotFoundError):
            raise self._unavailable() from None
        self._raise_for(response)
        return ChatCompletion.model_validate(response.json())

    def chat_stream(
        self,
        messages: list[dict[str, str]],
        *,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> Iterator[str | StreamEnd]:
        """Yield text pieces, then one `StreamEnd`."""
        body: dict[str, Any] = {
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if model:
            body["model"] = model
        if max_tokens:
            body["max_tokens"] = max_tokens
        if temperature is not None:
            body["temperature"] = temperature
        finish: str | None = None
        claw: ClawInfo | None = None
        usage: Usage | None = None
        try:
            with self._http.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    self._raise_for(response)
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    payload = line[len("data: ") :]
                    if payload == "[DONE]":
                        break
                    data = json.loads(payload)
                    if "error" in data:
                        err = data["error"]
                        cls = error_class_for(err.get("code"), 500)
                        raise cls(err.get("message", "generation failed"))
                    chunk = ChatCompletionChunk.model_validate(data)
                    for choice in chunk.choices:
                        if choice.delta.content:
                            yield choice.delta.content
                        finish = choice.finish_reason or finish
                    claw = chunk.claw or claw
                    usage = chunk.usage or usage
        except (httpx.ConnectError, FileNotFoundError):
            raise self._unavailable() from None
        except httpx.RemoteProtocolError as exc:
            raise ClawError(f"clawd closed the stream early: {exc}") from None
        yield StreamEnd(finish, claw, usage)
