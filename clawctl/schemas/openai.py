"""OpenAI-compatible request and response bodies, plus clawd's `claw` extension object.

Top-level unknown fields are ignored, as OpenAI-compatible servers do (clients send fields we do not
use); the `claw` object is ours, so unknown fields there are an error.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from clawctl.config import KEEP_LOADED_SECONDS
from clawctl.schemas.signals import Signals


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


SNAPSHOT_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class SnapshotRequest(_Strict):
    """Freeze the prompt's state under a name, and/or hydrate from a named snapshot."""

    save: str | None = Field(None, pattern=SNAPSHOT_NAME)
    load: str | None = Field(None, pattern=SNAPSHOT_NAME)


class AdapterChoice(_Strict):
    name: str = Field(min_length=1, max_length=80)
    scale: float = Field(1.0, ge=-4.0, le=4.0)


class MeterRequest(_Strict):
    """How the entropy meter summarises a request that names a model directly (calibration
    uses the settings of the policy tier it calibrates)."""

    window: int = Field(8, ge=1, le=256)
    min_tokens: int = Field(1, ge=1)
    decide_within: int = Field(48, ge=1, le=4096)
    first_top: int = Field(
        0, ge=0, le=4096, description="Report the first token's N most likely log-probabilities."
    )


class ClawRequest(_Strict):
    """The `claw` extension in a request body (`extra_body={"claw": {...}}`)."""

    adapters: list[AdapterChoice] = Field(default_factory=list, max_length=8)

    snapshot: SnapshotRequest | None = None
    session: str | None = Field(
        None, pattern=SNAPSHOT_NAME, description="Freeze state after each turn under this id."
    )

    app: str | None = Field(None, max_length=128, description="Caller label for logs and ledger.")
    meter: MeterRequest | None = None
    impact: Literal["low", "normal", "critical"] = Field(
        "normal", description="How much a wrong answer costs; routing policies match on it."
    )
    keep_alive: float | None = Field(
        None,
        ge=0,
        le=KEEP_LOADED_SECONDS,
        description="Seconds to keep the model loaded after this request (2147483648: always).",
    )
    speculative: bool = Field(
        True,
        description="Draft tokens by prompt lookup when decoding greedily (temperature 0).",
    )
    cache: bool = Field(
        True,
        description="Share an identical request in flight and answer a deterministic one from "
        "the answer cache (exact, then semantic); false always generates.",
    )


class ContentPart(_Lenient):
    type: str
    text: str | None = None


TOOL_NAME = r"^[A-Za-z0-9_.-]{1,64}$"


class FunctionCall(_Lenient):
    name: str = Field(pattern=TOOL_NAME)
    arguments: str = Field(description="The call's arguments: the JSON text of an object.")

    @field_validator("arguments")
    @classmethod
    def _object_text(cls, value: str) -> str:
        try:
            decoded = json.loads(value or "{}")
        except ValueError:
            raise ValueError("tool call arguments must be the JSON text of an object") from None
        if not isinstance(decoded, dict):
            raise ValueError("tool call arguments must be the JSON text of an object")
        return value


