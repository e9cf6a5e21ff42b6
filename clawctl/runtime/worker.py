"""One loaded model on its own thread for the engine's whole life, fed by a fair queue.

Why a thread per model and not a pool: llama-cpp-python's OpenMP build decodes ~106 tok/s from one
thread but ~28 tok/s once a second thread has touched the same model, so a model is loaded, used
and closed by exactly one `ModelWorker` thread. The worker interleaves jobs in one context
(continuous batching): between decode steps it admits queued jobs while the engine has room
(`Engine.admits`), so concurrent requests share each decode call instead of waiting for one
another. Long prompts are tokenized on a second thread where the engine allows it
(`runtime/preparer.py`), so they do not stall the others. `JobHandle` is the asyncio side of one
job.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable

from clawctl.engines.base import (
    AdapterSpec,
    Engine,
    EngineSettings,
    Finished,
    LoadEngine,
    PreparesConcurrently,
)
from clawctl.errors import BadInput, ClawError, ContextOverflow, EngineError
from clawctl.runtime.fair_queue import FairQueue
from clawctl.runtime.jobs import (
    NO_STATE,
    Anticipation,
    Failed,
    Job,
    JobEvent,
    Started,
    emit_all,
)
from clawctl.runtime.preparer import LONG_PROMPT_CHARS, Preparer, prompt_chars
from clawctl.runtime.statekeeper import StateKeeper, StateOutcome
from clawctl.schemas.models import ModelManifest
from clawctl.schemas.state import common_prefix

log = logging.getLogger("clawd.worker")

# Anticipation computes at most this many tokens (a turn the client is expected to send back),
# in chunks between which a waiting job takes over: a chunk at 12k tokens of depth costs about
# as long as a request waits for it (~0.7 s for 32 tokens on a 2-core x86 box, Qwen2.5-0.5B).
ANTICIPATE_MAX = 256
ANTICIPATE_CHUNK = 32
# ... and only on top of a prefix the memory sequence holds already: re-anticipating a whole
# conversation the context no longer holds is what the prefix pool is for.
ANTICIPATE_MIN_HELD = 64


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
        # (held, total) KV cells, published by the model's thread after each step for `ps`.
        self.kv_cells = (0, settings.cells())
        self.keep_alive = keep_alive
        self.loaded_at = time.time()
        self.last_used = time.monotonic()
        self.outstanding = 0  # queued + running, counted on the event loop
        self.outstanding_by_caller: dict[str, int] = {}
        self.load_seconds = 0.0
        self.failed = False
        self.anticipated_tokens = 0  # computed before the requests that were expected to need them
        self._running: dict[int, Job] = {}  # by the engine's generation id
        self._adapters: tuple[AdapterSpec, ...] = ()
        self._exclusive = False  # the open generation needs the context to itself
        self._loaded = threading.Event()
        self._load_engine = load_engine
        self._jobs = FairQueue()
        self._preparer: Preparer | None = None  # started with the first long prompt
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

    def anticipate(self, work: Anticipation) -> None:
        """Offer idle-time work (replacing any not yet done); jobs always come first."""
        self._jobs.anticipate(work)

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
        self.kv_cells = engine.kv_cells()
        self._loaded.set()
        log.info("model %s loaded in %.2fs", self.name, self.load_seconds)
        try:
            self._serve(engine, started)
        finally:
            if self._preparer is not None:
                self._preparer.close()  # before the engine goes: it may be tokenizing
            engine.close()
            log.info("model %s unloaded", self.name)

    def _serve(self, engine: Engine, load_started: float) -> None:
        """Continuous batching: between decode steps, admit queued jobs while the engine has
        room; a job that cannot join yet (another adapter set, a session or snapshot, which
        need the context to themselves, or no room) waits at the head until it can. A long
        prompt goes to the preparer thread first and rejoins the queue tokenized, so the jobs
        behind it are admitted and decoded meanwhile."""
        waiting: Job | None = None
        while True:
            while True:
                if waiting is None:
                    if engine.active >= engine.parallel:
                        break  # queued jobs stay in the fair queue until a slot is free
                    waiting = self._jobs.take(wait=engine.active == 0)
                    if waiting is None:
                        break
                    if self._hand_off(engine, waiting):
                        waiting = None
                        continue
                if not self._start(engine, waiting, load_started):
                    break
                waiting = None
            if engine.active:
                self._step(engine)
                self.kv_cells = engine.kv_cells()
            elif waiting is None:
                if (work := self._jobs.take_idle()) is not None:
                    self._anticipate(engine, work)
                    self.kv_cells = engine.kv_cells()
                elif self._jobs.stopped and not (self._preparer and self._preparer.wait_idle()):
                    return  # stopped, and every job is done (none is still being tokenized)

    def _anticipate(self, engine: Engine, work: Anticipation) -> None:
        """Make the idle memory sequence hold the prefix the next request is expected to
        start with, so that request computes only what is new in it.

        An agent's next call re-sends the conversation with the answer just given appended as
        the template renders it, which is not token for token what was generated (and OpenClaw
        also moves its last turn behind the new ones), so without this the answer's tokens are
        computed again, at the full depth of the context, while the caller waits. Computing
        them while the caller runs its tool costs nothing it waits for: a job arriving meanwhile
        takes over between chunks, and what was computed so far is still a longer prefix. A
        stop (an unload, clawd shutting down) ends it between chunks too: nobody waits for it
        then, and a service manager waits for the stop."""
        if not engine.stateful or work.adapters != self._adapters:
            return  # switching adapters would drop the cells this would build on
        try:
            first, second = (engine.prepare(p).tokens for p in work.prompts)
            target = first[: common_prefix(first, second)]
            held = engine.held_prefix(target)
            if held < ANTICIPATE_MIN_HELD or not 0 < len(target) - held <= ANTICIPATE_MAX:
                return
            if len(target) >= engine.n_ctx:
                return
            started, done = time.perf_counter(), held
            while done < len(target) and not (self._jobs.has_jobs() or self._jobs.stopped):
                done = min(len(target), done + ANTICIPATE_CHUNK)
                engine.prefill(target[:done])
        except ClawError as exc:  # the template refused the expected turn: nothing to do
            log.debug("no anticipation on %s: %s", self.name, exc.message)
            return
        except Exception:
            log.exception("anticipation failed on %s", self.name)
            return
        self.anticipated_tokens += done - held
        log.info(
            "model %s: anticipated %d tokens after a prefix of %d in %.2fs", self.name,
            done - held, held, time.perf_counter() - started,
        )  # fmt: skip

    def _hand_off(self, engine: Engine, job: Job) -> bool:
        """Send a long, untokenized prompt to the preparer thread, if the engine allows it."""
        if (
            job.prepared is not None
            or job.cancel.is_set()
            or prompt_chars(job.prompt) < LONG_PROMPT_CHARS
            or not isinstance(engine, PreparesConcurrently)
        ):
            return False
        if self._preparer is None:
            self._preparer = Preparer(engine, self.name, self._jobs.put)
        self._preparer.submit(job)
        return True

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
            prepared_at = time.perf_counter()
            if self.keeper is not None and not busy and engine.stateful:
                outcome = job.kept = self.keeper.before(engine, prepared.tokens, job.state)
            prefilled = time.perf_counter() - prepared_at
            slot = engine.open(prepared, job.params, job.cancel.is_set, job.watch, outcome.freeze)
            if busy and (shared := engine.shared_prefix(slot)):
                outcome = StateOutcome(shared, "memory")  # copied from a running sequence
            job.emit(
                Started(
                    prompt_tokens=len(prepared.tokens),
                    queue_seconds=queued,
                    load_seconds=self.load_seconds if waited_for_load else 0.0,
                    state=outcome,
                    prefill_seconds=prefilled,
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
        finished: list[tuple[Job, Finished]] = []
        for slot, event in events:
            job = self._running[slot]
            if isinstance(event, Finished):
                del self._running[slot]  # before the caller hears of it: it may ask at once
                finished.append((job, event))
            deliveries.append((job, event))
        emit_all(deliveries)
        for job, done in finished:
            self._finished(engine, job, done)

    def _finished(self, engine: Engine, job: Job, done: Finished) -> None:
        kept = job.kept
        if self.keeper is not None and kept is not None:
            self.keeper.note_prefill(
                engine, done.prompt_tokens - kept.reused_tokens, done.prompt_seconds
            )
        if self.keeper is not None and kept is not None and (job.state.session or kept.pool_after):
            try:  # after the response: freezing the session or pool entry never delays it
                self.keeper.after(engine, job.state, kept)
            except Exception:
                log.exception("could not freeze the state of %s", self.name)
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
