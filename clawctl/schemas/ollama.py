"""Ollama's native API on the wire: the bodies of `/api/chat`, `/api/generate`, `/api/embed`,
`/api/tags`, `/api/show`, `/api/ps` and `/api/version`, with Ollama's own field names.

Requests ignore unknown fields (Ollama clients send options clawd has no use for, such as
`num_gpu`); `claw` is clawd's extension object, as on the OpenAI face. Durations in responses are
nanoseconds and times RFC 3339, as Ollama's. `keep_alive` is parsed here (`keep_alive_seconds`),
because its forms ("5m", 300, "-1", 0) are part of the wire format, not of the daemon.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, model_validator

from clawctl.config import KEEP_LOADED_SECONDS
from clawctl.errors import BadInput
from clawctl.schemas.openai import TOOL_NAME, ClawRequest, FunctionSpec

# The Ollama release whose API this face follows (clients compare it to enable features).
OLLAMA_API_VERSION = "0.12.0"
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _go_duration(text: str) -> float | None:
    """Seconds of a Go duration ("1h30m", "-5m", "300ms"), or None if `text` is not one."""
    sign, body = (-1.0, text[1:]) if text.startswith("-") else (1.0, text.lstrip("+"))
    if not body or _DURATION_PART.sub("", body):
        return None
    return sign * sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(body))


def keep_alive_seconds(value: float | str | None) -> float | None:
    """How long a model stays loaded after the request, as Ollama reads `keep_alive`: a number of
    seconds or a duration string ("5m", "1h", "-1"); 0 unloads after the request; a negative
    value keeps it loaded. None: the daemon's default."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            seconds: float | None = float(text)
        except ValueError:
            seconds = _go_duration(text)
        if seconds is None:
            raise BadInput(
                f"keep_alive {value!r} is not a duration: use seconds or e.g. '5m', '1h', '-1'",
                param="keep_alive",
            )
    else:
        seconds = float(value)
    if math.isnan(seconds):
        raise BadInput("keep_alive must be a number of seconds or a duration", param="keep_alive")
    return KEEP_LOADED_SECONDS if seconds < 0 else min(seconds, KEEP_LOADED_SECONDS)


# --- requests ---------------------------------------------------------------------------------


class Options(_Lenient):
    """The `options` clawd honours; Ollama's hardware options (num_gpu, num_thread...) and the
    samplers clawd lacks (mirostat, typical_p, tfs_z) are accepted and ignored."""

    num_ctx: int | None = Field(None, gt=0)
    num_predict: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None
    stop: list[str] | None = None
    repeat_penalty: float | None = Field(None, gt=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)


class ToolCallFunction(_Lenient):
    """Unlike OpenAI's, `arguments` is a JSON object, not the JSON text of one. `index` (the
    call's place in its message) is what newer Ollama servers send; older clients ignore it."""

    index: int | None = None
    name: str = Field(pattern=TOOL_NAME)
    arguments: dict[str, JsonValue] = Field(default_factory=dict)


class ToolCall(_Lenient):
    """A call in an assistant message (request) or in a response. `id` is sent by newer
    Ollama servers and clients; Ollama pairs results with calls by order, not by id."""

    id: str | None = Field(None, max_length=128)
    function: ToolCallFunction


class Tool(_Lenient):
    """A function the model may call: OpenAI's tool definition (Ollama copied it)."""

    type: Literal["function"] = "function"
    function: FunctionSpec


class Message(_Lenient):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = Field(None, description="A tool message: the tool that answered.")
    tool_call_id: str | None = Field(None, max_length=128)
    thinking: str | None = None

    @model_validator(mode="after")
    def _calls_are_assistant(self) -> Message:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self


Format = Literal["", "json"] | dict[str, JsonValue] | None
Think = bool | Literal["low", "medium", "high"] | None


