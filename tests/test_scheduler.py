"""ModelManager and ModelWorker with a fake engine: one thread per model, LRU within the memory
budget, keep-alive, bounded queues, load failures, cancellation."""

from __future__ import annotations

import asyncio
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest

from clawctl.engines.base import Finished, Prompt, SamplingParams, TokenEvent
from clawctl.errors import EngineError, ModelNotFound, Overloaded
from clawctl.profiles import EdgeProfile
from clawctl.runtime.jobs import Failed, JobEvent, Started
from clawctl.runtime.manager import ModelManager
from clawctl.runtime.statekeeper import StateRequest
from clawctl.schemas.models import GgufInfo, ModelManifest
from tests.fakes import FakeLoader

MIB = 1 << 20


class FakeStore:
    def __init__(self, names: list[str], size: int = 50 * MIB) -> None:
        info = GgufInfo(
            architecture="llama",
            general_type="model",
            model_name="fake",
            quant="Q4_0",
            context_length=2048,
            embedding_length=64,
            block_count=2,
            n_tensors=1,
            n_params=1,
            chat_template=None,
        )
        self.manifests = {
            n: ModelManifest(
                name=n,
                digest=f"{i:064x}",
                size=size,
                source="test",
                created_at=datetime.now(timezone.utc),
                gguf=info,
            )
            for i, n in enumerate(names)
        }

    def get(self, name: str) -> ModelManifest:
        if name not in self.manifests:
            raise ModelNotFound(f"model {name!r} is not installed")
        return self.manifests[name]

    def blob_path(self, digest: str) -> Path:
        return Path("/nonexistent") / digest

    def model_dir(self, manifest: ModelManifest) -> Path:
        return Path("/nonexistent") / manifest.digest


def profile(budget_mb: int = 1000, max_loaded: int = 2, parallel: int = 4) -> EdgeProfile:
    return EdgeProfile(
        parallel=parallel,
        name="test",
        description="t",
        threads=1,
        n_ctx=512,
        n_batch=64,
        memory_budget_mb=budget_mb,
        max_loaded_models=max_loaded,
        int4_quant="q4_0",
        int2_quant="q2_k",
    )


def manager(
    loader: FakeLoader,
    names: list[str],
    keep_alive: float = 60,
    max_queue: int = 8,
    size_mb: int = 50,
    **kw: int,
) -> ModelManager:
    store = FakeStore(names, size_mb * MIB)
    return ModelManager(store, profile(**kw), loader, keep_alive, max_queue)


async def collect(mgr: ModelManager, model: str, text: str, **params: int) -> list[JobEvent]:
    handle = mgr.submit(model, Prompt(text=text), SamplingParams(**params))  # type: ignore[arg-type]
    return [event async for event in handle.events()]


def test_generation_events_and_one_thread_per_model() -> None:
    loader = FakeLoader()

    async def scenario() -> None:
        mgr = manager(loader, ["a"])
        results = await asyncio.gather(*(collect(mgr, "a", f"one two {i}") for i in range(5)))
        for i, events in enumerate(results):
            assert isinstance(events[0], Started)
            assert [e.text for e in events if isinstance(e, TokenEvent)] == [
                "one ",
                "two ",
                f"{i} ",
            ]
            assert isinstance(events[-1], Finished)
        await mgr.stop()

    asyncio.run(scenario())
    [engine] = loader.engines
    assert len(engine.threads) == 1
    assert threading.get_ident() not in engine.threads
    assert engine.closed


def test_lru_eviction_within_max_loaded_models() -> None:
    loader = FakeLoader()

    async def scenario() -> None:
        mgr = manager(loader, ["a", "b", "c"], max_loaded=2)
        for name in ("a", "b", "a", "c"):
            await collect(mgr, name, "x")
        assert sorted(m.name for m in mgr.loaded()) == ["a", "c"]  # b was least recently used
        await mgr.stop()

    asyncio.run(scenario())
    closed = [e for e in loader.engines if e.closed]
    assert len(closed) == 3


def test_memory_budget_evicts_and_rejects_oversized_models() -> None:
    loader = FakeLoader(memory=400 * MIB)

    async def scenario() -> None:
        mgr = manager(loader, ["a", "b"], budget_mb=600, max_loaded=4, size_mb=390)
        await collect(mgr, "a", "x")
        await collect(mgr, "b", "x")  # a (400 MiB measured) + b (~390 MiB) exceed 600 MiB
        assert [m.name for m in mgr.loaded()] == ["b"]
        await mgr.stop()
        tiny = manager(FakeLoader(), ["a"], budget_mb=100, size_mb=200)
        with pytest.raises(EngineError, match="allows 100 MiB"):
            tiny.submit("a", Prompt(text="x"), SamplingParams())

    asyncio.run(scenario())


def test_busy_models_are_not_evicted() -> None:
    loader = FakeLoader(step_seconds=0.05)

    async def scenario() -> None:
        mgr = manager(loader, ["a", "b"], max_loaded=1)
        running = asyncio.create_task(collect(mgr, "a", "w " * 20))
        await asyncio.sleep(0.1)
        with pytest.raises(Overloaded):
            mgr.submit("b", Prompt(text="x"), SamplingParams())
        await running
        await collect(mgr, "b", "x")
        await mgr.stop()

    asyncio.run(scenario())


