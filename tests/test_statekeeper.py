"""The state keeper with the real model: what an agent's calls reuse, and what the pool keeps.

An agent's next call repeats the previous call and its answer, then adds a little: the context
already holds all of that shared start, so nothing of it may be computed again (not even the part
past the pool's last block boundary), and the pool must keep it for after a restart.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from clawctl.engines.base import ChatTurn, EngineSettings, Prompt, SamplingParams, generate
from clawctl.engines.llama.engine import LlamaEngine
from clawctl.paths import Paths
from clawctl.runtime.statekeeper import (
    SnapshotWriter,
    StateKeeper,
    StateOutcome,
    StateRequest,
    WriteJob,
)
from clawctl.schemas.state import common_prefix
from clawctl.store.snapshots import SnapshotStore, block_hashes

pytestmark = pytest.mark.integration

BLOCK = 32
SYSTEM = "You are the pump controller's assistant. Answer with numbers only. " * 12


@pytest.fixture(scope="module")
def engine(smollm2_gguf: Path) -> Iterator[LlamaEngine]:
    loaded = LlamaEngine(EngineSettings(smollm2_gguf, 2048, 256, 2, parallel=2))
    yield loaded
    loaded.close()


def turns(*pairs: tuple[str, str]) -> Prompt:
    return Prompt(chat=tuple(ChatTurn(role, text) for role, text in pairs))


def test_an_agents_next_call_computes_only_what_is_new_and_the_pool_keeps_it(
    engine: LlamaEngine, tmp_path: Path
) -> None:
    store = SnapshotStore(Paths.build(tmp_path), 1 << 30, BLOCK)
    writer = SnapshotWriter(store, "shuffle2")
    keeper = StateKeeper(store, writer, pool=True, pool_min_tokens=BLOCK * 2)
    try:
        engine.prefill([], reuse=False)
        first = engine.prepare(turns(("system", SYSTEM), ("user", "Pump 3 rpm?")))
        outcome = keeper.before(engine, first.tokens, StateRequest())
        assert outcome.freeze is not None  # a cold prompt: captured during its own prefill
        assert outcome.freeze.tokens % BLOCK == 0
        params = SamplingParams(max_tokens=24, temperature=0)
        opened = engine.open(first, params, lambda: False, freeze=outcome.freeze)
        while engine.active:
            engine.step()
        assert opened == 0
        answer = engine.cached_tokens()[len(first.tokens) :]
        second = engine.prepare(
            turns(
                ("system", SYSTEM),
                ("user", "Pump 3 rpm?"),
                ("assistant", engine._llama.detokenize(answer).decode() or "1200"),
                ("user", "And pump 4?"),
            )
        )
        held = common_prefix(engine.cached_tokens(), second.tokens)
        assert held % BLOCK != 0  # the case that matters: shared past a block boundary
        assert held // BLOCK > outcome.freeze.tokens // BLOCK  # and new blocks for the pool
        again = keeper.before(engine, second.tokens, StateRequest())
        assert again.source == "memory"
        assert again.reused_tokens == held
        assert again.freeze is None  # held already: captured when the generation ends
        assert again.pool_after is not None
        assert len(engine.cached_tokens()) == held  # nothing held was cut to be recomputed
        list(generate(engine, second, params))
        keeper.after(engine, StateRequest(), again)
        writer.flush()
        identity = engine.identity()
        hit = store.pool_lookup(identity, block_hashes(identity, second.tokens, BLOCK))
        assert hit is not None
        # The entry holds the whole second call (captured after it), not only what it shared.
        assert hit.tokens == len(second.tokens) // BLOCK * BLOCK
        # After a restart (an empty context), the entry restores all of the prompt.
        engine.prefill([], reuse=False)
        restored = keeper.before(engine, second.tokens, StateRequest())
        assert restored.source == "pool"
        assert restored.reused_tokens == len(second.tokens) - 1
        done = list(generate(engine, second, params))
        assert done[-1].completion_tokens > 0  # type: ignore[union-attr]
    finally:
        writer.stop()


def test_a_session_still_waiting_for_the_writer_is_restored_from_memory(
    engine: LlamaEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer runs at the lowest CPU priority, so on a busy box a session's file can trail
    the agent's next call: that call must still get the session (from the queued state)."""
    release = threading.Event()
    original = SnapshotWriter.write_now

    def held_up(self: SnapshotWriter, job: WriteJob) -> None:
        assert release.wait(60)
        original(self, job)

    monkeypatch.setattr(SnapshotWriter, "write_now", held_up)
    store = SnapshotStore(Paths.build(tmp_path), 1 << 30, BLOCK)
    writer = SnapshotWriter(store, "shuffle2")
    keeper = StateKeeper(store, writer, pool=False)
    try:
        engine.prefill([], reuse=False)
        request = StateRequest(session="agent-7")
        prompt = engine.prepare(turns(("system", SYSTEM), ("user", "Pump 3 rpm?")))
        keeper.before(engine, prompt.tokens, request)
        list(generate(engine, prompt, SamplingParams(max_tokens=8, temperature=0)))
        keeper.after(engine, request, StateOutcome(0, None))
        path = store.path_for("session", "agent-7")
        assert writer.pending(path) is not None
        assert not path.exists()
        engine.prefill([], reuse=False)  # another app used the model meanwhile
        again = keeper.before(engine, prompt.tokens, request)
        assert again.source == "session"
        assert again.reused_tokens == len(prompt.tokens) - 1
        release.set()
        writer.flush()
        assert path.is_file()
        assert writer.pending(path) is None
    finally:
        release.set()
        writer.stop()


def test_prefill_speed_is_measured_from_long_prompts_only(
    engine: LlamaEngine, tmp_path: Path
) -> None:
    store = SnapshotStore(Paths.build(tmp_path), 1 << 30, BLOCK)
    writer = SnapshotWriter(store, "shuffle2")
    try:
        keeper = StateKeeper(store, writer)
        model = engine.identity().model_sha256
        assert keeper.prefill_rate(model) is None
        keeper.note_prefill(engine, 20, 0.01)  # a short prompt says little about prefill speed
        assert keeper.prefill_rate(model) is None
        keeper.note_prefill(engine, 1000, 2.0)
        assert keeper.prefill_rate(model) == 500.0
        keeper.note_prefill(engine, 900, 3.0)  # a slower one: the estimate follows, halfway
        assert keeper.prefill_rate(model) == 400.0
    finally:
        writer.stop()
