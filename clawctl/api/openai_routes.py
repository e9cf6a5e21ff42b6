"""OpenAI-compatible endpoints: thin translation between wire types and a `GenerationRun`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from clawctl.api.peer import peer_of
from clawctl.api.sse import DONE, TokenFrames, error_frame, frame
from clawctl.api.wire import answer_headers, anticipate_after, json_body
from clawctl.engines.base import (
    ChatTurn,
    Grammar,
    Prompt,
    SamplingParams,
    TokenLogprob,
    ToolCall,
)
from clawctl.errors import ClawError
from clawctl.schemas.openai import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    ChoiceLogprobs,
    ChunkChoice,
    ChunkDelta,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Embedding,
    EmbeddingList,
    EmbeddingRequest,
    EmbeddingUsage,
    FunctionCall,
    FunctionDelta,
    ModelCard,
    ModelList,
    NamedToolChoice,
    SamplingRequest,
    TokenLogprobBody,
    ToolCallBody,
    ToolCallDelta,
    TopLogprob,
)
from clawctl.services import Services
from clawctl.serving.dedup import Answer, Flights, open_answer
from clawctl.serving.embedding import embed_texts
from clawctl.serving.generation import GenerationRun
from clawctl.serving.toolcalls import (
    CallEnd,
    CallStart,
    ContentDelta,
    ToolCallParser,
    ToolEvent,
    parse_tool_calls,
)
from clawctl.serving.tooluse import ToolUse, plan_tool_use, tool_spec

router = APIRouter()


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def _flights(request: Request) -> Flights:
    flights: Flights = request.app.state.flights
    return flights


def _sampling(
    body: SamplingRequest,
    max_tokens: int | None,
    grammar: Grammar | None = None,
    logprobs: int | None = None,
) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        repeat_penalty=body.repeat_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        seed=body.seed,
        stop=tuple(body.stop_list()),
        speculative=body.claw.speculative,
        grammar=grammar,
        logprobs=logprobs,
    )


def _turn(message: ChatMessage) -> ChatTurn:
    calls = tuple(
        ToolCall(c.id, c.function.name, c.function.arguments or "{}")
        for c in message.tool_calls or ()
    )
    return ChatTurn(message.role, message.text(), calls, message.tool_call_id, message.name)


def _tool_use(body: ChatCompletionRequest) -> ToolUse:
    specs = [
        tool_spec(t.function.name, t.function.description, t.function.parameters)
        for t in body.tools or ()
    ]
    choice = body.tool_choice
    named = choice.function.name if isinstance(choice, NamedToolChoice) else choice
    form = body.response_format
    schema = form.json_schema.schema_ if form and form.json_schema else None
    return plan_tool_use(specs, named, body.parallel_tool_calls, schema, body.json_mode())


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    request: Request, body: ChatCompletionRequest = Depends(json_body(ChatCompletionRequest))
) -> JSONResponse | StreamingResponse:
    use = _tool_use(body)
    prompt = Prompt(chat=tuple(_turn(m) for m in body.messages), tools=use.tools)
    run = GenerationRun(
        _services(request),
        "chat",
        body.model,
        prompt,
        _sampling(body, body.token_limit(), use.grammar, body.logprob_alternatives()),
        body.claw,
        peer_of(dict(request.scope.get("state", {}))),
        json_mode=body.json_mode(),
        streamed=body.stream,
        tool_use=use,
    )
    answer = await open_answer(run, _flights(request))
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _chat_stream(answer, include_usage, use, body.logprobs),
            media_type="text/event-stream",
            headers=answer_headers(answer, streamed=True),
        )
    text = await answer.answer()
    finish: Any = answer.finish_reason
    message = AssistantMessage(content=text)
    calls: list[ToolCall] = []
    if use.parses_calls:
        # Whole, every call is checked before it is returned: a call the token limit cut
        # stays text (streamed, it went out as far as it got; see `_chat_stream`).
        parsed = parse_tool_calls(text, use.names, answer.id)
        if parsed.calls:
            finish, calls = "tool_calls", parsed.calls
            message = AssistantMessage(
                content=parsed.content or None,
                tool_calls=[
                    ToolCallBody(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
                    for c in parsed.calls
                ],
            )
    completion = ChatCompletion(
        id=f"chatcmpl-{answer.id}",
        created=answer.created,
        model=answer.model,
        choices=[
            ChatChoice(
                message=message,
                finish_reason=finish,
                logprobs=_logprobs(answer.logprobs()) if body.logprobs else None,
            )
        ],
        usage=answer.usage(),
        claw=answer.info(),
    )
    return JSONResponse(
        completion.model_dump(mode="json"),
        headers=answer_headers(answer),
        background=anticipate_after(answer, message.content or "", calls),
    )


def _logprobs(entries: Sequence[TokenLogprob]) -> ChoiceLogprobs:
    def top(entry: TokenLogprob) -> TopLogprob:
        return TopLogprob(token=entry.token, logprob=entry.logprob, bytes=list(entry.bytes))

    return ChoiceLogprobs(
        content=[
            TokenLogprobBody(
                token=e.token,
                logprob=e.logprob,
                bytes=list(e.bytes),
                top_logprobs=[top(t) for t in e.top],
            )
            for e in entries
        ]
    )


async def _chat_stream(
    run: Answer, include_usage: bool, use: ToolUse, logprobs: bool = False
) -> AsyncIterator[bytes]:
    sent = 0  # logprob entries sent so far

    def fresh() -> ChoiceLogprobs | None:
        """The entries of tokens generated since the last chunk (each chunk carries those of
        the tokens that came before it, text held for a stop string or a call included)."""
        nonlocal sent
        entries = run.logprobs()[sent:] if logprobs else ()
        sent += len(entries)
        return _logprobs(entries) if entries else None

    def chunk(delta: ChunkDelta, **extra: Any) -> ChatCompletionChunk:
        finish = extra.pop("finish_reason", None)
        return ChatCompletionChunk(
            id=f"chatcmpl-{run.id}",
            created=run.created,
            model=run.model,
            choices=[ChunkChoice(delta=delta, finish_reason=finish, logprobs=fresh())],
            **extra,
        )

    fast = TokenFrames(chunk(ChunkDelta(content=TokenFrames.marker)))

    def token(text: str) -> bytes:
        if logprobs:  # each chunk its own entries: no shared template
            return frame(chunk(ChunkDelta(content=text)))
        return fast(text)

    parser = ToolCallParser(use.names, run.id, run.calls_constrained) if use.parses_calls else None

    def frames(events: list[ToolEvent]) -> Iterator[bytes]:
        for event in events:
            if isinstance(event, ContentDelta):
                yield token(event.text)
                continue
            if isinstance(event, CallEnd):
                continue
            if isinstance(event, CallStart):
                delta = ToolCallDelta(
                    index=event.index,
                    id=event.id,
                    type="function",
                    function=FunctionDelta(name=event.name, arguments=""),
                )
            else:
                delta = ToolCallDelta(
                    index=event.index, function=FunctionDelta(arguments=event.text)
                )
            yield frame(chunk(ChunkDelta(tool_calls=[delta])))

    yield frame(chunk(ChunkDelta(role="assistant", content="")))
    pieces: list[str] = []  # the text, for anticipating the next call (parsed: the parser's)
    try:
        async for piece in run.text():
            if parser is None:
                pieces.append(piece)
                yield token(piece)
            else:
                for data in frames(parser.feed(piece)):
                    yield data
    except ClawError as exc:
        yield error_frame(exc)
        return
    finish: Any = run.finish_reason
    content, calls = "".join(pieces), []
    if parser is not None:
        for data in frames(parser.finish()):
            yield data
        if parser.calls and parser.partial is None:
            finish = "tool_calls"
        content, calls = parser.content, parser.calls
    yield frame(chunk(ChunkDelta(), finish_reason=finish, claw=run.info()))
    run.anticipate(content, calls)
    if include_usage:
        yield frame(
            ChatCompletionChunk(
                id=f"chatcmpl-{run.id}",
                created=run.created,
                model=run.model,
                choices=[],
                usage=run.usage(),
            )
        )
    yield DONE


@router.post("/v1/completions", response_model=None)
async def completions(
    request: Request, body: CompletionRequest = Depends(json_body(CompletionRequest))
) -> JSONResponse | StreamingResponse:
    if isinstance(body.prompt, str):
        prompt = Prompt(text=body.prompt)
    elif isinstance(body.prompt[0], str):
        prompt = Prompt(text=str(body.prompt[0]))
    else:
        prompt = Prompt(tokens=tuple(int(t) for t in body.prompt))
    run = GenerationRun(
        _services(request),
        "completions",
        body.model,
        prompt,
        _sampling(body, body.max_tokens, logprobs=body.logprobs),
        body.claw,
        peer_of(dict(request.scope.get("state", {}))),
        json_mode=body.json_mode(),
        streamed=body.stream,
    )
    answer = await open_answer(run, _flights(request))
    prefix = prompt.text if body.echo and prompt.text is not None else ""
    if body.stream:
        return StreamingResponse(
            _completion_stream(
                answer,
                prefix,
                bool(body.stream_options and body.stream_options.include_usage),
                body.logprobs is not None,
            ),
            media_type="text/event-stream",
            headers=answer_headers(answer, streamed=True),
        )
    text = await answer.answer()
    completion = Completion(
        id=f"cmpl-{answer.id}",
        created=answer.created,
        model=answer.model,
        choices=[
            CompletionChoice(
                text=prefix + text,
                finish_reason=answer.finish_reason,
                logprobs=None
                if body.logprobs is None
                else _completion_logprobs(answer.logprobs(), len(prefix), body.logprobs > 0),
            )
        ],
        usage=answer.usage(),
        claw=answer.info(),
    )
    return JSONResponse(completion.model_dump(mode="json"), headers=answer_headers(answer))


def _completion_logprobs(
    entries: Sequence[TokenLogprob], offset: int, with_top: bool
) -> CompletionLogprobs:
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    return CompletionLogprobs(
        tokens=[e.token for e in entries],
        token_logprobs=[e.logprob for e in entries],
        top_logprobs=[{t.token: t.logprob for t in e.top} for e in entries] if with_top else None,
        text_offset=offsets,
    )


async def _completion_stream(
    run: Answer, prefix: str, include_usage: bool, logprobs: bool = False
) -> AsyncIterator[bytes]:
    sent, offset = 0, len(prefix)  # logprob entries sent, and where the next one's text starts

    def fresh() -> CompletionLogprobs | None:
        nonlocal sent, offset
        entries = run.logprobs()[sent:] if logprobs else ()
        if not entries:
            return None
        sent += len(entries)
        shown = _completion_logprobs(entries, offset, any(e.top for e in entries))
        offset += sum(len(e.token) for e in entries)
        return shown

    def chunk(text: str, **extra: Any) -> Completion:
        finish = extra.pop("finish_reason", None)
        return Completion(
            id=f"cmpl-{run.id}",
            created=run.created,
            model=run.model,
            choices=[CompletionChoice(text=text, finish_reason=finish, logprobs=fresh())],
            **extra,
        )

    fast = TokenFrames(chunk(TokenFrames.marker))

    def token(text: str) -> bytes:
        return frame(chunk(text)) if logprobs else fast(text)

    if prefix:
        yield token(prefix)
    try:
        async for piece in run.text():
            yield token(piece)
    except ClawError as exc:
        yield error_frame(exc)
        return
    usage = run.usage() if include_usage else None
    yield frame(chunk("", finish_reason=run.finish_reason, claw=run.info(), usage=usage))
    yield DONE


@router.post("/v1/embeddings")
async def embeddings(
    request: Request, body: EmbeddingRequest = Depends(json_body(EmbeddingRequest))
) -> JSONResponse:
    """Embed texts with an embedding model (default: the answer cache's, minilm-l6). Texts
    longer than the model's limit (256 tokens for MiniLM) are truncated, as
    sentence-transformers does."""
    import base64

    services = _services(request)
    model = body.model or services.config.cache.embedding_model
    peer = peer_of(dict(request.scope.get("state", {})))
    outcome = await embed_texts(
        services, "embeddings", model, body.texts(), peer, dimensions=body.dimensions
    )
    data = []
    for index, vector in enumerate(outcome.result.vectors):
        encoded: list[float] | str = (
            base64.b64encode(vector.astype("<f4").tobytes()).decode()
            if body.encoding_format == "base64"
            else vector.tolist()
        )
        data.append(Embedding(index=index, embedding=encoded))
    tokens = outcome.result.total_tokens
    listing = EmbeddingList(
        data=data, model=model, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
    )
    return JSONResponse(listing.model_dump(mode="json"))


# The bodies the routes above parse with `json_body`, for the OpenAPI document.
BODIES: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/embeddings": EmbeddingRequest,
}


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    """Installed models, then routing policies (a policy's name is usable as a model)."""
    services = _services(request)
    cards = [
        ModelCard(id=m.name, created=int(m.created_at.timestamp()))
        for m in services.store.installed()
    ]
    for name in services.policies.names():
        found = services.policies.find(name)
        if found is not None:
            mtime = int(found.path.stat().st_mtime)
            cards.append(ModelCard(id=name, created=mtime, owned_by="clawd-policy"))
    return ModelList(data=cards)


@router.get("/v1/models/{name}")
async def get_model(name: str, request: Request) -> ModelCard:
    services = _services(request)
    policy = services.policies.find(name) if name in services.policies.names() else None
    if policy is not None:
        return ModelCard(id=name, created=int(policy.path.stat().st_mtime), owned_by="clawd-policy")
    manifest = services.store.get(name)
    return ModelCard(id=manifest.name, created=int(manifest.created_at.timestamp()))
