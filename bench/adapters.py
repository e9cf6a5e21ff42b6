"""Adapter benchmark: switching LoRA adapters between requests on one loaded model vs reloading
the model with the adapter (llama-cpp-python's `Llama(lora_path=...)`), and the memory each
loaded adapter costs. Adapters are built for SmolLM2's real shapes (rank 8 and 32, q/v
projections of every block), as in the tests.

Writes its section of bench/RESULTS.md. Run with `make bench`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _results import RESULTS, write_section
from foundation import machine

from tests.test_adapters import make_lora

PROMPT = "The capital of France is"


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import llama_cpp

    from clawctl.config import load_paths
    from clawctl.engines.base import AdapterSpec, EngineSettings, Prompt, SamplingParams, generate
    from clawctl.engines.llama.engine import LlamaEngine
    from clawctl.store.models import ModelStore

    model = ModelStore(load_paths()).model_file("smollm2-135m")
    threads = os.cpu_count() or 2
    work = Path(tempfile.mkdtemp(prefix="claw-lora-bench-"))
    loras = {
        rank: make_lora(model, work / f"r{rank}.gguf", b_scale=0.2, rank=rank) for rank in (8, 32)
    }
    settings = EngineSettings(model, 2048, 512, threads, model_digest="bench")
    engine = LlamaEngine(settings)
    params = SamplingParams(max_tokens=1, temperature=0)

    def one_token(adapters: tuple[AdapterSpec, ...]) -> float:
        started = time.perf_counter()
        engine.set_adapters(adapters)
        prepared = engine.prepare(Prompt(text=PROMPT))
        list(generate(engine, prepared, params))
        return time.perf_counter() - started

    specs = {rank: (AdapterSpec(f"d{rank}", path, 1.0),) for rank, path in loras.items()}
    before = rss()
    one_token(specs[8])
    after_r8 = rss()
    one_token(specs[32])
    after_r32 = rss()
    switching = []
    for i in range(args.runs):
        switching.append(one_token(specs[8] if i % 2 else ()))
    plain = [one_token(()) for _ in range(args.runs)]
    engine.close()

    reloading = []
    for _ in range(max(3, args.runs // 2)):
        started = time.perf_counter()
        llama = llama_cpp.Llama(
            str(model),
            n_ctx=2048,
            n_batch=512,
            n_threads=threads,
            lora_path=str(loras[8]),
            verbose=False,
        )
        llama.create_completion(PROMPT, max_tokens=1, temperature=0)
        reloading.append(time.perf_counter() - started)
        llama.close()

    switch_ms = statistics.median(switching) * 1000
    plain_ms = statistics.median(plain) * 1000
    reload_ms = statistics.median(reloading) * 1000
    lines = [
        "## Adapters: per-request switching vs reloading",
        "",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- Machine: {machine()}",
        f"- Command: `make bench` (`python bench/adapters.py --runs {args.runs}`)",
        "- One request = apply the adapter set, a 6-token prompt, first token; SmolLM2-135M Q4_1.",
        "",
        "| path | median ms per request |",
        "|---|---:|",
        f"| same loaded model, no adapter (anchor) | {plain_ms:.1f} |",
        f"| same loaded model, adapter switched on/off every request | {switch_ms:.1f} |",
        f"| reload the model with the adapter (`Llama(lora_path=...)`) | {reload_ms:.1f} |",
        "",
        f"Switching is {reload_ms / switch_ms:.0f}x faster than reloading. Memory per loaded "
        f"adapter (process RSS growth): rank 8 {(after_r8 - before) / 1e6:.1f} MB "
        f"(file {loras[8].stat().st_size / 1e6:.1f} MB), rank 32 "
        f"{(after_r32 - after_r8) / 1e6:.1f} MB (file {loras[32].stat().st_size / 1e6:.1f} MB).",
        "",
    ]
    write_section("adapters", "\n".join(lines), args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
