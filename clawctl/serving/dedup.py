"""Not paying twice for the same question: coalescing requests in flight and the answer cache.

`open_answer` stands between a route and its `GenerationRun`. For a request that may share its
answer (deterministic - temperature 0 or a fixed seed - or a policy or clawd.toml allowing
sampled ones; no session or snapshot; no `claw.meter`, which asks for the meter's view of a
generation of its own, as calibration does; `claw.cache` not false) it looks, in order, for:

1. an exact hit in the answer cache (same scope and text);
2. an identical request in flight, whose generation it then shares (`coalesced`): one
   generation, every caller gets all of its text, streamed or not;
3. a semantic hit: the last message's embedding within the threshold of a stored one.

Otherwise the request's own run becomes a `Flight` others may join. The flight's generation runs
in its own task, detached from any one caller, so a caller that goes away does not cut off the
others; it is cancelled when its last caller has gone. A flight that ends well (not cancelled,
not degraded) leaves its answer in the cache. Every answer reused is a ledger row of its own with
`cached`, `tokens_saved` and `cost_saved`, and `claw.cached` in the response.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from clawctl.engines.base import FinishReason, TokenLogprob, ToolCall
from clawctl.errors import ClawError
from clawctl.runtime.answer_cache import CacheKey, Hit, StoredAnswer, deterministic, request_key
from clawctl.schemas.openai import ClawInfo, Timings, Usage
from clawctl.serving.generation import GenerationRun, is_policy_name

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("clawd.requests")


class Answer(Protocol):
    """What a route needs of an answer, generated or reused."""

    id: str
    created: int
    model: str

    @property
    def finish_reason(self) -> FinishReason: ...

    @property
    def tier_name(self) -> str | None: ...

    @property
    def calls_constrained(self) -> bool:
        """The text is decoded under the tool-call grammar, so a call's shape is certain
        before it ends and its arguments may stream (`ToolCallParser.stream_arguments`)."""
        ...

    def text(self) -> AsyncIterator[str]: ...

    async def answer(self) -> str: ...

    def usage(self) -> Usage: ...

    def info(self) -> ClawInfo: ...

    def logprobs(self) -> Sequence[TokenLogprob]: ...

    def anticipate(self, content: str, calls: Sequence[ToolCall]) -> None:
        """Called by the route once the whole answer (`content` and the parsed `calls`) went
        out: lets the model that generated it prepare the conversation's next call."""
        ...


@dataclass(frozen=True)
class CachePlan:
    key: CacheKey
    threshold: float


def _plan(run: GenerationRun) -> CachePlan | None:
    """The cache key and settings of a request that may share its answer, else None."""
    services, claw = run.services, run.claw
    settings = services.config.cache
    if not settings.enabled or not claw.cache or claw.session or claw.snapshot or claw.meter:
        return None
    if run.params.logprobs is not None:  # stored and shared answers keep no logprobs
        return None
    threshold, sampled = settings.threshold, settings.sampled
    routing: tuple[str | int | None, ...] = ()
    if is_policy_name(run.model):
        found = services.policies.find(run.model)
        if found is not None:
            routing = (claw.impact, claw.app, run.peer.uid if run.peer else None)
            cache = found.policy.cache
            if not cache.enabled:
                return None
            threshold = cache.threshold if cache.threshold is not None else threshold
            sampled = cache.sampled if cache.sampled is not None else sampled
    if not (deterministic(run.params) or sampled):
        return None
    adapters: tuple[tuple[str, float], ...] = tuple((a.name, a.scale) for a in claw.adapters)
    with contextlib.suppress(ClawError):  # a model's adapters by content, when it is one
        specs = services.adapter_specs(run.model, claw.adapters) if claw.adapters else ()
        adapters = tuple((s.digest, s.scale) for s in specs)
    key = request_key(
        run.endpoint, run.model, run.prompt, run.params, adapters, run.json_mode, routing
    )
    return CachePlan(key, threshold)


@dataclass
class Flights:
    """Generations in flight that identical requests may join, by exact key."""

    running: dict[str, Flight] = field(default_factory=dict)


async def open_answer(run: GenerationRun, flights: Flights) -> Answer:
    """Start answering `run`'s request: from the cache, by joining a flight, or by generating.
    Errors before any text (unknown model, full queue, bad prompt) are raised here."""
    plan = _plan(run)
    if plan is None:
        await begin(run)
        return run
    cache = run.services.answers
    hit = cache.get(plan.key)
    if hit is not None:
        return Reused(run, hit)
    if (flight := flights.running.get(plan.key.exact)) is not None:
        return await flight.join(run)
    vector = None
    if cache.has_scope(plan.key) and (model := _semantic_model(run)) is not None:
        vector = await _embed(run, model, plan.key.text)
        if vector is not None:
            hit = cache.nearest(plan.key, vector, plan.threshold)
            if hit is not None:
                return Reused(run, hit)
        if (flight := flights.running.get(plan.key.exact)) is not None:
            return await flight.join(run)  # an identical request started while we embedded
    else:
        cache.miss()
    flight = Flight(run, plan, vector, flights)
    flights.running[plan.key.exact] = flight
    try:
        await flight.begin()
    except BaseException:
        flights.running.pop(plan.key.exact, None)
        raise
    return flight.view(run)


