"""Continuous batching and prompt-lookup speculation with the real model.

Batched decoding rounds differently from decoding alone (a many-token batch takes another matmul
path), so a batched greedy text may leave the alone text at a near-tie. What must hold instead:
every token a batched (or speculative) generation emits is one the model, run alone on the same
prefix, ranks at or within rounding of the top; a mix-up of sequences, positions or drafts
would emit tokens far from it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import numpy as np
import openai
import pytest

from clawctl.engines.base import ChatTurn, EngineSettings, Finished, Prompt, SamplingParams
from clawctl.engines.llama.engine import LlamaEngine
from clawctl.engines.llama.slots import SlotBatch
from tests.conftest import Daemon

pytestmark = pytest.mark.integration

SYSTEM = "You are a careful assistant. Answer briefly and exactly. " * 6
JSON_TASK = (
    'Copy this JSON exactly: {"id": 17, "name": "pump-3", "tags": ["edge", "pi5"], '
    '"limits": {"rpm": 1200, "temp_c": 65}}'
)
PROMPTS = [
    (SYSTEM, "What is the capital of France?"),
    (SYSTEM, "Name three colours."),  # shares the long system prompt: copied, not recomputed
    ("", JSON_TASK),
    ("", "Count from 1 to 12, separated by commas."),
]
TOLERANCE = 1.5  # logits; rounding between batch shapes moves them by up to ~0.6 each


def chat(system: str, user: str) -> Prompt:
    turns = ((ChatTurn("system", system),) if system else ()) + (ChatTurn("user", user),)
    return Prompt(chat=turns)


@pytest.fixture(scope="module")
def engine(smollm2_gguf: Path) -> Iterator[LlamaEngine]:
    settings = EngineSettings(smollm2_gguf, 2048, 256, 2, parallel=4, draft_max=8)
    loaded = LlamaEngine(settings)
    yield loaded
    loaded.close()


def run_batched(
    engine: LlamaEngine, monkeypatch: pytest.MonkeyPatch
) -> tuple[dict[int, list[int]], dict[int, Finished]]:
    """Open every prompt (the first alone on the idle context, the rest joining it) and step
    until all end; returns the tokens each sequence emitted and its `Finished`."""
    emitted: dict[int, list[int]] = {}
    original = SlotBatch._emit

    def record(self: SlotBatch, slot, token, index, events):  # type: ignore[no-untyped-def]
        counted = slot.sampled
        reason = original(self, slot, token, index, events)
        if slot.sampled > counted:  # an emitted token (end-of-generation tokens are not)
            emitted.setdefault(slot.seq, []).append(token)
        return reason

    monkeypatch.setattr(SlotBatch, "_emit", record)
    params = SamplingParams(max_tokens=40, temperature=0)
    seqs = [engine.open(engine.prepare(chat(*p)), params, lambda: False) for p in PROMPTS]
    assert seqs == [0, 1, 2, 3]
    finished: dict[int, Finished] = {}
    peak = 0
    while engine.active:
        peak = max(peak, engine.active)
        for seq, event in engine.step():
            if isinstance(event, Finished):
                finished[seq] = event
    assert peak == 4
    monkeypatch.setattr(SlotBatch, "_emit", original)
    return emitted, finished


def alone_gaps(engine: LlamaEngine, prompt: Prompt, tokens: list[int]) -> list[float]:
    """For each emitted token: how far below the alone model's top logit it ranks."""
    llama = engine._llama
    prepared = engine.prepare(prompt).tokens
    engine.prefill(prepared[:-1], reuse=False)
    gaps = []
    previous = prepared[-1]
    for token in tokens:
        llama.eval([previous])
        pointer = llama_cpp.llama_get_logits_ith(llama._ctx.ctx, -1)
        logits = np.ctypeslib.as_array(pointer, shape=(llama.n_vocab(),))
        gaps.append(float(logits.max() - logits[token]))
        previous = token
    return gaps


