"""Resident models: one dedicated thread per loaded model, a memory budget, keep-alive and LRU.

Why a thread per model and not a pool: llama-cpp-python's OpenMP build decodes ~106 tok/s from one
thread but ~28 tok/s once a second thread has touched the same model, so a model is loaded, used
and closed by exactly one `ModelWorker` thread, fed by a queue. The asyncio side (`ModelManager`)
never calls an engine; it only enqueues jobs and reads their events. The worker interleaves
jobs in one context (continuous batching): between decode steps it admits queued jobs while the
engine has room (`Engine.admits`), so concurrent requests share each decode call instead of
waiting for one another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from clawctl.engines.base import (
    AdapterSpec,
    Engine,
    EngineSettings,
    Finished,
    LoadEngine,
    PreparedPrompt,
    Prompt,
    SamplingParams,
    TokenEvent,
    estimate_kv_bytes,
)
from clawctl.engines.meter import Thresholds
from clawctl.errors import BadInput, ClawError, ContextOverflow, EngineError, Overloaded
from clawctl.profiles import EdgeProfile
from clawctl.schemas.admin import LoadedModel
from clawctl.statekeeper import StateKeeper, StateOutcome, StateRequest
from clawctl.store.models import ModelManifest

log = logging.getLogger("clawd.scheduler")
MIB = 1 << 20


class ManifestLookup(Protocol):
    def get(self, name: str) -> ModelManifest: ...

    def blob_path(self, digest: str) -> Path: ...

    def model_dir(self, manifest: ModelManifest) -> Path: ...


NO_STATE = StateOutcome(0, None)


@dataclass(frozen=True)
class Started:
    """The job left the queue: the prompt is tokenized, fits the context, and its state is ready."""

    prompt_tokens: int
    queue_seconds: float
    load_seconds: float
    state: StateOutcome = NO_STATE


@dataclass(frozen=True)
class Failed:
    error: ClawError


JobEvent = Started | TokenEvent | Finished | Failed


@dataclass
class Job:
    prompt: Prompt
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[JobEvent]
    state: StateRequest = field(default_factory=StateRequest)
    adapters: tuple[AdapterSpec, ...] = ()
    watch: Thresholds | None = None
    caller: str = "-"  # who asked (app or uid): the fair queue's key
    prepared: PreparedPrompt | None = None  # tokenized once, while waiting to join
    cancel: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.perf_counter)

    def emit(self, event: JobEvent) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


def emit_all(deliveries: list[tuple[Job, JobEvent]]) -> None:
    """Hand one decode step's events to their jobs with one wake-up of each event loop, not one
    per token: on a 2-core box every wake-up takes a core from the decoding threads."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, JobEvent]]] = {}
    for job, event in deliveries:
        by_loop.setdefault(job.loop, []).append((job, event))
    for loop, items in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
            loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[Job, JobEvent]]) -> None:
    for job, event in items:
        job.events.put_nowait(event)


class FairQueue:
    """The jobs waiting for one model, served fairly across callers: the next job comes from
    the caller served least since the queue was last empty (FIFO within a caller), so an app
    that sends a burst waits behind itself, not in front of everybody else."""

    def __init__(self) -> None:
        self._ready = threading.Condition()
        self._waiting: dict[str, deque[Job]] = {}  # insertion order: ties go to earlier callers
        self._served: dict[str, int] = {}
        self._stopped = False

    def put(self, job: Job) -> None:
        with self._ready:
            self._waiting.setdefault(job.caller, deque()).append(job)
            self._ready.notify()

    def stop(self) -> None:
        """Wake the consumer with None once the jobs already queued are taken."""
        with self._ready:
            self._stopped = True
            self._ready.notify()

    def take(self, wait: bool) -> Job | None:
        """The next job; None when the queue is empty and `wait` is false, or once stopped."""
        with self._ready:
            while not self._waiting:
                if self._stopped or not wait:
                    return None
                self._ready.wait()
            caller = min(self._waiting, key=lambda c: self._served.get(c, 0))
            jobs = self._waiting[caller]
            job = jobs.popleft()
            if not jobs:
                del self._waiting[caller]
            self._served[caller] = self._served.get(caller, 0) + 1
            if not self._waiting:
                self._served.clear()
            return job


