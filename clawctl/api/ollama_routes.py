"""Ollama's native API (`/api/...`): a second face of the serving core the OpenAI routes use.

Thin translation only: a chat or generate request becomes the same `GenerationRun` opened through
`open_answer` (routing policies, cascade, dedup and answer cache, ledger and metrics included),
with its tools and `format` planned by `serving/tooluse.py` and its calls parsed by
`serving/toolcalls.py`, as on the OpenAI face; an embed request goes to
`serving/embedding.embed_texts`. What differs is the wire: NDJSON streaming by default, tool
arguments as JSON objects (not JSON text), results paired with calls by order (`tool_name`, no
ids), Ollama's options and `keep_alive`, nanosecond durations, and errors as `{"error": "..."}`
(chosen by path in api/errors.py). What clawd cannot do (images, thinking, `suffix`, `template`,
`context`, unloading on request) is refused with a 400 rather than silently dropped.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from typing import TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from clawctl.api.peer import peer_of
from clawctl.api.sse import NDJSON_LINE, TokenFrames
from clawctl.api.wire import answer_headers, anticipate_after, json_body
from clawctl.engines.base import ChatTurn, Grammar, Prompt, SamplingParams
from clawctl.engines.base import ToolCall as CoreCall
from clawctl.errors import BadInput, ClawError, ModelNotFound
from clawctl.schemas.models import ModelManifest
from clawctl.schemas.ollama import (
    OLLAMA_API_VERSION,
    ChatRequest,
    ChatResponse,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbedRequest,
    EmbedResponse,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    ListedModel,
    Message,
    ModelDetails,
    ModelInfoValue,
    Options,
    PsResponse,
    ResponseMessage,
    RunningModel,
    ShowRequest,
    ShowResponse,
    Stats,
    TagsResponse,
    ToolCall,
    ToolCallFunction,
    VersionResponse,
    human_number,
    keep_alive_seconds,
)
from clawctl.services import Services
from clawctl.serving.dedup import Answer, Flights, open_answer
from clawctl.serving.embedding import embed_texts
from clawctl.serving.generation import GenerationRun, is_policy_name
from clawctl.serving.toolcalls import (
    CallEnd,
    ContentDelta,
    ToolCallParser,
    ToolEvent,
    parse_tool_calls,
)
from clawctl.serving.tooluse import NO_TOOLS, ToolUse, plan_tool_use, tool_spec

router = APIRouter(prefix="/api")
NDJSON = "application/x-ndjson"
POLICY_FORMAT = "clawd-policy"
Number = TypeVar("Number", int, float)


# --- plumbing ---------------------------------------------------------------------------------


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def _line(model: BaseModel) -> bytes:
    return model.model_dump_json(exclude_none=True).encode() + b"\n"


def _now() -> datetime:
    return datetime.now(UTC)


def _ns(ms: float) -> int:
    return int(ms * 1_000_000)


def _stats(answer: Answer) -> dict[str, int | None]:
    """The final chunk's counts and durations (nanoseconds), from the core's usage and timings."""
    usage, timings = answer.usage(), answer.info().timings
    return Stats(
        total_duration=_ns(timings.total_ms),
        load_duration=_ns(timings.load_ms),
        prompt_eval_count=usage.prompt_tokens,
        prompt_eval_duration=_ns(timings.prompt_ms),
        eval_count=usage.completion_tokens,
        eval_duration=_ns(timings.decode_ms),
    ).model_dump()


# --- models -----------------------------------------------------------------------------------


def _resolve(services: Services, name: str) -> tuple[str, ModelManifest | None]:
    """clawd's name for an Ollama model name ("x" or "x:latest") and its manifest; None for a
    routing policy. Anything else is Ollama's 404."""
    bare = name.removesuffix(":latest")
    if is_policy_name(bare) and services.policies.find(bare) is not None:
        return bare, None
    try:
        return bare, services.store.get(bare)
    except BadInput:  # not even a valid name here ("llama3:8b")
        raise ModelNotFound(f"model {name!r} not found", param="model") from None


