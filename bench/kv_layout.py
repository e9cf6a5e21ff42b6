"""KV layouts: a stream per sequence vs one pool the sequences share, and prompts in steps.

Two questions the fit (`clawctl/runtime/fit.py`) answers with these numbers:

1. Eight short greedy generations of SmolLM2-135M decoded together: aggregate tok/s and KV
   memory with a 4,096-cell stream per sequence (no flash attention, the x86-small default; and
   with it), and with one pool of 5,632 cells (what a 128 MiB KV budget holds) with flash
   attention. The anchor is the streams layout.
2. A short request arriving with a ~3,300-token prompt, both computed in steps (pool layout):
   the short one's time to its last token and the long prompt's prefill time, when prompts get
   `MIXED_PREFILL` tokens of a step while another generation decodes, and when they get the
   whole batch (the anchor: what llama-server does with its batch).

    python bench/kv_layout.py --runs 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section
from foundation import machine

from clawctl.engines.base import (
    ChatTurn,
    EngineSettings,
    Finished,
    Prompt,
    SamplingParams,
    estimate_kv_bytes,
)
from clawctl.engines.llama import slots
from clawctl.engines.llama.engine import LlamaEngine
from clawctl.paths import Paths
from clawctl.store.models import ModelStore

MODEL = "smollm2-135m"
STREAMS, PER_SEQ, POOL = 8, 4096, 5632
STEPS = 64
LONG = "Here is a long log of the pump readings. " + "rpm 1200 temp 65; " * 300


@dataclass(frozen=True)
class Layout:
    name: str
    settings: EngineSettings


def layouts(model: Path) -> list[Layout]:
    def base(**extra: object) -> EngineSettings:
        return EngineSettings(model, PER_SEQ, 512, 2, parallel=STREAMS, **extra)  # type: ignore[arg-type]

    return [
        Layout("a stream per sequence (x86-small)", base()),
        Layout("a stream per sequence, flash attention", base(flash_attn=True)),
        Layout("one pool, flash attention", base(kv_cells=POOL, kv_unified=True)),
    ]


def chat(text: str) -> Prompt:
    return Prompt(chat=(ChatTurn("user", text),))


def decode_rate(engine: LlamaEngine) -> float:
    """Aggregate tok/s of eight short greedy generations decoded together."""
    engine.prefill([], reuse=False)
    params = SamplingParams(max_tokens=STEPS, temperature=0, speculative=False)
    for i in range(STREAMS):
        prompt = engine.prepare(chat(f"Write a long story about robot number {i} and its cat."))
        engine.open(prompt, params, lambda: False)
    tokens, before, started = 0, 0, 0.0
    while engine.active:
        for _, event in engine.step():
            if isinstance(event, Finished):
                tokens += event.completion_tokens
        slots = engine._slots.slots.values()
        if not started and all(not s.pending for s in slots):
            # Prompts done: time decoding only, from the tokens sampled so far.
            started, before = time.perf_counter(), tokens + sum(s.sampled for s in slots)
    return (tokens - before) / (time.perf_counter() - started)


def short_during_long(engine: LlamaEngine) -> tuple[float, float]:
    """(seconds until a short request that arrives with a long prompt has its whole answer,
    seconds the long prompt's prefill takes)."""
    engine.prefill([], reuse=False)
    params = SamplingParams(max_tokens=16, temperature=0)
    started = time.perf_counter()
    engine.open(engine.prepare(chat(LONG)), params, lambda: False)
    short = engine.open(engine.prepare(chat("Name a colour.")), params, lambda: False)
    short_done = prefill_done = 0.0
    while engine.active:
        for seq, event in engine.step():
            if seq == short and isinstance(event, Finished):
                short_done = time.perf_counter() - started
        long = engine._slots.slots.get(0)
        if not prefill_done and (long is None or not long.pending):
            prefill_done = time.perf_counter() - started
    return short_done, prefill_done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    store = ModelStore(Paths.build())
    store.pull(MODEL)
    model = store.model_file(MODEL)
    info = store.get(MODEL).gguf_info()
    per_cell = estimate_kv_bytes(info.block_count or 0, 1, info.kv_width or 0, "f16")
    rows = []
    mixed: dict[int, tuple[float, float]] = {}
    for layout in layouts(model):
        engine = LlamaEngine(layout.settings)
        try:
            decode_rate(engine)  # warm-up
            rates = [decode_rate(engine) for _ in range(args.runs)]
            if layout.settings.kv_unified:
                chosen = slots.MIXED_PREFILL
                for share in (layout.settings.n_batch, chosen):
                    slots.MIXED_PREFILL = share
                    runs = [short_during_long(engine) for _ in range(args.runs)]
                    mixed[share] = (
                        statistics.median(r[0] for r in runs),
                        statistics.median(r[1] for r in runs),
                    )
                slots.MIXED_PREFILL = chosen
        finally:
            engine.close()
        kv_mib = per_cell * layout.settings.cells() / 2**20
        rows.append((layout.name, statistics.median(rates), kv_mib))
    anchor = rows[0][1]
    lines = [
        "## KV layouts: streams vs one shared pool",
        "",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- Machine: {machine()}",
        f"- Command: `make bench` (`python bench/kv_layout.py --runs {args.runs}`)",
        f"- SmolLM2-135M Q4_1, 2 threads, n_batch 512, {STREAMS} sequences of up to {PER_SEQ} "
        f"tokens; the pool holds {POOL} cells (a 128 MiB KV budget). Median of {args.runs} runs.",
        "",
        f"| layout | {STREAMS} greedy streams, aggregate tok/s | KV MiB | vs streams |",
        "|---|---:|---:|---:|",
    ]
    for name, rate, kv_mib in rows:
        lines.append(f"| {name} | {rate:.1f} | {kv_mib:.0f} | {rate / anchor:.2f}x |")
    if mixed:
        lines += [
            "",
            "A short request (16 tokens) arriving with a ~3,300-token prompt (pool layout):",
            "",
            "| prompt tokens per step while another decodes | short answer done s | "
            "long prefill s | short answer vs whole batch |",
            "|---|---:|---:|---:|",
        ]
        whole = mixed[512][0]
        for share, (short, prefill) in sorted(mixed.items(), reverse=True):
            label = f"{share} (the whole batch)" if share == 512 else f"{share} (clawd)"
            lines.append(f"| {label} | {short:.1f} | {prefill:.1f} | {whole / short:.2f}x |")
    write_section("kv_layout", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