class ModelWorker:
    """Owns one engine on one thread for the engine's whole life."""

    def __init__(
        self,
        manifest: ModelManifest,
        settings: EngineSettings,
        load_engine: LoadEngine,
        estimate: int,
        keep_alive: float,
        keeper: StateKeeper | None = None,
    ) -> None:
        self.manifest = manifest
        self.keeper = keeper
        self.settings = settings
        self.memory_bytes = estimate
        self.keep_alive = keep_alive
        self.loaded_at = time.time()
        self.last_used = time.monotonic()
        self.outstanding = 0  # queued + running, counted on the event loop
        self.outstanding_by_caller: dict[str, int] = {}
        self.load_seconds = 0.0
        self.failed = False
        self._running: dict[int, Job] = {}  # by the engine's generation id
        self._adapters: tuple[AdapterSpec, ...] = ()
        self._exclusive = False  # the open generation needs the context to itself
        self._loaded = threading.Event()
        self._load_engine = load_engine
        self._jobs = FairQueue()
        self._thread = threading.Thread(
            target=self._run, name=f"model:{manifest.name}", daemon=True
        )
        self._thread.start()

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def running(self) -> int:
        """Generations open in the engine (a size read across threads: atomic in CPython)."""
        return len(self._running)

    def submit(self, job: Job) -> None:
        self._jobs.put(job)

    def stop(self) -> None:
        self._jobs.stop()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        started = time.perf_counter()
        try:
            engine = self._load_engine(self.settings)
        except Exception as exc:
            error = exc if isinstance(exc, ClawError) else EngineError(f"loading failed: {exc}")
            self.failed = True
            log.error("model %s failed to load: %s", self.name, error.message)
            self._loaded.set()
            while (job := self._jobs.take(wait=True)) is not None:
                job.emit(Failed(error))
            return
        self.load_seconds = time.perf_counter() - started
        self.memory_bytes = engine.memory_bytes()
        self._loaded.set()
        log.info("model %s loaded in %.2fs", self.name, self.load_seconds)
        try:
            self._serve(engine, started)
        finally:
            engine.close()
            log.info("model %s unloaded", self.name)

    def _serve(self, engine: Engine, load_started: float) -> None:
        """Continuous batching: between decode steps, admit queued jobs while the engine has
        room; a job that cannot join yet (another adapter set, a session or snapshot, which
        need the context to themselves, or no room) waits at the head until it can."""
        waiting: Job | None = None
        while True:
            while True:
                if waiting is None:
                    if engine.active >= engine.parallel:
                        break  # queued jobs stay in the fair queue until a slot is free
                    waiting = self._jobs.take(wait=engine.active == 0)
                    if waiting is None:
                        break
                if not self._start(engine, waiting, load_started):
                    break
                waiting = None
            if engine.active:
                self._step(engine)
            elif waiting is None:
                return  # stopped, and every job is done

    def _start(self, engine: Engine, job: Job, load_started: float) -> bool:
        """Open the job's generation, or fail it; False if it has to wait for the others."""
        if job.cancel.is_set():
            job.emit(Failed(ClawError("cancelled before it started")))
            return True
        busy = engine.active > 0
        exclusive = job.state.needs_context()
        if busy and (exclusive or self._exclusive or job.adapters != self._adapters):
            return False
        try:
            if not busy:
                engine.set_adapters(job.adapters)
                self._adapters = job.adapters
            if job.prepared is None:
                job.prepared = engine.prepare(job.prompt)
            prepared = job.prepared
            if len(prepared.tokens) >= engine.n_ctx:
                raise ContextOverflow(
                    f"the prompt has {len(prepared.tokens)} tokens but the context of "
                    f"{self.name} holds {engine.n_ctx}; shorten it",
                    param="messages",
                )
            if busy and not engine.admits(prepared, job.params):
                return False
            waited_for_load = job.enqueued_at < load_started + self.load_seconds
            queued = time.perf_counter() - job.enqueued_at
            outcome = NO_STATE
            if not engine.stateful and job.state.needs_context():
                raise BadInput(
                    f"{self.name} cannot save or restore state (snapshots, sessions): "
                    "that needs a GGUF model",
                    param="claw",
                )
            if self.keeper is not None and not busy and engine.stateful:
                outcome = self.keeper.before(engine, prepared.tokens, job.state)
            slot = engine.open(prepared, job.params, job.cancel.is_set, job.watch)
            if busy and (shared := engine.shared_prefix(slot)):
                outcome = StateOutcome(shared, "memory")  # copied from a running sequence
            job.emit(
                Started(
                    prompt_tokens=len(prepared.tokens),
                    queue_seconds=queued,
                    load_seconds=self.load_seconds if waited_for_load else 0.0,
                    state=outcome,
                )
            )
        except ClawError as exc:
            job.emit(Failed(exc))
            return True
        except Exception as exc:
            log.exception("could not start a generation on %s", self.name)
            job.emit(Failed(EngineError(f"generation failed: {exc}")))
            return True
        self._running[slot] = job
        self._exclusive = exclusive
        return True

    def _step(self, engine: Engine) -> None:
        try:
            events = engine.step()
        except Exception as exc:
            log.exception("decoding failed on %s", self.name)
            error = exc if isinstance(exc, ClawError) else EngineError(f"generation failed: {exc}")
            for job in self._running.values():
                job.emit(Failed(error))
            self._running.clear()
            self._exclusive = False
            return
        deliveries: list[tuple[Job, JobEvent]] = []
        finished: list[Job] = []
        for slot, event in events:
            job = self._running[slot]
            if isinstance(event, Finished):
                del self._running[slot]  # before the caller hears of it: it may ask at once
                finished.append(job)
            deliveries.append((job, event))
        emit_all(deliveries)
        for job in finished:
            self._finished(engine, job)

    def _finished(self, engine: Engine, job: Job) -> None:
        if self.keeper is not None and job.state.session and engine.stateful:
            try:  # after the response: freezing the session never delays it
                self.keeper.after(engine, job.state)
            except Exception:
                log.exception("could not freeze session %s", job.state.session)
        if not self._running:
            self._exclusive = False
            engine.release_adapters()  # frees adapters removed while jobs used them