def _details(manifest: ModelManifest | None) -> ModelDetails:
    if manifest is None:
        return ModelDetails(
            format=POLICY_FORMAT, family=POLICY_FORMAT, parameter_size="", quantization_level=""
        )
    family = manifest.architecture
    params = (
        manifest.gguf.n_params
        if manifest.gguf
        else manifest.onnx.parameters
        if manifest.onnx
        else 0
    )
    return ModelDetails(
        parent_model=manifest.parent or "",
        format=manifest.format,
        family=family,
        families=[family] if family else None,
        parameter_size=human_number(params),
        quantization_level=manifest.quant,
    )


def _served_context(services: Services, manifest: ModelManifest) -> int | None:
    """The context clawd gives this model under its profile (what `num_ctx` is clamped to)."""
    if manifest.embeds:
        return manifest.onnx.max_tokens if manifest.onnx else manifest.gguf_info().context_length
    with contextlib.suppress(ClawError):
        return services.manager.fit.settings_for(manifest).n_ctx
    return None


def _model_info(manifest: ModelManifest, served: int | None) -> dict[str, ModelInfoValue]:
    """Header facts under Ollama's keys. `<arch>.context_length` is the context clawd serves
    (Ollama reports the trained one there): clients such as OpenClaw size their prompts from it,
    and a prompt sized to the trained length would be refused with `context_length_exceeded`
    on a profile that serves less. The trained length is `clawd.trained_context_length`."""
    arch = manifest.architecture
    info: dict[str, ModelInfoValue] = {"general.architecture": arch}
    trained: int | None = None
    if manifest.gguf is not None:
        gguf = manifest.gguf
        trained = gguf.context_length
        info |= {
            "general.name": gguf.model_name,
            "general.parameter_count": gguf.n_params,
            f"{arch}.embedding_length": gguf.embedding_length,
            f"{arch}.block_count": gguf.block_count,
        }
    elif manifest.onnx is not None:
        onnx = manifest.onnx
        trained = onnx.context_length if onnx.task == "generation" else onnx.max_tokens
        info |= {
            "general.parameter_count": onnx.parameters,
            f"{arch}.embedding_length": onnx.dim,
            f"{arch}.block_count": onnx.layers,
        }
    info |= {
        f"{arch}.context_length": served or trained,
        "clawd.trained_context_length": trained,
    }
    return {key: value for key, value in info.items() if value is not None}


def _policy_mtime(services: Services, name: str) -> datetime:
    found = services.policies.find(name)
    mtime = found.path.stat().st_mtime if found is not None else time.time()
    return datetime.fromtimestamp(mtime, UTC)


@router.get("/version")
async def version() -> VersionResponse:
    """The Ollama API version this face follows."""
    return VersionResponse(version=OLLAMA_API_VERSION)


@router.get("/tags")
async def tags(request: Request) -> TagsResponse:
    """Installed models, then routing policies (a policy's name works as a model)."""
    services = _services(request)
    listed = [
        ListedModel(
            name=m.name,
            model=m.name,
            modified_at=m.created_at,
            size=m.size,
            digest=m.digest,
            details=_details(m),
        )
        for m in services.store.installed()
    ]
    for name in services.policies.names():
        listed.append(
            ListedModel(
                name=name,
                model=name,
                modified_at=_policy_mtime(services, name),
                size=0,
                digest="",
                details=_details(None),
            )
        )
    return TagsResponse(models=listed)


def _capabilities(manifest: ModelManifest | None) -> list[str]:
    """What a model can be asked for. Every chat model gets "tools": clawd offers tools to a
    template that knows none as a Hermes-style system prompt and holds the call to a grammar,
    so SmolLM2 calls tools as surely as Qwen2.5 (less wisely). A routing policy too: a
    cascade that escalates asks its remote tier with the request's tools."""
    if manifest is None:
        return ["completion", "tools"]
    if manifest.embeds:
        return ["embedding"]
    return ["completion", "tools"]