class _Generating(_Lenient):
    model: str = Field(min_length=1)
    format: Format = Field(
        None, description='"json" (any JSON object) or a JSON Schema the answer must match.'
    )
    options: Options | None = None
    stream: bool = True
    keep_alive: float | str | None = None
    think: Think = None
    claw: ClawRequest = ClawRequest()

    def json_mode(self) -> bool:
        return self.format == "json" or isinstance(self.format, dict)

    def format_schema(self) -> dict[str, JsonValue] | None:
        return self.format if isinstance(self.format, dict) else None


class ChatRequest(_Generating):
    """`POST /api/chat`. No messages: load (or with keep_alive 0, unload) the model."""

    messages: list[Message] = Field(default_factory=list)
    tools: list[Tool] | None = Field(None, max_length=128)

    @model_validator(mode="after")
    def _unique_tools(self) -> ChatRequest:
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            raise ValueError("tools: function names must be unique")
        return self


class GenerateRequest(_Generating):
    """`POST /api/generate`. No prompt: load (or with keep_alive 0, unload) the model."""

    prompt: str = ""
    system: str | None = None
    suffix: str = ""
    template: str = ""
    context: list[int] | None = None
    raw: bool = False
    images: list[str] | None = None


class EmbedRequest(_Lenient):
    """`POST /api/embed`."""

    model: str = Field(min_length=1)
    input: str | list[str]
    truncate: bool = True
    dimensions: int | None = Field(None, gt=0)
    options: Options | None = None
    keep_alive: float | str | None = None

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class EmbeddingsRequest(_Lenient):
    """`POST /api/embeddings`, the older one-text form."""

    model: str = Field(min_length=1)
    prompt: str
    options: Options | None = None
    keep_alive: float | str | None = None


class ShowRequest(_Lenient):
    """`POST /api/show` (older clients send `name`)."""

    model: str | None = None
    name: str | None = None
    verbose: bool = False

    def model_name(self) -> str:
        name = self.model or self.name
        if not name:
            raise BadInput("model is required", param="model")
        return name


# --- responses --------------------------------------------------------------------------------


class Stats(BaseModel):
    """What the final chunk reports; durations in nanoseconds."""

    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    tool_calls: list[ToolCall] | None = None


class ChatResponse(Stats):
    """A chunk of `/api/chat` (or the whole answer, non-streamed); the last has `done: true`."""

    model: str
    created_at: datetime
    message: ResponseMessage
    done: bool
    done_reason: str | None = None


class GenerateResponse(Stats):
    model: str
    created_at: datetime
    response: str
    done: bool
    done_reason: str | None = None


class EmbedResponse(BaseModel):
    model: str
    embeddings: list[list[float]]
    total_duration: int
    load_duration: int
    prompt_eval_count: int


class EmbeddingsResponse(BaseModel):
    embedding: list[float]


class VersionResponse(BaseModel):
    version: str


class ModelDetails(BaseModel):
    parent_model: str = ""
    format: str
    family: str
    families: list[str] | None = None
    parameter_size: str
    quantization_level: str


class ListedModel(BaseModel):
    name: str
    model: str
    modified_at: datetime
    size: int
    digest: str
    details: ModelDetails


class TagsResponse(BaseModel):
    models: list[ListedModel]


ModelInfoValue = str | int | float | bool | None


class ShowResponse(BaseModel):
    modelfile: str
    parameters: str
    template: str
    details: ModelDetails
    model_info: dict[str, ModelInfoValue]
    capabilities: list[str]
    modified_at: datetime


class RunningModel(BaseModel):
    name: str
    model: str
    size: int
    digest: str
    details: ModelDetails
    expires_at: datetime
    size_vram: int = 0
    context_length: int


class PsResponse(BaseModel):
    models: list[RunningModel]


class ErrorResponse(BaseModel):
    """Ollama's error body: one message, the status line says the rest."""

    error: str


def human_number(count: int) -> str:
    """A parameter count as Ollama shows it: '135M', '494.03M', '7.6B'."""
    for scale, suffix, digits in ((1e9, "B", 1), (1e6, "M", 2), (1e3, "K", 0)):
        if count >= scale:
            value = count / scale
            return f"{value:.0f}{suffix}" if value == int(value) else f"{value:.{digits}f}{suffix}"
    return str(count)