class JobHandle:
    """The asyncio side of one job: iterate its events; closing it cancels the generation."""

    def __init__(
        self, job: Job, worker: ModelWorker, on_done: Callable[[ModelWorker, Job], None]
    ) -> None:
        self.job = job
        self.worker = worker
        self._on_done = on_done
        self._done = False

    async def events(self) -> AsyncIterator[JobEvent]:
        try:
            while True:
                event = await self.job.events.get()
                yield event
                if isinstance(event, Finished | Failed):
                    return
        finally:
            self.close()

    def close(self) -> None:
        if not self._done:
            self._done = True
            self.job.cancel.set()
            self._on_done(self.worker, self.job)


class ModelManager:
    """Which models are resident, and feeding them work. Used only from the event loop."""

    def __init__(
        self,
        store: ManifestLookup,
        profile: EdgeProfile,
        load_engine: LoadEngine,
        keep_alive: float,
        max_queue: int,
        keeper: StateKeeper | None = None,
        drafts: Mapping[str, str] | None = None,
    ) -> None:
        self.store = store
        self.drafts = dict(drafts or {})
        self.keeper = keeper
        self.profile = profile
        self.load_engine = load_engine
        self.keep_alive = keep_alive
        self.max_queue = max_queue
        self.budget_bytes = profile.memory_budget_mb * MIB
        self._workers: dict[str, ModelWorker] = {}
        self._retiring: list[ModelWorker] = []  # told to stop; joined at shutdown
        self._reaper: asyncio.Task[None] | None = None

    def settings_for(self, manifest: ModelManifest) -> EngineSettings:
        if manifest.onnx is not None:
            return self._onnx_settings(manifest)
        n_ctx = self.profile.n_ctx
        info = manifest.gguf_info()
        if info.pooling_type:
            raise BadInput(
                f"model {manifest.name!r} is an embedding model: use /v1/embeddings",
                param="model",
            )
        context_length = info.context_length
        if context_length:
            n_ctx = min(n_ctx, context_length)
        draft = self._draft_for(manifest)
        return EngineSettings(
            model_path=self.store.blob_path(manifest.digest),
            n_ctx=n_ctx,
            n_batch=self.profile.n_batch,
            n_threads=self.profile.effective_threads(),
            kv_cache_type=self.profile.kv_cache_type,
            flash_attn=self.profile.flash_attn,
            model_digest=manifest.digest,
            parallel=self.profile.parallel,
            draft_max=self.profile.draft_max,
            draft_path=None if draft is None else self.store.blob_path(draft.digest),
        )

    def _draft_for(self, manifest: ModelManifest) -> ModelManifest | None:
        """The draft model configured for `manifest` ([drafts] in clawd.toml), if any."""
        name = self.drafts.get(manifest.name)
        if name is None or self.profile.draft_max == 0:
            return None
        try:
            draft = self.store.get(name)
        except ClawError as exc:
            raise EngineError(f"the draft model for {manifest.name!r}: {exc}") from None
        if draft.gguf is None or draft.gguf_info().pooling_type:
            raise EngineError(
                f"the draft model {name!r} for {manifest.name!r} must be a GGUF generation model"
            )
        return draft

    def _onnx_settings(self, manifest: ModelManifest) -> EngineSettings:
        onnx = manifest.onnx
        assert onnx is not None
        if onnx.task != "generation":
            raise BadInput(
                f"model {manifest.name!r} is an embedding model: use /v1/embeddings",
                param="model",
            )
        return EngineSettings(
            model_path=self.store.model_dir(manifest),
            n_ctx=min(self.profile.n_ctx, onnx.context_length or self.profile.n_ctx),
            n_batch=self.profile.n_batch,
            n_threads=self.profile.effective_threads(),
            kv_cache_type="f32",
            model_digest=manifest.digest,
            format="onnx",
        )

    def estimate(self, manifest: ModelManifest, settings: EngineSettings) -> int:
        if manifest.onnx is not None:  # one generation at a time
            onnx = manifest.onnx
            kv_bytes = estimate_kv_bytes(
                onnx.layers or 0, settings.n_ctx, onnx.kv_width or 0, settings.kv_cache_type
            )
            return manifest.size + kv_bytes
        total = 0
        draft = self._draft_for(manifest) if settings.draft_path is not None else None
        for model in (manifest, draft):
            if model is None:
                continue
            info = model.gguf_info()
            width = info.kv_width or info.embedding_length or 0
            kv = estimate_kv_bytes(
                info.block_count or 0, settings.n_ctx, width, settings.kv_cache_type
            ) * max(1, settings.parallel)  # a KV stream per sequence
            total += model.size + kv
        return total

    def _make_room(self, need: int, name: str) -> None:
        """Evict idle models, least recently used first, until `need` bytes and a slot fit."""
        if need > self.budget_bytes:
            raise EngineError(
                f"{name} needs ~{need // MIB} MiB but profile {self.profile.name} allows "
                f"{self.budget_bytes // MIB} MiB; pick a larger profile or a smaller model"
            )
        by_age = sorted(self._workers.values(), key=lambda w: w.last_used)
        for worker in by_age:
            used = sum(w.memory_bytes for w in self._workers.values())
            full = len(self._workers) >= self.profile.max_loaded_models
            if used + need <= self.budget_bytes and not full:
                return
            if worker.outstanding == 0:
                self._unload(worker, "memory budget")
        used = sum(w.memory_bytes for w in self._workers.values())
        if used + need > self.budget_bytes or len(self._workers) >= self.profile.max_loaded_models:
            raise Overloaded(f"all loaded models are busy; {name} cannot be loaded yet, retry")

    def _unload(self, worker: ModelWorker, why: str) -> None:
        log.info("unloading %s (%s)", worker.name, why)
        self._workers.pop(worker.name, None)
        worker.stop()
        self._retiring = [w for w in self._retiring if w.is_alive()] + [worker]

    def _worker_for(self, manifest: ModelManifest) -> ModelWorker:
        worker = self._workers.get(manifest.name)
        if worker is not None and (worker.failed or worker.manifest.digest != manifest.digest):
            if worker.outstanding == 0:
                self._unload(worker, "replaced")
            worker = None
        if worker is None:
            settings = self.settings_for(manifest)
            need = self.estimate(manifest, settings)
            self._make_room(need, manifest.name)
            worker = ModelWorker(
                manifest, settings, self.load_engine, need, self.keep_alive, self.keeper
            )
            self._workers[manifest.name] = worker
        return worker

    def submit(
        self,
        model: str,
        prompt: Prompt,
        params: SamplingParams,
        keep_alive: float | None = None,
        state: StateRequest | None = None,
        adapters: tuple[AdapterSpec, ...] = (),
        watch: Thresholds | None = None,
        caller: str = "-",
    ) -> JobHandle:
        """Queue a generation. The model's queue is bounded (`max_queue`, then 503), and one
        caller may hold at most three quarters of it, so a burst from one app leaves room for
        the others; the queue itself serves callers fairly (`FairQueue`)."""
        manifest = self.store.get(model)
        worker = self._worker_for(manifest)
        if worker.outstanding >= self.max_queue:
            raise Overloaded(f"{model} has {worker.outstanding} requests waiting; retry shortly")
        mine = worker.outstanding_by_caller.get(caller, 0)
        if mine >= self.per_caller_limit:
            raise Overloaded(
                f"{model} already has {mine} requests from this caller waiting; retry shortly"
            )
        if keep_alive is not None:
            worker.keep_alive = keep_alive
        job = Job(
            prompt,
            params,
            asyncio.get_running_loop(),
            asyncio.Queue(),
            state or StateRequest(),
            adapters=adapters,
            watch=watch,
            caller=caller,
        )
        worker.outstanding += 1
        worker.outstanding_by_caller[caller] = mine + 1
        worker.last_used = time.monotonic()
        worker.submit(job)
        return JobHandle(job, worker, self._job_done)

    @property
    def per_caller_limit(self) -> int:
        return self.max_queue - self.max_queue // 4

    def _job_done(self, worker: ModelWorker, job: Job) -> None:
        worker.outstanding -= 1
        left = worker.outstanding_by_caller.get(job.caller, 1) - 1
        if left > 0:
            worker.outstanding_by_caller[job.caller] = left
        else:
            worker.outstanding_by_caller.pop(job.caller, None)
        worker.last_used = time.monotonic()
        if worker.failed and worker.outstanding == 0 and self._workers.get(worker.name) is worker:
            self._unload(worker, "failed to load")

    def reap_idle(self) -> None:
        now = time.monotonic()
        for worker in list(self._workers.values()):
            if worker.outstanding == 0 and now - worker.last_used >= worker.keep_alive:
                self._unload(worker, "keep-alive expired")

    async def run_reaper(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            self.reap_idle()

    def start(self) -> None:
        self._reaper = asyncio.get_running_loop().create_task(self.run_reaper())

    async def stop(self, timeout: float = 10.0) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for worker in list(self._workers.values()):
            self._unload(worker, "shutdown")
        deadline = time.monotonic() + timeout
        for worker in self._retiring:
            await asyncio.to_thread(worker.join, max(0.0, deadline - time.monotonic()))

    def loaded(self) -> list[LoadedModel]:
        now = time.monotonic()
        return [
            LoadedModel(
                name=w.name,
                digest=w.manifest.digest,
                size=w.manifest.size,
                memory_bytes=w.memory_bytes,
                n_ctx=w.settings.n_ctx,
                loaded_at=w.loaded_at,
                last_used=time.time() - (now - w.last_used),
                expires_in=None if w.outstanding else max(0.0, w.keep_alive - (now - w.last_used)),
                active_requests=w.running,
                queued_requests=max(0, w.outstanding - w.running),
                draft=self.drafts.get(w.name) if w.settings.draft_path is not None else None,
            )
            for w in self._workers.values()
        ]
