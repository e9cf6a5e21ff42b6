"""Freezing and hydrating llama.cpp state around each generation, on the model's own thread.

Before a generation `StateKeeper.before` makes the context hold as much of the prompt as it can
without recomputing it: what the context already holds, a named snapshot (`claw.snapshot.load`),
the request's session (`claw.session`), or the longest matching entry of the prefix pool. It also
freezes new long prefixes into the pool and, on `claw.snapshot.save`, the whole prompt. After the
generation, `after` freezes the session. Pool and session writes are write-behind: the model
thread only copies the raw state (milliseconds); compression and the atomic write happen on the
`SnapshotWriter` thread, so responses are not delayed. Snapshots never touch another thread's
model: engines are only called here, from the worker that owns them.

With a fleet configured, a pool miss (or a shorter local hit) also asks the fleet's index for a
longer prefix another box computed, and downloads it into the local pool first when that is
expected to beat computing it here; what the writer freezes is handed to the fleet uploader.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clawctl.engines.base import Engine, FreezePoint
from clawctl.errors import ClawError
from clawctl.fleet.store import FleetStore
from clawctl.schemas.snapshots import Filter, Kind
from clawctl.schemas.state import StateIdentity, common_prefix
from clawctl.store.snapshot_format import SnapshotHeader, encode, read_header, write_snapshot
from clawctl.store.snapshots import PoolHit, SnapshotStore, block_hashes

log = logging.getLogger("clawd.snapshots")
PREFILL_SAMPLE_TOKENS = 128  # fewer computed prompt tokens do not measure prefill speed


@dataclass(frozen=True)
class StateRequest:
    load: str | None = None
    save: str | None = None
    session: str | None = None

    def needs_context(self) -> bool:
        """Snapshots and sessions read and write the whole context: they cannot run batched."""
        return bool(self.load or self.save or self.session)


@dataclass(frozen=True)
class StateOutcome:
    reused_tokens: int  # prompt tokens whose prefill was avoided
    source: str | None  # "memory", "snapshot", "session", "pool", "fleet" or None
    saved: str | None = None  # named snapshot written for this request
    freeze: FreezePoint | None = None  # a pool block to capture during the prefill
    # A pool block the context holds already: captured when the generation ends (`after`),
    # off the path to the first token, answer included.
    pool_after: Callable[[bytearray, list[int]], None] | None = None


@dataclass(frozen=True)
class WriteJob:
    path: Path
    kind: Kind
    name: str
    identity: StateIdentity
    raw: bytearray
    tokens: list[int]


class SnapshotWriter:
    """One background thread compressing and writing snapshots (never touches a model)."""

    def __init__(self, store: SnapshotStore, filter_: Filter, level: int = 1) -> None:
        self.store = store
        self.filter = filter_
        self.level = level
        self._jobs: queue.Queue[WriteJob | None] = queue.Queue()
        self._pending: dict[Path, WriteJob] = {}  # submitted, not yet on disk
        self._lock = threading.Lock()
        # Told of each snapshot once it is on disk (the fleet uploader).
        self.on_written: Callable[[Kind, Path], object] | None = None
        self._thread = threading.Thread(target=self._run, name="snapshot-writer", daemon=True)
        self._thread.start()

    def write_now(self, job: WriteJob) -> None:
        header, chunks = encode(
            job.raw, kind=job.kind, name=job.name, identity=job.identity, tokens=job.tokens,
            filter_=self.filter, level=self.level,
        )  # fmt: skip
        write_snapshot(job.path, header, chunks)
        if job.kind == "pool":
            self.store.pool_added(job.identity, job.path, job.tokens)
        if self.on_written is not None:
            self.on_written(job.kind, job.path)
        if job.kind != "named":
            self.store.enforce_budget()

    def submit(self, job: WriteJob) -> None:
        with self._lock:
            self._pending[job.path] = job
        self._jobs.put(job)

    def pending(self, path: Path) -> WriteJob | None:
        """The newest state submitted for `path` and not yet written: a session frozen a
        moment ago is restored from memory rather than missed (the writer runs at the lowest
        priority, so under load a file may trail its request by a while)."""
        with self._lock:
            return self._pending.get(path)

    def _run(self) -> None:
        # The lowest CPU priority (Linux threads have their own nice value, and the compression
        # threads started from here inherit it): compressing an agent's 120 MB state must not
        # slow the model's own threads, which decode the next call meanwhile.
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        while (job := self._jobs.get()) is not None:
            try:
                self.write_now(job)
            except Exception:
                log.exception("could not write snapshot %s", job.path)
            finally:
                with self._lock:
                    if self._pending.get(job.path) is job:
                        del self._pending[job.path]
                self._jobs.task_done()
        self._jobs.task_done()

    def flush(self) -> None:
        self._jobs.join()

    def stop(self, timeout: float = 30.0) -> None:
        self._jobs.put(None)
        self._thread.join(timeout)


class StateKeeper:
    def __init__(
        self, store: SnapshotStore, writer: SnapshotWriter, pool: bool = True,
        pool_min_tokens: int = 512, fleet: FleetStore | None = None,
    ) -> None:  # fmt: skip
        self.store = store
        self.writer = writer
        self.pool = pool
        self.pool_min_tokens = pool_min_tokens
        self.fleet = fleet if fleet is not None and fleet.section.fetch else None
        self._prefill_rate: dict[str, float] = {}  # model sha256 -> prompt tokens/s measured

    def note_prefill(self, engine: Engine, tokens: int, seconds: float) -> None:
        """A generation computed `tokens` prompt tokens in `seconds` (to its first token): the
        prefill speed a fleet fetch is weighed against. Short prompts say little, and batched
        ones share the time, which only makes fetching look better than it is, never worse."""
        if tokens < PREFILL_SAMPLE_TOKENS or seconds <= 0:
            return
        key = engine.identity().model_sha256
        measured = tokens / seconds
        known = self._prefill_rate.get(key)
        self._prefill_rate[key] = measured if known is None else (known + measured) / 2

    def prefill_rate(self, model_sha256: str) -> float | None:
        """Prompt tokens/s measured for this model on this box (None before a long prompt)."""
        return self._prefill_rate.get(model_sha256)

    def _restore(
        self, engine: Engine, path: Path, identity: StateIdentity, tokens: list[int]
    ) -> int:
        """Hydrate `path`; returns how many leading prompt tokens the context now holds."""
        header, raw = self.store.load(path, identity)
        engine.restore_state(raw, header.tokens)
        return engine.held_prefix(tokens)

    def _session(self, name: str, identity: StateIdentity) -> WriteJob | SnapshotHeader | None:
        """The session's newest state: still waiting for the writer, its file's header, or
        (with `[fleet] sessions`) a newer state another box froze, fetched into that file."""
        path = self.store.path_for("session", name)
        pending = self.writer.pending(path)
        if pending is not None:
            return pending
        local: SnapshotHeader | None = None
        if path.is_file():
            try:
                local = read_header(path)
            except ClawError as exc:
                log.warning("session %s not restored: %s", name, exc.message)
        if self.fleet is not None and self.fleet.section.sessions:
            remote = self.fleet.session_pointer(name)
            if remote is not None and (local is None or remote.created_at > local.created_at):
                try:
                    return self.fleet.fetch_session(remote, identity)
                except ClawError as exc:
                    log.warning("fleet session %s not used: %s", name, exc.message)
        return local

    def _restore_session(
        self,
        engine: Engine,
        name: str,
        frozen: WriteJob | SnapshotHeader,
        tokens: list[int],
    ) -> int:
        if isinstance(frozen, WriteJob):
            engine.restore_state(frozen.raw, frozen.tokens)
            return engine.held_prefix(tokens)
        path = self.store.path_for("session", name)
        return self._restore(engine, path, frozen.identity, tokens)

    def before(self, engine: Engine, tokens: list[int], request: StateRequest) -> StateOutcome:
        identity = engine.identity()
        held = engine.held_prefix(tokens)
        source: str | None = "memory" if held else None
        hashes: list[str] = []
        if request.load:
            _, path = self.store.find(request.load, "named")
            held = self._restore(engine, path, identity, tokens)
            source = "snapshot"
        elif request.session and (frozen := self._session(request.session, identity)) is not None:
            try:
                if frozen.identity == identity and common_prefix(frozen.tokens, tokens) > held:
                    held = self._restore_session(engine, request.session, frozen, tokens)
                    source = "session"
            except ClawError as exc:  # a damaged session costs a recompute, not the request
                log.warning("session %s not restored: %s", request.session, exc.message)
        elif self.pool and len(tokens) >= self.pool_min_tokens:
            hashes = block_hashes(identity, tokens, self.store.block_tokens)
            hit = self.store.pool_lookup(identity, hashes)
            fetched = self._from_fleet(identity, hashes, max(held, hit.tokens if hit else 0))
            hit = fetched or hit
            if hit is not None and hit.tokens > held:
                try:
                    held = self._restore(engine, hit.path, identity, tokens)
                    source = "fleet" if fetched else "pool"
                except ClawError as exc:
                    log.warning("pool entry %s not restored: %s", hit.path.name, exc.message)
        reused = min(held, max(0, len(tokens) - 1))
        freeze, pool_after = (
            self._grow_pool(identity, tokens, hashes, held) if hashes else (None, None)
        )
        if request.save:
            # From an empty context, as a cold request computes it, so hydrating reproduces a cold
            # run exactly; the last token is always decoded with the generation.
            engine.prefill(tokens[:-1], reuse=False)
            raw, held_tokens = engine.capture_state()
            path = self.store.path_for("named", request.save)
            self.writer.write_now(WriteJob(path, "named", request.save, identity, raw, held_tokens))
            return StateOutcome(reused, source if reused else None, request.save)
        return StateOutcome(
            reused, source if reused else None, freeze=freeze, pool_after=pool_after
        )

    def _from_fleet(self, identity: StateIdentity, hashes: list[str], best: int) -> PoolHit | None:
        """A longer prefix than `best` from the fleet, now in the local pool; None when the
        fleet has none, fetching it would be slower than computing it, or it failed a check."""
        if self.fleet is None:
            return None
        found = self.fleet.pool_lookup(identity, hashes)
        if found is None or found.tokens <= best:
            return None
        rate = self.prefill_rate(identity.model_sha256)
        if not self.fleet.worth_fetching(found.pointer.size, found.tokens - best, rate):
            log.info("fleet prefix of %d tokens (%d bytes) not fetched: computing it is faster",
                     found.tokens, found.pointer.size)  # fmt: skip
            return None
        try:
            path = self.fleet.fetch_pool(found.pointer, identity)
        except ClawError as exc:  # unreachable, damaged or foreign: computed here instead
            log.warning("fleet prefix not used: %s", exc.message)
            return None
        return PoolHit(path, found.tokens)

    def _grow_pool(
        self, identity: StateIdentity, tokens: list[int], hashes: list[str], shared: int
    ) -> tuple[FreezePoint | None, Callable[[bytearray, list[int]], None] | None]:
        """How to freeze a block-aligned prefix of the prompt if the pool lacks it: a point
        the generation's prefill captures on its way (so the model thread never computes the
        prefix ahead of the generation, and the prefill stays cancellable and batched), or,
        when the context holds that prefix already (an agent's next call), a capture once the
        generation ends: all it shares, its new tokens and its answer, with nothing cut and
        computed again and no copy before the first token.

        When the prompt shares a long prefix with what the context held (the previous request),
        that shared part is what later requests will share too (a system prompt, a document), so
        it is what we freeze; a prompt seen for the first time is frozen up to its last full
        block, whose own tail may be private to it but whose blocks index every shared prefix.
        """
        block = self.store.block_tokens
        blocks = min(len(hashes), (len(tokens) - 1) // block)
        if shared >= self.pool_min_tokens:
            blocks = min(blocks, shared // block)
        length = blocks * block
        if blocks == 0 or length < self.pool_min_tokens:
            return None, None
        chain = hashes[blocks - 1]
        path = self.store.pool_path(identity, chain)
        if self.store.pool_has(identity, chain) or self.writer.pending(path) is not None:
            return None, None

        def save(raw: bytearray, held: list[int]) -> None:
            self.writer.submit(WriteJob(path, "pool", chain, identity, raw, held))

        if shared >= length:
            return None, save
        return FreezePoint(length, save), None

    def after(self, engine: Engine, request: StateRequest, outcome: StateOutcome) -> None:
        """Once a generation that `before` prepared has ended: freeze its session, or the pool
        entry `before` left for now (the context still holds the generation's tokens)."""
        if request.session:
            raw, held = engine.capture_state()
            path = self.store.path_for("session", request.session)
            self.writer.submit(
                WriteJob(path, "session", request.session, engine.identity(), raw, held)
            )
        elif outcome.pool_after is not None:
            outcome.pool_after(*engine.capture_state())
