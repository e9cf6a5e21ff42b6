"""One generation request from the API's point of view: submit, wait for the start, stream text,
and summarise what the daemon did (`claw` object, usage, metrics, log line).

Waiting for the job's start before answering means a bad prompt (too long, unknown model, load
failure) becomes a proper 4xx/5xx even for streaming requests, before any SSE header is sent.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator

from clawctl.api.peer import PeerCred
from clawctl.engines.base import Finished, Prompt, SamplingParams, TokenEvent
from clawctl.errors import ClawError
from clawctl.ledger import LedgerRow
from clawctl.scheduler import Failed, JobHandle, Started
from clawctl.schemas.openai import ClawInfo, ClawRequest, Timings, Usage
from clawctl.services import Services
from clawctl.statekeeper import StateRequest

log = logging.getLogger("clawd.requests")


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
    ) -> None:
        self.services = services
        self.endpoint = endpoint
        self.model = model or services.config.default_model
        self.prompt = prompt
        self.params = params
        self.claw = claw
        self.peer = peer
        self.id = uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.started_at = time.perf_counter()
        self.started: Started | None = None
        self.finished: Finished | None = None
        self.first_token_at: float | None = None
        self._handle: JobHandle | None = None
        self._events: AsyncIterator[object] | None = None

    async def start(self) -> None:
        """Submit the job and wait until it has started (or failed)."""
        metrics = self.services.metrics
        try:
            snapshot = self.claw.snapshot
            state = StateRequest(
                load=snapshot.load if snapshot else None,
                save=snapshot.save if snapshot else None,
                session=self.claw.session,
            )
            adapters = self.services.adapter_specs(self.model, self.claw.adapters)
            self._handle = self.services.manager.submit(
                self.model, self.prompt, self.params, self.claw.keep_alive, state, adapters
            )
            self._events = self._handle.events()
            first = await anext(self._events)
            if isinstance(first, Failed):
                raise first.error
            assert isinstance(first, Started)
            self.started = first
        except ClawError as exc:
            metrics.requests.labels(self.endpoint, str(exc.http_status)).inc()
            self._log(f"error {exc.http_status}: {exc.message}")
            await self.aclose()
            raise
        metrics.in_flight.inc()

    async def text(self) -> AsyncIterator[str]:
        """The generated text, piece by piece; raises the job's error if it fails midway."""
        assert self._events is not None
        try:
            async for event in self._events:
                if isinstance(event, TokenEvent):
                    if self.first_token_at is None:
                        self.first_token_at = time.perf_counter()
                    yield event.text
                elif isinstance(event, Finished):
                    self._finish(event)
                elif isinstance(event, Failed):
                    raise event.error
        finally:
            self.services.metrics.in_flight.dec()
            if self.finished is None:
                self._log("cancelled (client went away or failed)")
                self.services.metrics.requests.labels(self.endpoint, "499").inc()
            await self.aclose()

    async def aclose(self) -> None:
        if self._events is not None:
            await self._events.aclose()  # type: ignore[attr-defined]
        if self._handle is not None:
            self._handle.close()

    def _finish(self, done: Finished) -> None:
        self.finished = done
        metrics = self.services.metrics
        metrics.requests.labels(self.endpoint, "200").inc()
        metrics.prompt_tokens.labels(self.model).inc(done.prompt_tokens)
        metrics.completion_tokens.labels(self.model).inc(done.completion_tokens)
        metrics.request_seconds.labels(self.model).observe(time.perf_counter() - self.started_at)
        if self.first_token_at is not None:
            ttft = self.first_token_at - self.started_at
            metrics.first_token_seconds.labels(self.model).observe(ttft)
        self._log(
            f"ok prompt={done.prompt_tokens} completion={done.completion_tokens} "
            f"finish={done.finish_reason}"
        )
        state = self.started.state if self.started else None
        self.services.ledger.record(
            LedgerRow(
                request_id=self.id,
                ts=time.time(),
                uid=self.peer.uid if self.peer else None,
                pid=self.peer.pid if self.peer else None,
                app=self.claw.app,
                endpoint=self.endpoint,
                model=self.model,
                prompt_tokens=done.prompt_tokens,
                completion_tokens=done.completion_tokens,
                usage_by_tier={"local": [done.prompt_tokens, done.completion_tokens]},
                prefill_tokens_saved=state.reused_tokens if state else 0,
                prefix_source=state.source if state else None,
                latency_ms=(time.perf_counter() - self.started_at) * 1000,
                finish_reason=done.finish_reason,
            )
        )

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

    def usage(self) -> Usage:
        done = self.finished
        assert done is not None
        return Usage(
            prompt_tokens=done.prompt_tokens,
            completion_tokens=done.completion_tokens,
            total_tokens=done.prompt_tokens + done.completion_tokens,
        )

    def info(self) -> ClawInfo:
        done, started = self.finished, self.started
        assert done is not None
        assert started is not None
        assert self._handle is not None
        total = time.perf_counter() - self.started_at

        def rate(tokens: int, seconds: float) -> float | None:
            return round(tokens / seconds, 2) if seconds > 0 and tokens > 0 else None

        return ClawInfo(
            model=self.model,
            digest=self._handle.worker.manifest.digest,
            profile=self.services.profile.name,
            request_id=self.id,
            timings=Timings(
                queue_ms=round((started.queue_seconds - started.load_seconds) * 1000, 2),
                load_ms=round(started.load_seconds * 1000, 2),
                prompt_ms=round(done.prompt_seconds * 1000, 2),
                decode_ms=round(done.decode_seconds * 1000, 2),
                total_ms=round(total * 1000, 2),
                prompt_tokens_per_s=rate(done.prompt_tokens, done.prompt_seconds),
                decode_tokens_per_s=rate(done.completion_tokens - 1, done.decode_seconds),
            ),
            adapters=self.claw.adapters,
            prefill_tokens_saved=started.state.reused_tokens,
            prefix_source=started.state.source,
            snapshot_saved=started.state.saved,
            session=self.claw.session,
        )
