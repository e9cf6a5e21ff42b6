"""OpenAI-compatible endpoints: thin translation between wire types and a `GenerationRun`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from clawctl.api.errors import validation_error
from clawctl.api.generation import GenerationRun
from clawctl.api.peer import peer_of
from clawctl.api.sse import DONE, TokenFrames, error_frame, frame
from clawctl.engines.base import ChatTurn, Prompt, SamplingParams
from clawctl.errors import ClawError
from clawctl.schemas.openai import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    ChunkDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ModelCard,
    ModelList,
    SamplingRequest,
)
from clawctl.services import Services

router = APIRouter()
Body = TypeVar("Body", ChatCompletionRequest, CompletionRequest)


def json_body(model: type[Body]) -> Callable[[Request], Awaitable[Body]]:
    """Parse the body as JSON whatever its Content-Type (curl -d sends form encoding), as
    llama.cpp's and OpenAI's servers do."""

    async def parse(request: Request) -> Body:
        try:
            return model.model_validate_json(await request.body())
        except ValidationError as exc:
            raise validation_error(exc.errors()) from None

    return parse


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def _sampling(body: SamplingRequest, max_tokens: int | None) -> SamplingParams:
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
    )


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    request: Request, body: ChatCompletionRequest = Depends(json_body(ChatCompletionRequest))
) -> JSONResponse | StreamingResponse:
    prompt = Prompt(chat=tuple(ChatTurn(m.role, m.text()) for m in body.messages))
    run = GenerationRun(
        _services(request),
        "chat",
        body.model,
        prompt,
        _sampling(body, body.token_limit()),
        body.claw,
        peer_of(dict(request.scope["state"])),
        json_mode=body.json_mode(),
        streamed=body.stream,
    )
    await _begin(run)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _chat_stream(run, include_usage),
            media_type="text/event-stream",
            headers=_headers(run, SSE_HEADERS),
        )
    text = await run.answer()
    completion = ChatCompletion(
        id=f"chatcmpl-{run.id}",
        created=run.created,
        model=run.model,
        choices=[
            ChatChoice(message=AssistantMessage(content=text), finish_reason=run.finish_reason)
        ],
        usage=run.usage(),
        claw=run.info(),
    )
    return JSONResponse(completion.model_dump(mode="json"), headers=_headers(run))


async def _begin(run: GenerationRun) -> None:
    """Start the run; a routed one also runs until its answering tier has committed, so the
    response's headers (and any error before that) can be given properly."""
    await run.start()
    if run.policy is not None:
        await run.commit()


def _headers(run: GenerationRun, base: dict[str, str] | None = None) -> dict[str, str]:
    headers = dict(base or {})
    if run.tier_name is not None:
        headers["x-claw-tier"] = run.tier_name
    return headers


async def _chat_stream(run: GenerationRun, include_usage: bool) -> AsyncIterator[bytes]:
    def chunk(delta: ChunkDelta, **extra: Any) -> ChatCompletionChunk:
        finish = extra.pop("finish_reason", None)
        return ChatCompletionChunk(
            id=f"chatcmpl-{run.id}",
            created=run.created,
            model=run.model,
            choices=[ChunkChoice(delta=delta, finish_reason=finish)],
            **extra,
        )

    token = TokenFrames(chunk(ChunkDelta(content=TokenFrames.marker)))
    yield frame(chunk(ChunkDelta(role="assistant", content="")))
    try:
        async for piece in run.text():
            yield token(piece)
    except ClawError as exc:
        yield error_frame(exc)
        return
    yield frame(chunk(ChunkDelta(), finish_reason=run.finish_reason, claw=run.info()))
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
        _sampling(body, body.max_tokens),
        body.claw,
        peer_of(dict(request.scope["state"])),
        json_mode=body.json_mode(),
        streamed=body.stream,
    )
    await _begin(run)
    prefix = prompt.text if body.echo and prompt.text is not None else ""
    if body.stream:
        return StreamingResponse(
            _completion_stream(
                run, prefix, bool(body.stream_options and body.stream_options.include_usage)
            ),
            media_type="text/event-stream",
            headers=_headers(run, SSE_HEADERS),
        )
    text = await run.answer()
    completion = Completion(
        id=f"cmpl-{run.id}",
        created=run.created,
        model=run.model,
        choices=[CompletionChoice(text=prefix + text, finish_reason=run.finish_reason)],
        usage=run.usage(),
        claw=run.info(),
    )
    return JSONResponse(completion.model_dump(mode="json"), headers=_headers(run))


async def _completion_stream(
    run: GenerationRun, prefix: str, include_usage: bool
) -> AsyncIterator[bytes]:
    def chunk(text: str, **extra: Any) -> Completion:
        finish = extra.pop("finish_reason", None)
        return Completion(
            id=f"cmpl-{run.id}",
            created=run.created,
            model=run.model,
            choices=[CompletionChoice(text=text, finish_reason=finish)],
            **extra,
        )

    token = TokenFrames(chunk(TokenFrames.marker))
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


# The bodies the routes above parse with `json_body`, for the OpenAPI document.
BODIES: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
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