@router.post("/show")
async def show(
    request: Request, body: ShowRequest = Depends(json_body(ShowRequest))
) -> ShowResponse:
    """A model's details, capabilities and header facts; `num_ctx` in `parameters` and
    `<arch>.context_length` are the context clawd serves it with under the profile."""
    services = _services(request)
    name, manifest = _resolve(services, body.model_name())
    if manifest is None:
        return ShowResponse(
            modelfile=f"# clawd routing policy {name}\n",
            parameters="",
            template="",
            details=_details(None),
            model_info={"general.architecture": POLICY_FORMAT},
            capabilities=_capabilities(None),
            modified_at=_policy_mtime(services, name),
        )
    served = _served_context(services, manifest)
    template = manifest.gguf.chat_template if manifest.gguf else None
    return ShowResponse(
        modelfile=f"# clawd model {name} ({manifest.source})\nFROM {name}\n",
        parameters=f"num_ctx {served}" if served else "",
        template=template or "",
        details=_details(manifest),
        model_info=_model_info(manifest, served),
        capabilities=_capabilities(manifest),
        modified_at=manifest.created_at,
    )


@router.get("/ps")
async def ps(request: Request) -> PsResponse:
    """Models loaded now: generation models with their context, then embedding models (kept
    loaded while clawd runs)."""
    services = _services(request)
    now = _now().timestamp()
    running = []
    for loaded in services.manager.loaded():
        with contextlib.suppress(ClawError):  # removed meanwhile: not worth failing the list
            manifest = services.store.get(loaded.name)
            running.append(
                RunningModel(
                    name=loaded.name,
                    model=loaded.name,
                    size=loaded.memory_bytes,
                    digest=loaded.digest,
                    details=_details(manifest),
                    expires_at=datetime.fromtimestamp(now + (loaded.expires_in or 0.0), UTC),
                    context_length=loaded.n_ctx,
                )
            )
    for name in services.embeddings.loaded():
        with contextlib.suppress(ClawError):
            manifest = services.store.get(name)
            running.append(
                RunningModel(
                    name=name,
                    model=name,
                    size=manifest.size,
                    digest=manifest.digest,
                    details=_details(manifest),
                    expires_at=datetime.fromtimestamp(now + 365 * 86400, UTC),
                    context_length=_served_context(services, manifest) or 0,
                )
            )
    return PsResponse(models=running)


# --- generation -------------------------------------------------------------------------------


def _or(value: Number | None, default: Number) -> Number:
    return default if value is None else value


def _sampling(
    options: Options | None, speculative: bool, grammar: Grammar | None
) -> SamplingParams:
    """Ollama's options over Ollama's defaults (api/types.go DefaultOptions). `num_ctx`
    changes nothing per request: clawd sizes a model's context once, for every caller, under
    its profile (`/api/show` reports it as `num_ctx`), so a larger value is clamped to it and a
    smaller one is served with the larger context. `num_predict` -1 and -2 (until the context
    is full) both mean no limit but the context."""
    o = options or Options()
    return SamplingParams(
        max_tokens=o.num_predict if o.num_predict is not None and o.num_predict > 0 else None,
        temperature=_or(o.temperature, 0.8),
        top_p=_or(o.top_p, 0.9),
        top_k=_or(o.top_k, 40),
        min_p=_or(o.min_p, 0.0),
        repeat_penalty=_or(o.repeat_penalty, 1.1),
        presence_penalty=_or(o.presence_penalty, 0.0),
        frequency_penalty=_or(o.frequency_penalty, 0.0),
        seed=o.seed if o.seed is not None and o.seed >= 0 else None,  # -1: random
        stop=tuple(s for s in o.stop or () if s),
        speculative=speculative,
        grammar=grammar,
    )


