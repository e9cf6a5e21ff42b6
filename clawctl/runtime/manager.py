"""Resident models: which are loaded, feeding them work, keep-alive and LRU within the budget.

`ModelManager` is used only from the event loop and never calls an engine: it enqueues jobs on a
model's `ModelWorker` and hands back a `JobHandle`. What a model needs (its engine settings and
memory) is `MemoryFit`'s business (fit.py), as ollama keeps memory fitting apart from scheduling.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from clawctl.engines.base import AdapterSpec, LoadEngine, Prompt, SamplingParams
from clawctl.engines.meter import Thresholds
from clawctl.errors import EngineError, Overloaded
from clawctl.profiles import EdgeProfile
from clawctl.runtime.fit import MIB, ManifestLookup, MemoryFit
from clawctl.runtime.jobs import Anticipation, Job
from clawctl.runtime.statekeeper import StateKeeper, StateRequest
from clawctl.runtime.worker import JobHandle, ModelWorker
from clawctl.schemas.admin import LoadedModel
from clawctl.schemas.models import ModelManifest

log = logging.getLogger("clawd.scheduler")


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
        self.fit = MemoryFit(store, profile, self.drafts)
        self._workers: dict[str, ModelWorker] = {}
        self._retiring: list[ModelWorker] = []  # told to stop; joined at shutdown
        self._reaper: asyncio.Task[None] | None = None

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
            settings = self.fit.settings_for(manifest)
            need = self.fit.estimate(manifest, settings)
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

    def anticipate(self, model: str, work: Anticipation) -> None:
        """Offer idle-time work to a loaded model (never loads one for it)."""
        worker = self._workers.get(model)
        if worker is not None and not worker.failed:
            worker.anticipate(work)

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
                sequences=w.settings.parallel,
                kv_cells=w.kv_cells[1],
                kv_cells_used=w.kv_cells[0],
                kv_layout="pool" if w.settings.kv_unified else "streams",
                loaded_at=w.loaded_at,
                last_used=time.time() - (now - w.last_used),
                expires_in=None if w.outstanding else max(0.0, w.keep_alive - (now - w.last_used)),
                active_requests=w.running,
                queued_requests=max(0, w.outstanding - w.running),
                draft=self.drafts.get(w.name) if w.settings.draft_path is not None else None,
                anticipated_tokens=w.anticipated_tokens,
            )
            for w in self._workers.values()
        ]