async def begin(run: GenerationRun) -> None:
    """Start the run; a routed one also runs until its answering tier has committed, so the
    response's headers (and any error before that) can be given properly."""
    await run.start()
    if run.policy is not None:
        await run.commit()


def _semantic_model(run: GenerationRun) -> str | None:
    """The embedding model for semantic lookups, or None (exact matches only) while it is not
    installed. Asked only where an embedding would follow, never on every request."""
    name = run.services.config.cache.embedding_model
    try:
        run.services.embeddings.manifest(name)
    except ClawError:
        return None
    return name


async def _embed(run: GenerationRun, model: str, text: str) -> np.ndarray | None:
    """The text's embedding for the semantic lookup; None (exact matching only) if the
    embedding model fails, which must not fail the request."""
    try:
        vectors = (await run.services.embeddings.embed(model, [text])).vectors
    except (ClawError, OSError, RuntimeError) as exc:
        log.warning("%s semantic cache lookup skipped: %s", run.id, exc)
        return None
    run.services.metrics.embeddings.labels(model).inc()
    vector: np.ndarray = vectors[0]
    return vector


class Flight:
    """One generation shared by the identical requests that arrive while it runs."""

    def __init__(
        self, run: GenerationRun, plan: CachePlan, vector: np.ndarray | None, flights: Flights
    ) -> None:
        self.run, self.plan, self.vector, self.flights = run, plan, vector, flights
        self.pieces: list[str] = []
        self.error: BaseException | None = None
        self.done = False
        self.callers = 0
        self._begun: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def begin(self) -> None:
        try:
            await begin(self.run)
        except BaseException as exc:
            self._begun.set_exception(exc)
            self._begun.exception()  # retrieved: followers re-raise it themselves
            raise
        self._begun.set_result(None)
        self._task = asyncio.create_task(self._pump(), name=f"flight-{self.run.id}")

    async def join(self, run: GenerationRun) -> Answer:
        await asyncio.shield(self._begun)
        return self.view(run)

    def view(self, run: GenerationRun) -> FlightView:
        self.callers += 1
        return FlightView(self, run)

    def leave(self) -> None:
        self.callers -= 1
        if self.callers <= 0 and not self.done and self._task is not None:
            self._task.cancel()  # nobody is listening: stop generating

    def _notify(self) -> None:
        wake, self._wake = self._wake, asyncio.Event()
        wake.set()

    async def _pump(self) -> None:
        complete = False
        try:
            async for piece in self.run.text():
                self.pieces.append(piece)
                self._notify()
            complete = True
        except ClawError as exc:
            self.error = exc
        except asyncio.CancelledError:
            self.error = ClawError("the shared generation was cancelled")  # nobody waits
        finally:
            # Stored for exact hits before anyone hears it is done: the same request sent
            # the moment the answer arrives must find it (embedding it comes after).
            stored = self._stored() if complete else None
            self.done = True
            if self.flights.running.get(self.plan.key.exact) is self:
                del self.flights.running[self.plan.key.exact]
            self._notify()
        if stored is not None and self.vector is None:
            await self._embed_stored(stored)

    def _stored(self) -> StoredAnswer | None:
        """Put the finished answer in the cache (with the prompt's vector if the lookup already
        computed it); None when it is not worth keeping."""
        run = self.run
        if run.degraded or run.finish_reason == "cancelled":
            return None  # a fallback answer is not the answer this request deserves next time
        usage = run.usage()
        stored = StoredAnswer(
            text="".join(self.pieces),
            finish_reason=run.finish_reason,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            info=run.info(),
            request_id=run.id,
            tier=run.tier_name,
        )
        run.services.answers.put(self.plan.key, stored, self.vector)
        return stored

    async def _embed_stored(self, stored: StoredAnswer) -> None:
        """Add the prompt's vector to a stored answer, for semantic hits."""
        run = self.run
        if (model := _semantic_model(run)) is not None:
            vector = await _embed(run, model, self.plan.key.text)
            if vector is not None:
                run.services.answers.put(self.plan.key, stored, vector)

    async def stream(self) -> AsyncIterator[str]:
        index = 0
        while True:
            wake = self._wake
            while index < len(self.pieces):
                yield self.pieces[index]
                index += 1
            if self.done:
                if self.error is not None:
                    raise self.error
                return
            await wake.wait()


