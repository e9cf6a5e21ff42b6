"""A KV pool the sequences share (llama.cpp's unified cache), with the real model.

The pool here is deliberately tiny (768 cells for three sequences of up to 512 tokens), so
admission by free cells, giving back idle cells, and suspending the youngest generation when the
running ones outgrow the pool all happen within a few hundred tokens. A suspended generation
recomputes its tokens when it resumes; what it emits afterwards must still be the model's own
choice on its prefix (see test_batching.py for the tolerance).
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from clawctl.config import load_paths
from clawctl.engines.base import (
    EngineSettings,
    Finished,
    Grammar,
    PreparedPrompt,
    Prompt,
    SamplingParams,
)
from clawctl.engines.llama.engine import LlamaEngine
from clawctl.engines.llama.slots import SlotBatch
from clawctl.profiles import load_profile
from clawctl.runtime.fit import MemoryFit
from clawctl.schemas.models import GgufInfo
from tests.conftest import BIN, clean_env, derived_profile, serve
from tests.test_batching import TOLERANCE

pytestmark = pytest.mark.integration

POOL = 768
DIGITS = Grammar("root ::= [0-9]{2000}")  # never ends on its own: generations run to max_tokens


@pytest.fixture(scope="module")
def pool_engine(smollm2_gguf: Path) -> Iterator[LlamaEngine]:
    settings = EngineSettings(smollm2_gguf, 512, 128, 2, parallel=3, kv_cells=POOL, kv_unified=True)
    loaded = LlamaEngine(settings)
    yield loaded
    loaded.close()


def prompt_of(engine: LlamaEngine, size: int, topic: str) -> PreparedPrompt:
    """A prompt of exactly `size` tokens about `topic`."""
    head = engine.prepare(Prompt(text=f"Write digits about {topic}.")).tokens
    filler = engine.prepare(Prompt(text=" and more of it")).tokens[1:]  # without BOS
    tokens = (head + filler * size)[:size]
    return engine.prepare(Prompt(tokens=tuple(tokens)))


def run_all(engine: LlamaEngine) -> tuple[dict[int, Finished], int]:
    """Step until every generation ends; their `Finished` and how many steps had one
    suspended."""
    finished: dict[int, Finished] = {}
    suspended_steps = 0
    for _ in range(5000):  # bounded: 2 x 300 tokens need far fewer steps
        if not engine.active:
            break
        for seq, event in engine.step():
            if isinstance(event, Finished):
                finished[seq] = event
        suspended_steps += any(s.suspended for s in engine._slots.slots.values())
    assert not engine.active
    return finished, suspended_steps


def test_the_fit_gives_streams_where_the_budget_holds_them_and_a_pool_otherwise() -> None:
    profile = load_profile(load_paths(), "x86-small")
    fit = MemoryFit(None, profile, {})  # type: ignore[arg-type]  # the store is not consulted

    def info(context: int, layers: int, width: int) -> GgufInfo:
        return GgufInfo(
            architecture="llama", general_type="model", model_name="m", quant="Q4_K_M",
            context_length=context, embedding_length=width * 3, block_count=layers,
            n_tensors=1, n_params=1, chat_template=None, kv_width=width,
        )  # fmt: skip

    smollm2 = fit.context_for(info(8192, 30, 192))
    assert (smollm2.n_ctx, smollm2.parallel, smollm2.unified) == (4096, 8, False)
    assert smollm2.cells == 4096 * 8  # 720 MiB of f16 KV: within the 768 MiB budget
    qwen = fit.context_for(info(32768, 24, 128))  # Qwen2.5-Coder-0.5B: what OpenClaw needs
    assert qwen.unified
    assert qwen.n_ctx == 32768
    assert qwen.parallel == 8
    assert qwen.cells == profile.kv_budget_mb * 2**20 // (2 * 24 * 128 * 2)  # 65,536
    assert qwen.cells >= 32768 + 8 * 2048  # the agent's context and 8 short requests beside it
    assert fit.flash_attn_for(qwen)  # the pool's sequences skip each other's cells
    assert not fit.flash_attn_for(smollm2)  # the profile's own choice for streams
    tiny = fit.context_for(info(1024, 30, 192))
    assert (tiny.n_ctx, tiny.unified) == (1024, False)
    rpi4 = MemoryFit(None, load_profile(load_paths(), "rpi4-4gb"), {})  # type: ignore[arg-type]
    pool = rpi4.context_for(info(131072, 24, 128))
    assert pool.n_ctx == 16384
    assert pool.unified
    assert pool.cells >= pool.n_ctx
    assert pool.cells % 256 == 0


def test_the_pool_reports_its_cells_and_layout(pool_engine: LlamaEngine) -> None:
    pool_engine.prefill([], reuse=False)
    assert pool_engine.n_ctx == 512
    assert pool_engine.kv_cells() == (0, POOL)
    assert pool_engine.identity().kv_pool == POOL
    prompt = prompt_of(pool_engine, 40, "held cells")
    pool_engine.prefill(prompt.tokens)
    assert pool_engine.kv_cells() == (len(prompt.tokens), POOL)


def test_admission_waits_for_free_cells_then_takes_what_idle_sequences_left(
    pool_engine: LlamaEngine,
) -> None:
    engine = pool_engine
    engine.prefill([], reuse=False)
    params = SamplingParams(max_tokens=24, temperature=0)
    first = prompt_of(engine, 150, "rivers")
    second = prompt_of(engine, 150, "mountains")
    large = prompt_of(engine, 450, "oceans")
    engine.open(first, params, lambda: False)
    assert engine.admits(second, params)
    engine.open(second, params, lambda: False)
    # Two running generations claim 2 x (150 + 24) cells: 450 + 24 more do not fit beside them.
    assert not engine.admits(large, params)
    finished, _ = run_all(engine)
    assert sorted(finished) == [0, 1]
    held, _ = engine.kv_cells()
    assert held > 200  # ended generations keep their cells for a later prompt...
    assert engine.admits(large, params)  # ...until room is needed: then they are given back
    seq = engine.open(large, params, lambda: False)
    done, _ = run_all(engine)
    assert done[seq].finish_reason == "length"
    assert done[seq].completion_tokens == 24
    assert engine.kv_cells()[0] <= POOL


def test_a_full_pool_suspends_the_youngest_and_it_resumes_with_the_models_own_tokens(
    pool_engine: LlamaEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = pool_engine
    engine.prefill([], reuse=False)
    emitted: dict[int, list[int]] = {}
    original = SlotBatch._emit

    def record(self: SlotBatch, slot, token, index, events):  # type: ignore[no-untyped-def]
        counted = slot.sampled
        reason = original(self, slot, token, index, events)
        if slot.sampled > counted:
            emitted.setdefault(slot.seq, []).append(token)
        return reason

    monkeypatch.setattr(SlotBatch, "_emit", record)
    params = SamplingParams(max_tokens=300, temperature=0, grammar=DIGITS)
    prompts = [prompt_of(engine, 100, "rivers"), prompt_of(engine, 100, "stars")]
    seqs = [engine.open(p, params, lambda: False) for p in prompts]
    # Both fit at first; together they grow past the pool's 768 cells.
    assert sum(len(p.tokens) for p in prompts) + 2 * 300 > POOL
    finished, suspended_steps = run_all(engine)
    monkeypatch.setattr(SlotBatch, "_emit", original)
    assert suspended_steps > 0
    for seq in seqs:
        assert finished[seq].finish_reason == "length"
        assert finished[seq].completion_tokens == len(emitted[seq]) == 300
    # The youngest was the one suspended; after resuming, its tokens are still the model's.
    assert max(digit_gaps(engine, prompts[1], emitted[seqs[1]])) <= TOLERANCE


def digit_gaps(engine: LlamaEngine, prompt: PreparedPrompt, tokens: list[int]) -> list[float]:
    """For each emitted token: how far below the best digit-only token the model, run alone on
    the same prefix, ranks it."""
    llama = engine._llama
    vocab = llama._model.vocab
    digits = np.array(
        [
            t
            for t in range(llama.n_vocab())
            if (piece := llama_cpp.llama_vocab_get_text(vocab, t)) and piece.isdigit()
        ]
    )
    engine.prefill(prompt.tokens[:-1], reuse=False)
    gaps = []
    previous = prompt.tokens[-1]
    for token in tokens:
        llama.eval([previous])
        pointer = llama_cpp.llama_get_logits_ith(llama._ctx.ctx, -1)
        logits = np.ctypeslib.as_array(pointer, shape=(llama.n_vocab(),))
        gaps.append(float(logits[digits].max() - logits[token]))
        previous = token
    return gaps


def test_clawd_serves_a_long_request_beside_short_ones_from_one_pool(
    fresh_home: Path, tmp_path: Path
) -> None:
    """The service as users run it, with a KV budget too small for 8 whole contexts: the
    model gets one pool (reported by /health and `clawctl ps`), a long prompt and short ones
    decode together, and a prompt over the per-request context is still a clear 400."""
    profile = derived_profile(fresh_home, "x86-pool", kv_budget_mb=128)
    with serve(fresh_home, tmp_path, CLAW_PROFILE=profile) as daemon:
        seen: list[tuple[int, int]] = []
        stop = threading.Event()

        def watch() -> None:
            with daemon.client() as client:
                while not stop.wait(0.2):  # a poll interval: a busy loop would starve decoding
                    for model in client.get("/health").json()["loaded"]:
                        seen.append((model["active_requests"], model["kv_cells_used"]))

        results: dict[int, str | None] = {}
        long_text = "Here is a long log of the pump readings. " + "rpm 1200 temp 65; " * 300

        def ask(i: int) -> None:
            with daemon.openai(timeout=600).with_options(max_retries=0) as oai:
                content = long_text if i == 0 else f"Name a colour, robot {i}."
                answer = oai.chat.completions.create(
                    model="smollm2-135m",
                    messages=[{"role": "user", "content": content}],
                    max_tokens=64 if i == 0 else 24,
                    temperature=0,
                    extra_body={"claw": {"cache": False}},
                )
                results[i] = answer.choices[0].finish_reason

        watcher = threading.Thread(target=watch)
        watcher.start()
        clients = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(600)
        stop.set()
        watcher.join(10)
        assert sorted(results) == [0, 1, 2, 3]
        assert all(reason in ("stop", "length") for reason in results.values())
        assert max(active for active, _ in seen) >= 2
        assert max(used for _, used in seen) > 1500  # the long prompt's cells, held with others
        ps = subprocess.run(
            [str(BIN / "clawctl"), "ps", "--json"],
            env=clean_env(CLAW_HOME=str(fresh_home), CLAW_SOCKET=str(daemon.socket)),
            capture_output=True,
            text=True,
            check=True,
        )
        (model,) = json.loads(ps.stdout)
        assert model["kv_layout"] == "pool"
        assert model["sequences"] == 8
        assert model["n_ctx"] == 4096
        assert model["kv_cells"] == 128 * 2**20 // (2 * 30 * 192 * 2) // 256 * 256 or (
            model["kv_cells"] == model["n_ctx"]  # at least one whole context
        )
        # Weights and the pool: far below the 8 x 4,096-cell streams (720 MiB of KV).
        assert model["memory_bytes"] < 100 * 2**20 + 160 * 2**20
        with daemon.client() as client:
            over = client.post(
                "/v1/completions",
                json={"model": "smollm2-135m", "prompt": "rpm 1200 " * 3000, "max_tokens": 4},
            )
        assert over.status_code == 400
        assert over.json()["error"]["code"] == "context_length_exceeded"