def test_queue_bound_gives_overloaded() -> None:
    loader = FakeLoader(step_seconds=0.02)

    async def scenario() -> None:
        mgr = manager(loader, ["a"], max_queue=2)
        handles = [mgr.submit("a", Prompt(text="w " * 10), SamplingParams()) for _ in range(2)]
        with pytest.raises(Overloaded, match="retry"):
            mgr.submit("a", Prompt(text="x"), SamplingParams())
        for handle in handles:
            async for _ in handle.events():
                pass
        await collect(mgr, "a", "x")  # room again
        await mgr.stop()

    asyncio.run(scenario())


def test_keep_alive_unloads_idle_models() -> None:
    loader = FakeLoader()

    async def scenario() -> None:
        mgr = manager(loader, ["a"], keep_alive=0.2)
        await collect(mgr, "a", "x")
        mgr.reap_idle()
        assert [m.name for m in mgr.loaded()] == ["a"]
        await asyncio.sleep(0.3)
        mgr.reap_idle()
        assert mgr.loaded() == []
        await mgr.stop()

    asyncio.run(scenario())
    assert loader.engines[0].closed


def test_load_failure_reaches_the_caller_and_is_retried() -> None:
    loader = FakeLoader()
    loader.fail_next = True

    async def scenario() -> None:
        mgr = manager(loader, ["a"])
        events = await collect(mgr, "a", "x")
        assert isinstance(events[0], Failed)
        assert "simulated" in events[0].error.message
        assert mgr.loaded() == []
        events = await collect(mgr, "a", "ok")
        assert isinstance(events[-1], Finished)
        await mgr.stop()

    asyncio.run(scenario())


def test_closing_a_handle_cancels_the_generation() -> None:
    loader = FakeLoader(step_seconds=0.01)

    async def scenario() -> None:
        mgr = manager(loader, ["a"])
        handle = mgr.submit("a", Prompt(text="w " * 500), SamplingParams())
        seen = 0
        async for event in handle.events():
            if isinstance(event, TokenEvent):
                seen += 1
                if seen == 3:
                    break
        handle.close()
        events = await collect(mgr, "a", "after")  # the worker is free again soon
        assert isinstance(events[-1], Finished)
        assert mgr.loaded()[0].active_requests == 0
        await mgr.stop()

    asyncio.run(scenario())


def test_unknown_model() -> None:
    async def scenario() -> None:
        mgr = manager(FakeLoader(), ["a"])
        with pytest.raises(ModelNotFound):
            mgr.submit("zzz", Prompt(text="x"), SamplingParams())

    asyncio.run(scenario())


def test_a_burst_from_one_caller_does_not_starve_another() -> None:
    loader = FakeLoader(step_seconds=0.01)
    finished: list[str] = []

    async def run(mgr: ModelManager, caller: str, label: str) -> None:
        handle = mgr.submit("a", Prompt(text="w " * 5), SamplingParams(), caller=caller)
        async for event in handle.events():
            if isinstance(event, Finished):
                finished.append(label)

    async def scenario() -> None:
        mgr = manager(loader, ["a"], max_queue=8, parallel=1)
        burst = [asyncio.create_task(run(mgr, "app:chatty", f"chatty{i}")) for i in range(6)]
        await asyncio.sleep(0.02)  # the first chatty job is running, five wait
        quiet = asyncio.create_task(run(mgr, "app:quiet", "quiet"))
        # the chatty app may hold 6 of 8 places: a seventh is refused, the quiet app is not
        with pytest.raises(Overloaded, match="from this caller"):
            mgr.submit("a", Prompt(text="x"), SamplingParams(), caller="app:chatty")
        await asyncio.gather(*burst, quiet)
        await mgr.stop()

    asyncio.run(scenario())
    assert finished.index("quiet") == 1  # served right after the job that was running
    assert sorted(finished) == sorted([f"chatty{i}" for i in range(6)] + ["quiet"])


def test_concurrent_jobs_share_decode_steps_and_context_jobs_wait_for_the_batch() -> None:
    """Continuous batching: up to `parallel` jobs advance in each step, a job joins between
    steps; a job whose adapters differ, or which needs the whole context (a session), waits
    until the others are done and then runs alone."""
    loader = FakeLoader(step_seconds=0.005)
    order: list[str] = []

    async def run(mgr: ModelManager, label: str, words: int = 20, **kw: object) -> None:
        prompt = Prompt(text=f"{label} " * words)
        handle = mgr.submit("a", prompt, SamplingParams(), **kw)  # type: ignore[arg-type]
        async for event in handle.events():
            if isinstance(event, Started):
                order.append(f"start {label}")
            elif isinstance(event, Finished):
                order.append(f"end {label}")
                assert event.completion_tokens == words

    async def scenario() -> None:
        mgr = manager(loader, ["a"], max_queue=16, parallel=3)
        first = [asyncio.create_task(run(mgr, f"b{i}", 8 if i == 0 else 20)) for i in range(4)]
        await asyncio.sleep(0.03)
        session = asyncio.create_task(run(mgr, "session", state=StateRequest(session="s1")))
        await asyncio.sleep(0.01)
        late = asyncio.create_task(run(mgr, "late"))
        await asyncio.gather(*first, session, late)
        await mgr.stop()

    asyncio.run(scenario())
    [engine] = loader.engines
    assert engine.peak == 3  # three decoded together, never more
    assert order.index("end b0") < order.index("start b3") < order.index("end b1")  # joined
    start = order.index("start session")
    assert all(order.index(f"end b{i}") < start for i in range(4))
    assert order.index("end session") < order.index("start late")  # alone, then the rest