class FlightView:
    """One caller's view of a flight: the leader's own run, or a request sharing it."""

    def __init__(self, flight: Flight, run: GenerationRun) -> None:
        self.flight, self.own = flight, run
        self.leader = run is flight.run
        self.id, self.created, self.model = run.id, run.created, flight.run.model
        self._left = False

    @property
    def finish_reason(self) -> FinishReason:
        return self.flight.run.finish_reason

    @property
    def tier_name(self) -> str | None:
        return self.flight.run.tier_name

    @property
    def calls_constrained(self) -> bool:
        return self.flight.run.calls_constrained

    async def text(self) -> AsyncIterator[str]:
        try:
            async for piece in self.flight.stream():
                yield piece
        finally:
            self._leave()
        if not self.leader:
            _record_reuse(self.own, self._stored(), "coalesced", None, time.perf_counter())

    def _leave(self) -> None:
        if not self._left:
            self._left = True
            self.flight.leave()

    async def answer(self) -> str:
        return "".join([piece async for piece in self.text()])

    def usage(self) -> Usage:
        return self.flight.run.usage()

    def _stored(self) -> StoredAnswer:
        source, usage = self.flight.run, self.usage()
        return StoredAnswer(
            text="",
            finish_reason=source.finish_reason,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            info=source.info(),
            request_id=source.id,
            tier=source.tier_name,
        )

    def logprobs(self) -> Sequence[TokenLogprob]:
        return ()  # requests asking for logprobs are never shared (see `_plan`)

    def anticipate(self, content: str, calls: Sequence[ToolCall]) -> None:
        if self.leader:  # one offer per generation, from the request that started it
            self.flight.run.anticipate(content, calls)

    def info(self) -> ClawInfo:
        if self.leader:
            return self.flight.run.info()
        return _reused_info(self.own, self._stored(), "coalesced", None)


class Reused:
    """An answer from the cache, for one request."""

    def __init__(self, run: GenerationRun, hit: Hit) -> None:
        self.run, self.hit = run, hit
        self.id, self.created = run.id, run.created
        self.model = run.model
        self._recorded = False

    @property
    def finish_reason(self) -> FinishReason:
        return self.hit.answer.finish_reason

    @property
    def tier_name(self) -> str | None:
        return self.hit.answer.tier

    @property
    def calls_constrained(self) -> bool:
        return False  # a stored text comes whole: its calls are checked whole

    async def text(self) -> AsyncIterator[str]:
        if self.hit.answer.text:
            yield self.hit.answer.text
        if not self._recorded:
            self._recorded = True
            _record_reuse(
                self.run, self.hit.answer, self.hit.kind, self.hit.similarity, time.perf_counter()
            )

    async def answer(self) -> str:
        return "".join([piece async for piece in self.text()])

    def usage(self) -> Usage:
        stored = self.hit.answer
        return Usage(
            prompt_tokens=stored.prompt_tokens,
            completion_tokens=stored.completion_tokens,
            total_tokens=stored.prompt_tokens + stored.completion_tokens,
        )

    def logprobs(self) -> Sequence[TokenLogprob]:
        return ()  # requests asking for logprobs are never shared (see `_plan`)

    def anticipate(self, content: str, calls: Sequence[ToolCall]) -> None:
        """Nothing ran: the model's context holds nothing of this answer to build on."""

    def info(self) -> ClawInfo:
        return _reused_info(self.run, self.hit.answer, self.hit.kind, self.hit.similarity)


def _reused_info(
    run: GenerationRun, stored: StoredAnswer, kind: str, similarity: float | None
) -> ClawInfo:
    """The original's `claw` info, as seen by a request that reused it."""
    total = (time.perf_counter() - run.started_at) * 1000
    return stored.info.model_copy(
        update={
            "request_id": run.id,
            "timings": Timings(
                queue_ms=0.0,
                load_ms=0.0,
                prompt_ms=0.0,
                decode_ms=0.0,
                total_ms=round(total, 2),
                prompt_tokens_per_s=None,
                decode_tokens_per_s=None,
            ),
            "prefill_tokens_saved": 0,
            "prefix_source": None,
            "snapshot_saved": None,
            "cost": 0.0,
            "cached": kind,
            "similarity": None if similarity is None else round(similarity, 6),
            "cached_from": stored.request_id,
            "tokens_saved": stored.prompt_tokens + stored.completion_tokens,
        }
    )


def _record_reuse(
    run: GenerationRun, stored: StoredAnswer, kind: str, similarity: float | None, now: float
) -> None:
    """Metrics, log line and ledger row of a request answered without generating."""
    services = run.services
    saved = stored.prompt_tokens + stored.completion_tokens
    services.metrics.requests.labels(run.endpoint, "200").inc()
    services.metrics.cache_answers.labels(kind).inc()
    services.metrics.cache_tokens_saved.inc(saved)
    similar = f" similarity={similarity:.4f}" if similarity is not None else ""
    log.info(
        "%s %s model=%s app=%s: ok %s from %s%s tokens_saved=%d",
        run.id,
        run.endpoint,
        run.model,
        run.claw.app or "-",
        kind,
        stored.request_id,
        similar,
        saved,
    )
    info = stored.info
    services.ledger.record(
        run.ledger_row(
            model=info.model,
            policy=info.policy,
            tier_path=f"cache:{kind}",
            prompt_tokens=0,
            completion_tokens=0,
            usage_by_tier={},
            prefill_tokens_saved=0,
            prefix_source=None,
            remote_cost=0.0,
            all_remote_cost=info.all_remote_cost,
            latency_ms=(now - run.started_at) * 1000,
            finish_reason=stored.finish_reason,
            cached=kind,
            tokens_saved=saved,
            cost_saved=info.cost,
        )
    )