def _refuse_thinking(body: ChatRequest | GenerateRequest) -> None:
    """No clawd model thinks; Ollama answers a request for thinking to such a model with a 400
    too (`think: false`, which OpenClaw sends, is fine)."""
    if body.think not in (None, False):
        raise BadInput(f"{body.model} does not support thinking", param="think")


def _residency(services: Services, model: str, keep_alive: float | None) -> str:
    """The `done_reason` of a request without a prompt: Ollama's preload or unload. clawd
    loads a model on its first request, so a preload only checks that the model exists."""
    if keep_alive != 0:
        return "load"
    if any(loaded.name == model for loaded in services.manager.loaded()):
        raise BadInput(
            f"clawd cannot unload {model} on request yet; it unloads after its keep_alive",
            param="keep_alive",
        )
    return "unload"


def _tool_use(body: ChatRequest | GenerateRequest) -> ToolUse:
    """Ollama has no `tool_choice`: offered tools are always OpenAI's "auto" (the model may
    answer in text; the grammar engages at its first `<tool_call>`), several calls per answer
    allowed. `format` "json" is any JSON object, a schema that schema; while tools are offered
    the call grammar governs, as on the OpenAI face."""
    tools = body.tools if isinstance(body, ChatRequest) else None
    specs = [
        tool_spec(t.function.name, t.function.description, t.function.parameters)
        for t in tools or ()
    ]
    if not specs and not body.json_mode():
        return NO_TOOLS
    return plan_tool_use(specs, None, True, body.format_schema(), body.json_mode())


def _turns(messages: list[Message]) -> tuple[ChatTurn, ...]:
    """Ollama's messages as the core's chat turns. Ollama pairs a tool result with a call by
    order (the result names its tool, not a call), so each call gets an id (its own, or
    `call_<message>_<n>`) and each result, unless it names one, the id of the oldest call
    not answered yet: what templates that render ids (and the answer cache) then see."""
    turns: list[ChatTurn] = []
    unanswered: list[str] = []
    for i, message in enumerate(messages):
        calls = tuple(
            CoreCall(
                call.id or f"call_{i}_{j}",
                call.function.name,
                json.dumps(call.function.arguments, ensure_ascii=False),
            )
            for j, call in enumerate(message.tool_calls or ())
        )
        unanswered += [call.id for call in calls]
        answers = None
        if message.role == "tool":
            answers = message.tool_call_id or (unanswered[0] if unanswered else None)
            if answers in unanswered:
                unanswered.remove(answers)
        turns.append(ChatTurn(message.role, message.content, calls, answers, message.tool_name))
    return tuple(turns)


def _wire_call(call: CoreCall, index: int) -> ToolCall:
    """A parsed call as Ollama sends it: arguments as an object (the parser made sure they
    are the JSON text of one)."""
    arguments = json.loads(call.arguments)
    return ToolCall(
        id=call.id, function=ToolCallFunction(index=index, name=call.name, arguments=arguments)
    )


async def _open(
    request: Request,
    endpoint: str,
    model: str,
    prompt: Prompt,
    body: ChatRequest | GenerateRequest,
    keep_alive: float | None,
    use: ToolUse,
) -> Answer:
    claw = body.claw
    if keep_alive is not None:
        claw = claw.model_copy(update={"keep_alive": keep_alive})
    run = GenerationRun(
        _services(request),
        endpoint,
        model,
        prompt,
        _sampling(body.options, claw.speculative, use.grammar),
        claw,
        peer_of(dict(request.scope.get("state", {}))),
        json_mode=body.json_mode(),
        streamed=body.stream,
        tool_use=use,
    )
    flights: Flights = request.app.state.flights
    return await open_answer(run, flights)