class ToolCallBody(_Lenient):
    """A call in an assistant message (request) or in a response."""

    id: str = Field(min_length=1, max_length=128)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallBody] | None = None
    tool_call_id: str | None = Field(None, max_length=128)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content if part.type == "text")

    @model_validator(mode="after")
    def _roles(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self


class FunctionSpec(_Lenient):
    name: str = Field(pattern=TOOL_NAME)
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class ToolDefinition(_Lenient):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(_Lenient):
    name: str = Field(pattern=TOOL_NAME)


class NamedToolChoice(_Lenient):
    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JsonSchemaFormat(_Lenient):
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format json_schema needs its json_schema object")
        return self


class SamplingRequest(_Lenient):
    model: str | None = None
    max_tokens: int | None = Field(None, gt=0)
    temperature: float = Field(0.8, ge=0, le=2)
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int = Field(40, ge=0)
    min_p: float = Field(0.05, ge=0, le=1)
    repeat_penalty: float = Field(1.0, gt=0)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="Only one choice per request is supported.")
    user: str | None = None
    response_format: ResponseFormat | None = None
    claw: ClawRequest = ClawRequest()

    def json_mode(self) -> bool:
        return self.response_format is not None and self.response_format.type != "text"

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, gt=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ToolDefinition] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprob_alternatives(self) -> int | None:
        """How many alternatives each token's logprob entry lists; None: no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @model_validator(mode="after")
    def _logprobs_asked(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @model_validator(mode="after")
    def _tools_agree(self) -> ChatCompletionRequest:
        """What OpenAI refuses with a 400: a choice naming no offered tool, a required call
        without tools, duplicate names, and a tool result answering no earlier call."""
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            raise ValueError("tools: function names must be unique")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice names {choice.function.name!r}, which is not in tools")
        if choice == "required" and not names:
            raise ValueError("tool_choice 'required' needs tools")
        called: set[str] = set()
        for message in self.messages:
            for call in message.tool_calls or ():
                called.add(call.id)
            if message.role == "tool" and message.tool_call_id not in called:
                raise ValueError(
                    f"tool message answers {message.tool_call_id!r}, which no earlier "
                    "assistant message called"
                )
        return self

    def tools_offered(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(16, gt=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _no_prompt_logprobs(self) -> CompletionRequest:
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs (the prompt's own logprobs) is not supported")
        return self

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str] | list[int]) -> str | list[str] | list[int]:
        if isinstance(value, list) and value and isinstance(value[0], str) and len(value) != 1:
            raise ValueError("only one prompt per request is supported")
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be empty")
        return value


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Timings(BaseModel):
    queue_ms: float
    load_ms: float
    prompt_ms: float
    decode_ms: float
    total_ms: float
    prompt_tokens_per_s: float | None
    decode_tokens_per_s: float | None


class ClawInfo(BaseModel):
    """The `claw` object in responses: what the daemon did for this request."""

    model: str
    digest: str | None
    profile: str
    request_id: str
    timings: Timings
    adapters: list[AdapterChoice] = Field(default_factory=list)
    prefill_tokens_saved: int = 0
    prefix_source: str | None = None
    snapshot_saved: str | None = None
    session: str | None = None
    draft_tokens: int = 0  # proposed by prompt lookup (speculative decoding)
    draft_accepted: int = 0  # of those, confirmed by the model
    # routing (a request whose model names a policy)
    policy: str | None = None
    rule: str | None = None
    tier: str | None = None
    path: list[str] = Field(default_factory=list)
    escalated: bool = False
    reason: str | None = None
    degraded: bool = False
    entropy: Signals | None = None
    usage_by_tier: dict[str, Usage] = Field(default_factory=dict)
    cost: float = 0.0
    all_remote_cost: float = 0.0
    # dedup: "exact" or "semantic" (answered from the cache), "coalesced" (an identical
    # request's generation in flight was shared); None: generated for this request
    cached: Literal["exact", "semantic", "coalesced"] | None = None
    similarity: float | None = None  # semantic hits: cosine of the prompt embeddings
    cached_from: str | None = None  # the request whose answer was reused
    tokens_saved: int = 0  # prompt plus completion tokens not computed for this request


FinishReason = Literal["stop", "length", "cancelled", "tool_calls"]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallBody] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobBody(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    """OpenAI's `choices[].logprobs`: one entry per generated token, in order."""

    content: list[TokenLogprobBody] | None
    refusal: list[TokenLogprobBody] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    claw: ClawInfo


class FunctionDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """A streamed call: `{index, id, type, function.name}` first, then argument text."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    claw: ClawInfo | None = None


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: parallel lists, one item per generated token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    claw: ClawInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "clawd"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class EmbeddingRequest(_Lenient):
    """`POST /v1/embeddings` (OpenAI shape). Token-id inputs are accepted only by models that
    share the caller's tokenizer, which an ONNX encoder cannot promise, so text is required."""

    model: str | None = None
    input: str | list[str] = Field(description="A text or a list of up to 2048 texts.")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, gt=0)
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _texts(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("input must not be empty")
        if isinstance(value, list) and len(value) > 2048:
            raise ValueError("at most 2048 inputs per request")
        return value

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # base64 of little-endian float32 when asked for


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorEnvelope(BaseModel):
    error: ErrorBody
