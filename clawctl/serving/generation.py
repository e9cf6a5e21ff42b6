"""One generation request from the API's point of view: route it, run its tiers, stream text,
and summarise what the daemon did (`claw` object, usage, metrics, ledger row, log line).

A request whose `model` names a routing policy runs as a cascade: it starts on the tier the
policy's rules choose; a local tier runs with its entropy meter armed and, when the meter fires,
stops at once and hands the request to the next tier. Text of a tier that may still escalate is
held back until the tier commits (its `decide_within` tokens passed, or its answer ended), so a
streaming client never sees text from an abandoned tier; once committed, text streams as it
comes. The HTTP response starts only when the first committed text exists, so its `x-claw-tier`
header names the tier that answers. Any other request runs on the named model alone (its meter
only measures, for `claw.entropy`).

Waiting for the job's start before answering means a bad prompt (too long, unknown model, load
failure) becomes a proper 4xx/5xx even for streaming requests, before any SSE header is sent.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import replace

from clawctl.engines.base import (
    AdapterSpec,
    Finished,
    FinishReason,
    Prompt,
    SamplingParams,
    TokenEvent,
    TokenLogprob,
    ToolCall,
)
from clawctl.engines.meter import Thresholds
from clawctl.errors import BadInput, ClawError, NotFound, RemoteTierError
from clawctl.ledger import DistillExample, LedgerRow
from clawctl.routing.policy import Route, RouteInput, escalation_thresholds, route
from clawctl.routing.remote import RemoteDone, RemoteFailure, RemoteRequest
from clawctl.runtime.anticipation import AFTER_CALLS_SECONDS
from clawctl.runtime.jobs import Anticipation, Failed, Started
from clawctl.runtime.statekeeper import StateRequest
from clawctl.runtime.worker import JobHandle
from clawctl.schemas.openai import (
    AdapterChoice,
    ClawInfo,
    ClawRequest,
    Timings,
    Usage,
)
from clawctl.schemas.policy import POLICY_NAME, Policy, Tier
from clawctl.services import Services
from clawctl.serving import audit
from clawctl.serving.caller import PeerCred
from clawctl.serving.tier_path import TierPath, TierRun
from clawctl.serving.tooluse import NO_TOOLS, ToolUse

log = logging.getLogger("clawd.requests")
# Requests clawd makes of itself (distill evaluations, calibrations, audits): they are counted
# in the ledger like any other, but never become training examples or audit samples.
INTERNAL_APPS = frozenset({"clawctl-distill", "clawctl-calibrate", "clawd-audit"})
DIRECT = Tier(name="local", kind="local", model="-")  # stands for a request without a policy


class GenerationRun:
    def __init__(
        self,
        services: Services,
        endpoint: str,
        model: str | None,
        prompt: Prompt,
        params: SamplingParams,
        claw: ClawRequest,
        peer: PeerCred | None,
        json_mode: bool = False,
        streamed: bool = False,
        tool_use: ToolUse = NO_TOOLS,
    ) -> None:
        self.services = services
        self.endpoint = endpoint
        self.model = model or services.config.default_model
        self.prompt = prompt
        self.params = params
        self.claw = claw
        self.peer = peer
        self.json_mode = json_mode
        self.tool_use = tool_use  # what a remote tier is asked to do with tools and formats
        self._logprobs: list[TokenLogprob] = []  # of the answer's local tokens, in order
        self.id = uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.started_at = time.perf_counter()
        self.started: Started | None = None
        self.finished: Finished | None = None
        self.finish_reason: FinishReason = "stop"  # of the answer, once `text()` is exhausted
        self.first_token_at: float | None = None
        self.policy: Policy | None = None
        self.route: Route | None = None
        self.tiers: tuple[Tier, ...] = (DIRECT,)
        self.path = TierPath(None)
        self.degraded = False
        # Read whole (`answer`): a remote tier's text is held until it is done, so a remote
        # failing midway still falls back to a local answer.
        self.buffered = not streamed
        self._index = 0
        self._handle: JobHandle | None = None
        self._events: AsyncIterator[object] | None = None
        self._pending: list[str] = []  # committed text read ahead by `commit`
        self._text: AsyncGenerator[str, None] | None = None
        self._in_flight = False
        self._done = False
        self._errored = False
        self._stops = False
        self._answer: list[str] = []  # what the client got, for distillation data
        self._adapters: tuple[AdapterSpec, ...] = ()  # the running local tier's

    # --- starting -------------------------------------------------------------------------

    async def start(self) -> None:
        """Route the request and start its first tier (raising its 4xx/5xx errors now)."""
        if self.services.anticipator is not None:
            self.services.anticipator.learn(self.model, self.prompt)
        try:
            self._route()
            await self._start_tier(self._index)
        except ClawError as exc:
            self._count_error(exc)
            await self.aclose()
            raise
        self.services.metrics.in_flight.inc()
        self._in_flight = True

    def _route(self) -> None:
        policies = self.services.policies
        found = policies.find(self.model) if is_policy_name(self.model) else None
        if found is None:
            return
        policy = self.policy = found.policy
        self.path.policy = policy
        if self.prompt.tokens is not None:
            raise BadInput("requests routed by a policy need a text or chat prompt", param="prompt")
        decision = self.route = route(
            policy,
            RouteInput(
                prompt=_prompt_text(self.prompt),
                impact=self.claw.impact,
                json_mode=self.json_mode,
                max_tokens=self.params.max_tokens,
                app=self.claw.app,
                uid=self.peer.uid if self.peer else None,
            ),
        )
        usable = [t for t in decision.tiers if t.kind == "remote" or self._installed(t.model)]
        if not usable:
            missing = ", ".join(t.model for t in decision.tiers)
            raise NotFound(f"policy {policy.name}: none of its models is installed ({missing})")
        self.tiers = tuple(usable)
        temperature = decision.temperature
        if temperature is None and decision.max_temperature is not None:
            temperature = min(self.params.temperature, decision.max_temperature)
        if temperature is not None:
            self.params = replace(self.params, temperature=temperature)

    def _installed(self, model: str) -> bool:
        try:
            self.services.store.get(model)
        except NotFound:
            return False
        return True

    def _may_escalate(self, index: int) -> bool:
        return self.route is not None and self.route.escalate and index + 1 < len(self.tiers)

    def _watch(self, index: int, stop: bool) -> Thresholds:
        tier = self.tiers[index]
        if tier is DIRECT:
            meter = self.claw.meter
            return Thresholds(**meter.model_dump()) if meter else Thresholds()  # measure only
        if not self._may_escalate(index):
            settings = tier.escalate
            return Thresholds(  # measure only, summarised as the tier's thresholds would
                window=settings.window,
                min_tokens=settings.min_tokens,
                decide_within=settings.decide_within,
            )
        thresholds = escalation_thresholds(tier.escalate)
        if self.policy is not None:  # moved online to hold the policy's remote share
            thresholds = self.services.adjuster.thresholds(self.policy, tier, thresholds)
        if not stop or self._next_unavailable(index):
            # Nowhere to go: note a trigger (the answer is then degraded) but finish it.
            return replace(thresholds, stop=False)
        return thresholds

    def _next_unavailable(self, index: int) -> str | None:
        nxt = self.tiers[index + 1]
        if nxt.kind != "remote":
            return None
        remote = self.services.remote(nxt)
        return remote.unavailable()

    async def _start_tier(self, index: int, stop: bool = True) -> None:
        self._index = index
        tier = self.tiers[index]
        if tier.kind == "remote":
            self.path.runs.append(TierRun(tier, tier.model))
            return
        model = self.model if tier is DIRECT else tier.model
        snapshot = self.claw.snapshot
        state = StateRequest(
            load=snapshot.load if snapshot else None,
            save=snapshot.save if snapshot else None,
            session=self.claw.session,
        )
        adapters = self._adapters = self.services.adapter_specs(model, self._adapter_choices(tier))
        watch = self._watch(index, stop)
        self._stops = watch.armed and watch.stop  # a trigger ends the tier: escalate
        self._handle = self.services.manager.submit(
            model,
            self.prompt,
            self.params,
            self.claw.keep_alive,
            state,
            adapters,
            watch,
            self._caller(),
        )
        self._events = self._handle.events()
        first = await anext(self._events)
        if isinstance(first, Failed):
            raise first.error
        assert isinstance(first, Started)
        self.started = first
        self.path.runs.append(TierRun(tier, model))

    def _caller(self) -> str:
        """Who the fair queue is fair between: the declared app, else the peer's uid."""
        if self.claw.app:
            return f"app:{self.claw.app}"
        return f"uid:{self.peer.uid}" if self.peer else "tcp"

    def _adapter_choices(self, tier: Tier) -> list[AdapterChoice]:
        if self.claw.adapters or tier is DIRECT:
            return self.claw.adapters
        chosen = self.route.adapters if self.route and self.route.adapters is not None else None
        uses = chosen if chosen is not None else tier.adapters
        return [AdapterChoice(name=a.name, scale=a.scale) for a in uses]

    # --- running --------------------------------------------------------------------------

    async def commit(self) -> None:
        """Run until the answering tier is known and its first text exists (or it ended), so
        response headers can name the tier. Errors before that are raised here."""
        self._text = self._run()
        with contextlib.suppress(StopAsyncIteration):
            self._pending.append(await anext(self._text))

    async def answer(self) -> str:
        """The whole answer, for a non-streamed response."""
        return "".join([piece async for piece in self.text()])

    async def text(self) -> AsyncIterator[str]:
        """The answer's text, piece by piece; raises a tier's error if it fails midway."""
        if self._text is None:
            self._text = self._run()
        try:
            while self._pending:
                yield self._pending.pop(0)
            async for piece in self._text:
                yield piece
        finally:
            await self._text.aclose()

    async def _run(self) -> AsyncGenerator[str, None]:
        try:
            while True:
                tier = self.tiers[self._index]
                if tier.kind == "remote":
                    async for piece in self._remote(tier):
                        self._answer.append(piece)
                        yield piece
                    if self.path.last.failed is None:
                        break
                    await self._fall_back()
                    continue
                escalated = False
                async with contextlib.aclosing(self._local()) as local:
                    async for held in local:
                        if held is None:
                            escalated = True
                            break
                        self._answer.append(held)
                        yield held
                if not escalated:
                    break
                await self._start_tier(self._index + 1)
            self._finish()
        except ClawError as exc:
            if not self._done:
                self._errored = True
                self._count_error(exc)
            raise
        finally:
            if self._in_flight:
                self.services.metrics.in_flight.dec()
                self._in_flight = False
            if not self._done and not self._errored:
                self._log("cancelled (client went away or failed)")
                self.services.metrics.requests.labels(self.endpoint, "499").inc()
            await self.aclose()

    async def _local(self) -> AsyncGenerator[str | None, None]:
        """Text of the running local tier; None when it gave up (the next tier takes over)."""
        assert self._events is not None
        run = self.path.last
        tier = self.tiers[self._index]
        may_escalate = (
            self._may_escalate(self._index) and escalation_thresholds(tier.escalate).armed
        )
        window = tier.escalate.decide_within
        held: list[str] = []
        pending: list[TokenLogprob] = []  # of held text: dropped with it if the tier gives up
        committed = not may_escalate
        async for event in self._events:
            if isinstance(event, TokenEvent):
                if self.first_token_at is None:
                    self.first_token_at = time.perf_counter()
                if committed:
                    self._logprobs.extend(event.logprobs)
                    yield event.text
                    continue
                held.append(event.text)
                pending.extend(event.logprobs)
                if event.tokens > window:
                    committed = True
                    self._logprobs.extend(pending)
                    yield "".join(held)
            elif isinstance(event, Finished):
                run.prompt_tokens, run.completion_tokens = (
                    event.prompt_tokens,
                    event.completion_tokens,
                )
                run.signals = event.signals
                self.finished, self.finish_reason = event, event.finish_reason
                trigger = event.escalate
                if trigger is not None and self._stops and may_escalate and not committed:
                    # (should the next tier have become unavailable meanwhile, it fails at
                    # once and the fallback re-runs this tier to the end, marked degraded)
                    run.escalated = trigger.describe()
                    await self._close_job()
                    yield None
                    return
                if trigger is not None:
                    self.degraded = True  # unsure, but there was nowhere to go
                    run.escalated = f"{trigger.describe()} (kept: next tier unavailable)"
                if held and not committed:
                    self._logprobs.extend(pending)
                    yield "".join(held)
            elif isinstance(event, Failed):
                raise event.error

    async def _remote(self, tier: Tier) -> AsyncGenerator[str, None]:
        run = self.path.last
        remote = self.services.remote(tier)
        sent = False
        held: list[str] = []  # a non-streamed answer: nothing is shown until the remote is done
        try:
            async with contextlib.aclosing(remote.stream(self._remote_request())) as items:
                async for item in items:
                    if isinstance(item, RemoteDone):
                        run.prompt_tokens = item.prompt_tokens or self.path.local_prompt_tokens()
                        run.completion_tokens = item.completion_tokens
                        self.finish_reason = "length" if item.finish_reason == "length" else "stop"
                    else:
                        if self.first_token_at is None:
                            self.first_token_at = time.perf_counter()
                        if self.buffered:
                            held.append(item)
                            continue
                        sent = True
                        yield item
            if held:
                yield "".join(held)
        except RemoteFailure as failure:
            run.failed = failure.message
            log.warning("%s remote tier %s failed: %s", self.id, tier.name, failure.message)
            if sent or (failure.after_text and not self.buffered):
                raise RemoteTierError(f"{failure.message} after part of its answer") from None
            assert self.policy is not None
            if self.policy.on_remote_failure == "error":
                raise RemoteTierError(failure.message) from None

    async def _fall_back(self) -> None:
        """The remote failed and the policy wants the best local answer: the last local tier
        before it, run to the end without escalating."""
        local = [i for i in range(self._index) if self.tiers[i].kind == "local"]
        if not local:
            assert self.policy is not None
            earlier = [t for t in self.policy.tiers if t.kind == "local" and t not in self.tiers]
            installed = [t for t in earlier if self._installed(t.model)]
            if not installed:
                raise RemoteTierError(f"{self.path.last.failed}; no local tier to fall back on")
            self.tiers = (*self.tiers, installed[-1])
            local = [len(self.tiers) - 1]
        self.degraded = True
        target = local[-1]
        self.tiers = (*self.tiers[: self._index + 1], self.tiers[target])
        await self._start_tier(self._index + 1, stop=False)

    def _remote_request(self) -> RemoteRequest:
        prompt, params, use = self.prompt, self.params, self.tool_use
        return RemoteRequest(
            messages=prompt.chat,
            text=prompt.text,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            stop=params.stop,
            seed=params.seed,
            tools=use.tools,
            tool_choice=use.choice,
            parallel_tool_calls=use.parallel,
            json_output=use.json_output,
            response_schema=use.response_schema,
            request_id=self.id,
        )

    async def _close_job(self) -> None:
        if self._events is not None:
            await self._events.aclose()  # type: ignore[attr-defined]
            self._events = None
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def anticipate(self, content: str, calls: Sequence[ToolCall]) -> None:
        """Once the answer has gone out: offer the local model that gave it the prefix the
        conversation's next call is expected to start with (runtime/anticipation.py)."""
        anticipator = self.services.anticipator
        if anticipator is None or not self._done or self.prompt.chat is None:
            return
        answered = self.path.last
        if answered.tier.kind == "remote":
            return
        expected = anticipator.expected(self.model, self.prompt, content, calls)
        if expected is not None:
            wait = AFTER_CALLS_SECONDS if calls else 0.0
            work = Anticipation(expected, self._adapters, time.monotonic() + wait)
            self.services.manager.anticipate(answered.model, work)

    async def aclose(self) -> None:
        await self._close_job()

    # --- accounting -----------------------------------------------------------------------

    @property
    def tier_name(self) -> str | None:
        """The answering tier of a routed request (what `x-claw-tier` says)."""
        return self.path.last.tier.name if self.policy and self.path.runs else None

    @property
    def calls_constrained(self) -> bool:
        """A local tier decodes calls under the tool-call grammar; a remote one does not."""
        answering = self.tiers[self._index]
        return self.tool_use.grammar is not None and answering.kind != "remote"

    def _count_error(self, exc: ClawError) -> None:
        self.services.metrics.requests.labels(self.endpoint, str(exc.http_status)).inc()
        self._log(f"error {exc.http_status}: {exc.message}")

    def _finish(self) -> None:
        self._done = True
        metrics = self.services.metrics
        answered = self.path.last
        if self.finished is None or answered.tier.kind == "remote":
            self.finished = Finished(
                finish_reason=self.finish_reason,
                prompt_tokens=answered.prompt_tokens,
                completion_tokens=answered.completion_tokens,
                prompt_seconds=0.0,
                decode_seconds=0.0,
            )
        usage = self.usage()
        elapsed = time.perf_counter() - self.started_at
        metrics.requests.labels(self.endpoint, "200").inc()
        operation = "chat" if self.endpoint.endswith("chat") else "text_completion"
        ends = [run.started for run in self.path.runs[1:]] + [time.perf_counter()]
        for run, ended in zip(self.path.runs, ends, strict=True):
            metrics.prompt_tokens.labels(run.model).inc(run.prompt_tokens)
            metrics.completion_tokens.labels(run.model).inc(run.completion_tokens)
            if self.policy is not None:
                metrics.tier_requests.labels(self.policy.name, run.tier.name).inc()
            provider = "openai" if run.tier.kind == "remote" else "clawd"
            metrics.gen_ai_operation(
                operation, provider, run.model, run.prompt_tokens, run.completion_tokens,
                ended - run.started,
            )  # fmt: skip
        metrics.request_seconds.labels(answered.model).observe(elapsed)
        if self.first_token_at is not None:
            ttft = self.first_token_at - self.started_at
            metrics.first_token_seconds.labels(answered.model).observe(ttft)
        if self.path.escalated:
            metrics.escalations.labels(self.policy.name if self.policy else "-").inc()
        if self.finished.drafted:
            metrics.draft_tokens.labels(answered.model).inc(self.finished.drafted)
            metrics.draft_accepted.labels(answered.model).inc(self.finished.accepted)
        self._log(
            f"ok prompt={usage.prompt_tokens} completion={usage.completion_tokens} "
            f"finish={self.finish_reason} path={self.path.text}"
            + (f" reason={self.path.reason}" if self.path.reason else "")
        )
        state = self.started.state if self.started else None
        self.services.ledger.record(
            self.ledger_row(
                model=answered.model,
                policy=self.policy.name if self.policy else None,
                tier_path=self.path.text,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                usage_by_tier={
                    name: [u.prompt_tokens, u.completion_tokens]
                    for name, u in self.path.usage_by_tier().items()
                },
                prefill_tokens_saved=state.reused_tokens if state else 0,
                prefix_source=state.source if state else None,
                remote_cost=self.path.cost,
                all_remote_cost=self.path.all_remote_cost,
                latency_ms=elapsed * 1000,
                escalation_reason=self.path.reason,
                finish_reason=self.finish_reason,
            )
        )
        internal = self.claw.app in INTERNAL_APPS
        stored = self.policy and self.policy.store_prompts and self.path.escalated
        if stored and not self.degraded and not internal:
            self._record_example(answered)
        if not internal:
            self._audit(answered)
        if self.policy is not None:
            for run in self.path.runs:
                if run.tier.kind == "local" and run.signals is not None:
                    self.services.adjuster.observe(
                        self.policy, run.tier, run.signals, run.handed_over, self.path.cost
                    )

    def _audit(self, answered: TierRun) -> None:
        """Offer a request its local tier answered alone to the policy's audit (`[audit]`):
        the next tier answers it too, in the background."""
        policy = self.policy
        following = self._index + 1
        if (
            policy is None
            or policy.audit.share <= 0
            or self.path.escalated
            or self.degraded
            or answered.tier.kind != "local"
            or following >= len(self.tiers)
            or answered.signals is None
        ):
            return
        job = audit.AuditJob(
            request_id=self.id,
            policy=policy,
            tier=answered.tier,
            next_tier=self.tiers[following],
            prompt=self.prompt,
            max_tokens=self.params.max_tokens,
            answer="".join(self._answer),
            features=answered.signals.features(),
        )
        audit.start(self.services, job)

    def ledger_row(self, **fields: object) -> LedgerRow:
        """This request's ledger row: who asked, when, through which endpoint, plus `fields`."""
        return LedgerRow.model_validate(
            {
                "request_id": self.id,
                "ts": time.time(),
                "uid": self.peer.uid if self.peer else None,
                "pid": self.peer.pid if self.peer else None,
                "app": self.claw.app,
                "endpoint": self.endpoint,
                **fields,
            }
        )

    def _record_example(self, answered: TierRun) -> None:
        assert self.policy is not None
        if self.prompt.chat is not None:
            messages = [{"role": t.role, "content": t.content} for t in self.prompt.chat]
        else:
            messages = [{"role": "user", "content": self.prompt.text or ""}]
        self.services.ledger.record_example(
            DistillExample(
                request_id=self.id,
                ts=time.time(),
                policy=self.policy.name,
                app=self.claw.app,
                tier=answered.tier.name,
                messages=messages,
                answer="".join(self._answer),
            )
        )

    def usage(self) -> Usage:
        return self.path.usage()

    def logprobs(self) -> Sequence[TokenLogprob]:
        """The answer's tokens with their log-probabilities so far, when the request asked
        (`params.logprobs`); none for text a remote tier wrote."""
        return self._logprobs

    def _log(self, outcome: str) -> None:
        caller = f"uid={self.peer.uid} pid={self.peer.pid}" if self.peer else "tcp"
        log.info(
            "%s %s model=%s %s app=%s: %s",
            self.id,
            self.endpoint,
            self.model,
            caller,
            self.claw.app or "-",
            outcome,
        )

    def info(self) -> ClawInfo:
        done, started = self.finished, self.started
        assert done is not None
        total = time.perf_counter() - self.started_at
        answered = self.path.last
        local = answered.tier.kind == "local"

        def rate(tokens: int, seconds: float) -> float | None:
            return round(tokens / seconds, 2) if seconds > 0 and tokens > 0 else None

        digest = None
        if local:
            digest = self.services.store.get(answered.model).digest
        # The prompt's time: restoring or prefilling its state, then the engine's own part.
        prompt_seconds = done.prompt_seconds + (started.prefill_seconds if started else 0.0)
        reused = started.state.reused_tokens if started else 0
        signals = self.path.signals
        return ClawInfo(
            model=answered.model,
            digest=digest,
            profile=self.services.profile.name,
            request_id=self.id,
            timings=Timings(
                queue_ms=round((started.queue_seconds - started.load_seconds) * 1000, 2)
                if started
                else 0.0,
                load_ms=round(started.load_seconds * 1000, 2) if started else 0.0,
                prompt_ms=round(prompt_seconds * 1000, 2),
                decode_ms=round(done.decode_seconds * 1000, 2),
                total_ms=round(total * 1000, 2),
                prompt_tokens_per_s=rate(done.prompt_tokens - reused, prompt_seconds),
                decode_tokens_per_s=rate(done.completion_tokens - 1, done.decode_seconds),
            ),
            adapters=self._adapter_choices(answered.tier) if local else [],
            prefill_tokens_saved=started.state.reused_tokens if started else 0,
            prefix_source=started.state.source if started else None,
            snapshot_saved=started.state.saved if started else None,
            session=self.claw.session,
            draft_tokens=done.drafted,
            draft_accepted=done.accepted,
            policy=self.policy.name if self.policy else None,
            rule=self.route.rule if self.route else None,
            tier=self.tier_name,
            path=self.path.names if self.policy else [],
            escalated=self.path.escalated,
            reason=self.path.reason,
            degraded=self.degraded,
            entropy=signals.rounded() if signals else None,
            usage_by_tier=self.path.usage_by_tier() if self.policy else {},
            cost=round(self.path.cost, 8),
            all_remote_cost=round(self.path.all_remote_cost, 8),
        )


def _prompt_text(prompt: Prompt) -> str:
    if prompt.chat is not None:
        return "\n".join(turn.content for turn in prompt.chat)
    return prompt.text or ""


def is_policy_name(name: str) -> bool:
    return re.fullmatch(POLICY_NAME, name) is not None