async def _stream(
    answer: Answer,
    token: TokenFrames,
    call_line: Callable[[ToolCall], bytes],
    parser: ToolCallParser | None,
    final: Callable[[], BaseModel],
) -> AsyncIterator[bytes]:
    """NDJSON lines: text as it comes; each tool call whole, in a line of its own, as soon as
    it is parsed (Ollama sends calls as objects, never in pieces, so the parser checks each
    call whole before it is sent: no `stream_arguments`); a last line with `done`."""

    def lines(events: list[ToolEvent]) -> Iterator[bytes]:
        assert parser is not None
        for event in events:
            if isinstance(event, ContentDelta):
                yield token(event.text)
            elif isinstance(event, CallEnd):
                yield call_line(_wire_call(parser.calls[event.index], event.index))

    pieces: list[str] = []  # the text, for anticipating the next call (parsed: the parser's)
    try:
        async for piece in answer.text():
            if parser is None:
                pieces.append(piece)
                if piece:
                    yield token(piece)
                continue
            for line in lines(parser.feed(piece)):
                yield line
    except ClawError as exc:
        yield _line(ErrorResponse(error=exc.message))
        return
    if parser is not None:
        for line in lines(parser.finish()):
            yield line
    yield _line(final())
    if parser is None:
        answer.anticipate("".join(pieces), ())
    else:
        answer.anticipate(parser.content, parser.calls)


@router.post("/chat", response_model=None)
async def chat(
    request: Request, body: ChatRequest = Depends(json_body(ChatRequest))
) -> JSONResponse | StreamingResponse:
    """A chat turn, streamed as NDJSON by default. Tool calls come back in
    `message.tool_calls` with object arguments and `done_reason` "stop", as Ollama's do."""
    _refuse_thinking(body)
    if any(message.images for message in body.messages):
        raise BadInput("images are not supported by clawd's models", param="messages")
    services = _services(request)
    model, _ = _resolve(services, body.model)
    keep_alive = keep_alive_seconds(body.keep_alive)

    def response(
        content: str,
        done: bool,
        done_reason: str | None = None,
        calls: list[ToolCall] | None = None,
    ) -> ChatResponse:
        return ChatResponse(
            model=body.model,
            created_at=_now(),
            message=ResponseMessage(content=content, tool_calls=calls),
            done=done,
            done_reason=done_reason,
        )

    if not body.messages:
        reason = _residency(services, model, keep_alive)
        return JSONResponse(response("", True, reason).model_dump(mode="json", exclude_none=True))
    use = _tool_use(body)
    prompt = Prompt(chat=_turns(body.messages), tools=use.tools)
    answer = await _open(request, "/api/chat", model, prompt, body, keep_alive, use)

    def final(text: str = "", calls: list[ToolCall] | None = None) -> ChatResponse:
        done = response(text, True, answer.finish_reason, calls)
        return done.model_copy(update=_stats(answer))

    if body.stream:
        lines = _stream(
            answer,
            TokenFrames(response(TokenFrames.marker, False), NDJSON_LINE),
            lambda call: _line(response("", False, calls=[call])),
            ToolCallParser(use.names, answer.id) if use.parses_calls else None,
            final,
        )
        return StreamingResponse(
            lines, media_type=NDJSON, headers=answer_headers(answer, streamed=True)
        )
    text = await answer.answer()
    calls: list[ToolCall] | None = None
    made: list[CoreCall] = []
    if use.parses_calls:
        parsed = parse_tool_calls(text, use.names, answer.id)
        text, made = parsed.content, parsed.calls
        calls = [_wire_call(call, index) for index, call in enumerate(parsed.calls)] or None
    return JSONResponse(
        final(text, calls).model_dump(mode="json", exclude_none=True),
        headers=answer_headers(answer),
        background=anticipate_after(answer, text, made),
    )