def test_batched_and_speculative_tokens_are_the_models_own(
    engine: LlamaEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine.prefill([], reuse=False)
    emitted, finished = run_batched(engine, monkeypatch)
    assert sorted(finished) == [0, 1, 2, 3]
    for seq, prompt in enumerate(PROMPTS):
        tokens = emitted[seq]
        assert finished[seq].completion_tokens == len(tokens) > 0
        gaps = alone_gaps(engine, chat(*prompt), tokens)
        assert max(gaps) <= TOLERANCE, (seq, gaps)
    json_run = finished[2]
    assert json_run.drafted > 0
    assert 0 < json_run.accepted <= json_run.drafted  # the copy task confirms drafts


def test_a_joining_prompt_copies_the_shared_prefix(engine: LlamaEngine) -> None:
    engine.prefill([], reuse=False)
    params = SamplingParams(max_tokens=4, temperature=0)
    first = engine.prepare(chat(*PROMPTS[0]))
    second = engine.prepare(chat(*PROMPTS[1]))
    engine.open(first, params, lambda: False)
    # While the first computes the shared system prompt, the second waits to copy it.
    assert not engine.admits(second, params)
    for _ in range(len(first.tokens)):  # bounded: a chunk per step
        if engine.admits(second, params):
            break
        engine.step()
    assert engine._slots.slots[0].pending == first.tokens[-1:] or not engine._slots.slots[0].pending
    joined = engine.open(second, params, lambda: False)
    slot = engine._slots.slots[joined]
    shared = next(
        i for i, (a, b) in enumerate(zip(first.tokens, second.tokens, strict=False)) if a != b
    )
    assert shared > 60  # the system prompt
    assert len(slot.held) == shared  # copied from sequence 0; only the rest is decoded
    assert engine.shared_prefix(joined) == shared
    assert slot.pending == second.tokens[shared:]
    while engine.active:
        engine.step()


def test_an_ended_sequence_keeps_its_cells_for_the_next_joiner(engine: LlamaEngine) -> None:
    """Like llama-server's slots: a joining prompt takes the free sequence that already holds
    the longest prefix of it and decodes only the rest; a snapshot (of the memory sequence)
    keeps them."""
    engine.prefill([], reuse=False)
    params = SamplingParams(max_tokens=4, temperature=0)
    lead = engine.prepare(chat(*PROMPTS[3]))
    repeat = engine.prepare(chat(*PROMPTS[2]))
    engine.open(lead, params, lambda: False)
    first_run = engine.open(repeat, params, lambda: False)
    while engine.active:
        engine.step()
    engine.open(lead, params, lambda: False)
    again = engine.open(repeat, params, lambda: False)
    assert again == first_run
    slot = engine._slots.slots[again]
    assert engine.shared_prefix(again) == len(repeat.tokens) - 1  # all but the last token
    assert slot.pending == repeat.tokens[-1:]
    emitted: list[int] = []
    while engine.active:
        for seq, event in engine.step():
            if isinstance(event, Finished) and seq == again:
                emitted = list(engine._slots._idle[again][len(repeat.tokens) :])
    assert len(emitted) >= 3  # the sampled tokens but the last, which was never decoded
    assert again in engine._slots._idle
    raw, held = engine.capture_state()  # the memory sequence's state only: the others stay
    assert again in engine._slots._idle
    assert held == engine.cached_tokens()
    assert len(raw) > 0
    assert max(alone_gaps(engine, chat(*PROMPTS[2]), emitted)) <= TOLERANCE


def _steps_to_first_token(engine: LlamaEngine, prompt: Prompt) -> int:
    """Decode steps from opening `prompt` (on the idle context) to its first sampled token;
    runs the generation to its end."""
    seq = engine.open(engine.prepare(prompt), SamplingParams(max_tokens=2), lambda: False)
    steps = 0
    for _ in range(64):  # bounded: the prompts here are a chunk or two
        steps += 1
        events = engine.step()
        if any(s == seq and (isinstance(e, Finished) or e.tokens) for s, e in events):
            break
    while engine.active:
        engine.step()
    return steps


def test_a_prompt_continuing_the_context_decodes_its_last_token_with_the_rest(
    engine: LlamaEngine,
) -> None:
    """An agent's next call continues what the context holds: its new tokens, the last one
    included, are one decode step, as llama-server computes them. A prompt computed from an
    empty context, or from a state restored into it, decodes its last token in a step of its
    own, so that hydrating replays a cold prefill exactly (test_snapshots_api)."""
    engine.prefill([], reuse=False)
    first = chat(SYSTEM, "What is the capital of France?")
    turns = (*(first.chat or ()), ChatTurn("assistant", "Paris."), ChatTurn("user", "And Italy?"))
    later = Prompt(chat=turns)
    assert _steps_to_first_token(engine, first) == 2  # cold: the prompt, then its last token
    raw, held = engine.capture_state()
    assert _steps_to_first_token(engine, later) == 1  # continues the context: one step
    engine.restore_state(raw, held)
    assert _steps_to_first_token(engine, later) == 2  # hydrated: as a cold prompt rounds


def test_a_short_request_is_answered_during_a_long_prefill_which_stops_when_cancelled(
    engine: LlamaEngine,
) -> None:
    """A long prompt on an idle context is computed in chunks between steps, so a short
    request that arrives meanwhile is prefilled and answered before it (an agent's cold 12k
    prompt no longer holds every other caller for minutes), and a cancelled long prompt stops
    at the next step rather than after its whole prefill."""
    engine.prefill([], reuse=False)
    params = SamplingParams(max_tokens=6, temperature=0)
    log = chat("", "Summarise these readings: " + "pump rpm 1200 temp 65; " * 160)
    cancel = threading.Event()
    long_seq = engine.open(engine.prepare(log), params, cancel.is_set)
    assert long_seq == 0
    engine.step()
    short = engine.open(engine.prepare(chat(*PROMPTS[3])), params, lambda: False)
    done: dict[int, Finished] = {}
    for _ in range(200):  # bounded: the short one needs a few dozen steps
        for seq, event in engine.step():
            if isinstance(event, Finished):
                done[seq] = event
        if short in done:
            break
    assert done[short].completion_tokens > 0
    assert long_seq not in done
    assert engine._slots.slots[long_seq].pending  # still computing its prompt
    cancel.set()
    (event,) = [e for seq, e in engine.step() if seq == long_seq]
    assert isinstance(event, Finished)
    assert event.finish_reason == "cancelled"
    assert event.completion_tokens == 0
    assert not engine.active


@pytest.fixture
def oai(daemon: Daemon) -> Iterator[openai.OpenAI]:
    with daemon.openai() as client:
        yield client


def test_concurrent_streams_run_together_and_all_finish(daemon: Daemon, oai: openai.OpenAI) -> None:
    """Four streaming clients through the daemon: decoded in one batch (the daemon reports
    several active generations at once), every stream ends with a finish reason."""
    seen_active: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        with daemon.client() as client:
            while not stop.wait(0.1):  # a poll interval: a busy loop would starve decoding
                models = client.get("/health").json()["loaded"]
                seen_active.extend(m["active_requests"] for m in models)

    results: dict[int, tuple[str, str | None]] = {}

    def stream(i: int) -> None:
        chunks = oai.chat.completions.create(
            model="smollm2-135m",
            messages=[{"role": "user", "content": f"Tell a short story about robot {i}."}],
            max_tokens=48,
            temperature=0.7,
            seed=i,
            stream=True,
        )
        text, reason = "", None
        for chunk in chunks:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                reason = chunk.choices[0].finish_reason or reason
        results[i] = (text, reason)

    watcher = threading.Thread(target=watch)
    watcher.start()
    clients = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(120)
    stop.set()
    watcher.join(10)
    assert sorted(results) == [0, 1, 2, 3]
    for text, reason in results.values():
        assert text
        assert reason in ("stop", "length")
    assert max(seen_active) >= 2


def test_speculation_is_reported_in_claw_and_metrics(daemon: Daemon) -> None:
    body = {
        "model": "smollm2-135m",
        "messages": [{"role": "user", "content": JSON_TASK}],
        "max_tokens": 48,
        "temperature": 0,
        "claw": {"cache": False},  # the same request twice must generate twice
    }
    with daemon.client() as client:
        claw = client.post("/v1/chat/completions", json=body).json()["claw"]
        assert claw["draft_tokens"] > 0
        assert 0 < claw["draft_accepted"] <= claw["draft_tokens"]
        off = client.post(
            "/v1/chat/completions",
            json={**body, "claw": {"speculative": False, "cache": False}},
        ).json()["claw"]
        assert off["draft_tokens"] == 0
        metrics = client.get("/metrics").text
    assert 'clawd_draft_accepted_tokens_total{model="smollm2-135m"}' in metrics