@router.post("/generate", response_model=None)
async def generate(
    request: Request, body: GenerateRequest = Depends(json_body(GenerateRequest))
) -> JSONResponse | StreamingResponse:
    """A completion of `prompt` (templated as one user turn unless `raw`), NDJSON by default."""
    _refuse_thinking(body)
    if body.images:
        raise BadInput("images are not supported by clawd's models", param="images")
    if body.suffix:
        raise BadInput("suffix (fill-in-the-middle) is not supported by clawd", param="suffix")
    if body.template:
        raise BadInput("template overrides are not supported by clawd", param="template")
    if body.context:
        raise BadInput(
            "context (tokens of an earlier answer) is not supported by clawd; use /api/chat "
            "with the conversation's messages",
            param="context",
        )
    services = _services(request)
    model, _ = _resolve(services, body.model)
    keep_alive = keep_alive_seconds(body.keep_alive)

    def response(text: str, done: bool, done_reason: str | None = None) -> GenerateResponse:
        return GenerateResponse(
            model=body.model, created_at=_now(), response=text, done=done, done_reason=done_reason
        )

    if not body.prompt:
        reason = _residency(services, model, keep_alive)
        return JSONResponse(response("", True, reason).model_dump(mode="json", exclude_none=True))
    if body.raw:
        prompt = Prompt(text=body.prompt)
    else:
        system = (ChatTurn("system", body.system),) if body.system else ()
        prompt = Prompt(chat=(*system, ChatTurn("user", body.prompt)))
    answer = await _open(request, "/api/generate", model, prompt, body, keep_alive, _tool_use(body))

    def final(text: str = "") -> GenerateResponse:
        return response(text, True, answer.finish_reason).model_copy(update=_stats(answer))

    if body.stream:
        token = TokenFrames(response(TokenFrames.marker, False), NDJSON_LINE)
        lines = _stream(answer, token, _line, None, final)
        return StreamingResponse(
            lines, media_type=NDJSON, headers=answer_headers(answer, streamed=True)
        )
    text = await answer.answer()
    return JSONResponse(
        final(text).model_dump(mode="json", exclude_none=True), headers=answer_headers(answer)
    )


# --- embeddings -------------------------------------------------------------------------------


def _embedding_model(services: Services, name: str, keep_alive: float | str | None) -> str:
    keep_alive_seconds(keep_alive)  # validated; embedding models stay loaded while clawd runs
    model, manifest = _resolve(services, name)
    if manifest is None:
        raise BadInput(f"{name} is a routing policy; embeddings need an embedding model")
    return model


@router.post("/embed")
async def embed(
    request: Request, body: EmbedRequest = Depends(json_body(EmbedRequest))
) -> EmbedResponse:
    """Embed one text or many (unit-length vectors, as Ollama's)."""
    services = _services(request)
    model = _embedding_model(services, body.model, body.keep_alive)
    if not body.truncate:
        raise BadInput(
            "truncate: false is not supported; clawd truncates inputs longer than the model's "
            "limit",
            param="truncate",
        )
    peer = peer_of(dict(request.scope.get("state", {})))
    outcome = await embed_texts(
        services, "/api/embed", model, body.texts(), peer, dimensions=body.dimensions
    )
    return EmbedResponse(
        model=body.model,
        embeddings=outcome.vectors(),
        total_duration=int(outcome.seconds * 1e9),
        load_duration=0,
        prompt_eval_count=outcome.result.total_tokens,
    )


@router.post("/embeddings")
async def embeddings(
    request: Request, body: EmbeddingsRequest = Depends(json_body(EmbeddingsRequest))
) -> EmbeddingsResponse:
    """The older one-text form of `/api/embed` (an empty prompt gives an empty vector)."""
    services = _services(request)
    model = _embedding_model(services, body.model, body.keep_alive)
    if not body.prompt:
        return EmbeddingsResponse(embedding=[])
    peer = peer_of(dict(request.scope.get("state", {})))
    outcome = await embed_texts(services, "/api/embeddings", model, [body.prompt], peer)
    return EmbeddingsResponse(embedding=outcome.vectors()[0])


# The bodies the routes above parse with `json_body`, for the OpenAPI document.
BODIES: dict[str, type[BaseModel]] = {
    "/api/show": ShowRequest,
    "/api/chat": ChatRequest,
    "/api/generate": GenerateRequest,
    "/api/embed": EmbedRequest,
    "/api/embeddings": EmbeddingsRequest,
}
