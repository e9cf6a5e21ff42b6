"""ONNX and dedup benchmark: ONNX vs GGUF generation of the same model at INT4, embedding
latency per quantization, and answer-cache hit latency through clawd over its Unix socket.

- Generation: SmolLM2-135M as GGUF Q4_1 (llama.cpp) and as `models convert --to onnx-int4`
  (onnxruntime-genai, the GGUF's Q4_1 weights carried over), both through clawd with the same
  request, greedy, cache off; decode tok/s from clawd's own timings; rounds interleaved. Needs
  the build tools (`pip install 'clawctl[convert]'`); without them that section says so.
- Embeddings: MiniLM-L6 float32 / int8 / int4 / int2 in-process (one sentence, and a batch of
  32), and one sentence through `/v1/embeddings`.
- Cache: the same chat request answered by generating (cache off: the anchor), from an exact hit
  and from a semantic hit, over the socket. Target: a hit within 10 ms.

Writes bench/RESULTS.md. Run with `make bench`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS, write_section
from foundation import machine, spawn_clawd

SENTENCE = "How do I reset the password of my router?"
BATCH = [
    f"Ticket {i}: the router in room {i} drops the connection every evening." for i in range(32)
]
GEN_PROMPT = "Write a short story about a robot who learns to paint."
MAX_TOKENS = 128
HIT_TARGET_MS = 10.0


def median_ms(action: Callable[[], object], runs: int) -> tuple[float, float, float]:
    """Median, min and max wall time of `action` in ms, after one warm-up call."""
    action()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), min(times), max(times)


def prepare_home(home: Path, with_onnx_generation: bool) -> tuple[list[str], str | None]:
    """Install the models into a throw-away home; returns the embedding models and the ONNX
    generation model's name (None when the build tools are missing)."""
    from clawctl.build.convert.recipes import convert_model, pull_model, quantize_onnx_model
    from clawctl.config import load_paths
    from clawctl.errors import BadInput
    from clawctl.paths import Paths
    from clawctl.store.models import ModelStore

    mine = ModelStore(Paths.build(home, load_paths().download_cache))
    mine.add(ModelStore(load_paths()).model_file("smollm2-135m"), name="smollm2-135m")
    pull_model(mine, "minilm-l6")
    embedders = ["minilm-l6"]
    for bits in (8, 4, 2):
        embedders.append(quantize_onnx_model(mine, "minilm-l6", bits).manifest.name)
    embedders.append(pull_model(mine, "minilm-l6-gguf")[0].name)
    onnx_model = None
    if with_onnx_generation:
        try:
            onnx_model = convert_model(mine, "smollm2-135m", "onnx-int4").name
        except BadInput as exc:
            print(f"ONNX generation skipped: {exc.message}", file=sys.stderr)
    return embedders, onnx_model


def embedding_rows(home: Path, names: list[str], runs: int) -> list[str]:
    from clawctl.paths import Paths
    from clawctl.runtime.embeddings import load_embedder
    from clawctl.store.models import ModelStore

    store = ModelStore(Paths.build(home))
    rows = []
    for name in names:
        manifest = store.get(name)
        embedder = load_embedder(store, manifest, threads=1)
        one = median_ms(lambda e=embedder: e.embed([SENTENCE]), runs)
        batch = median_ms(lambda e=embedder: e.embed(BATCH), max(3, runs // 5))
        embedder.close()
        quality = manifest.onnx.quality if manifest.onnx else None
        engine = "onnxruntime" if manifest.onnx else "llama.cpp"
        shown = f"{quality:.4f}" if quality is not None else "0.99999 (checked at conversion)"
        rows.append(
            f"| {name} | {engine} | {manifest.quant} | {manifest.size / 1e6:.1f} | "
            f"{shown} | {one[0]:.1f} | {batch[0]:.0f} |"
        )
    return rows


def chat(client: httpx.Client, model: str, content: str, cache: bool) -> dict[str, object]:
    response = client.post(
        "/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "claw": {"cache": cache},
        },
    )
    response.raise_for_status()
    body: dict[str, object] = response.json()
    return body


def decode_tps(client: httpx.Client, model: str, rounds: int) -> list[float]:
    rates = []
    for i in range(rounds):
        body = chat(client, model, f"Story {i}. {GEN_PROMPT}", cache=False)
        claw = body["claw"]
        assert isinstance(claw, dict)
        rates.append(float(claw["timings"]["decode_tokens_per_s"] or 0.0))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5, help="generation rounds per engine")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--skip-onnx-generation", action="store_true")
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        home = Path(tempfile.mkdtemp(prefix="claw-bench-home-"))
        stack.callback(shutil.rmtree, home, True)
        config = home / "clawd.toml"
        config.write_text("[cache]\nthreshold = 0.99\n")
        embedders, onnx_model = prepare_home(home, not args.skip_onnx_generation)
        embed_rows = embedding_rows(home, embedders, args.runs)
        os.environ["CLAW_CONFIG"] = str(config)
        _, sock = spawn_clawd(home, stack)
        client = stack.enter_context(
            httpx.Client(
                transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://clawd", timeout=600
            )
        )
        api_embed = median_ms(
            lambda: client.post("/v1/embeddings", json={"input": SENTENCE}).raise_for_status(),
            args.runs,
        )
        question = "What is the capital of France?"
        generated = median_ms(
            lambda: chat(client, "smollm2-135m", question, cache=False), max(3, args.runs // 5)
        )
        chat(client, "smollm2-135m", question, cache=True)  # stored
        exact = median_ms(lambda: chat(client, "smollm2-135m", question, True), args.runs)
        semantic = median_ms(
            lambda: chat(client, "smollm2-135m", "What's the capital of France?", True),
            args.runs,
        )
        check = chat(client, "smollm2-135m", "What's the capital of France?", True)["claw"]
        assert isinstance(check, dict)
        assert check["cached"] == "semantic", check
        generation: dict[str, list[float]] = {"smollm2-135m": []}
        if onnx_model:
            generation[onnx_model] = []
        for name in generation:  # warm-up: load both
            decode_tps(client, name, 1)
        for _ in range(args.rounds):  # interleaved
            for name in generation:
                generation[name] += decode_tps(client, name, 1)

    write(args, embed_rows, api_embed, generated, exact, semantic, generation, onnx_model)


def write(
    args: argparse.Namespace,
    embed_rows: list[str],
    api_embed: tuple[float, float, float],
    generated: tuple[float, float, float],
    exact: tuple[float, float, float],
    semantic: tuple[float, float, float],
    generation: dict[str, list[float]],
    onnx_model: str | None,
) -> None:
    gguf = statistics.median(generation["smollm2-135m"])
    lines = [
        "## ONNX and dedup: ONNX vs GGUF generation, embeddings, answer-cache hits",
        "",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- Machine: {machine()}",
        f"- Command: `make bench` (`python bench/onnx_dedup.py --runs {args.runs} "
        f"--rounds {args.rounds}`)",
        "- Profile x86-small (2 threads); medians after one warm-up",
        "",
        "### Generation: the same model at INT4 through clawd",
        "",
        f"Greedy chat, {MAX_TOKENS} tokens max, cache off, a new prompt per round, "
        f"{args.rounds} interleaved rounds; decode tok/s from clawd's timings.",
        "",
        "| engine | model | decode tok/s (median) | min-max | vs GGUF (anchor) |",
        "|---|---|---:|---:|---:|",
        f"| llama.cpp (anchor) | smollm2-135m (GGUF Q4_1) | {gguf:.1f} | "
        f"{min(generation['smollm2-135m']):.0f}-{max(generation['smollm2-135m']):.0f} | 1.00x |",
    ]
    if onnx_model:
        rates = generation[onnx_model]
        onnx = statistics.median(rates)
        lines.append(
            f"| onnxruntime-genai | {onnx_model} (Q4_1 weights as MatMulNBits) | {onnx:.1f} | "
            f"{min(rates):.0f}-{max(rates):.0f} | {onnx / gguf:.2f}x |"
        )
    else:
        lines.append("| onnxruntime-genai | not run: build tools missing | | | |")
    lines += [
        "",
        "### Embeddings (MiniLM-L6, 384 dims)",
        "",
        "In-process, one thread; one sentence and a batch of 32 short texts.",
        "",
        "| model | engine | weights | MB | cosine vs float | 1 text ms | 32 texts ms |",
        "|---|---|---|---:|---:|---:|---:|",
        *embed_rows,
        "",
        f"Through clawd: `/v1/embeddings` with one sentence: {api_embed[0]:.1f} ms median "
        f"({api_embed[1]:.1f}-{api_embed[2]:.1f}).",
        "",
        "### Answer cache over the Unix socket",
        "",
        "| request | median ms | min-max | vs generating (anchor) |",
        "|---|---:|---:|---:|",
        f"| generated (cache off, anchor) | {generated[0]:.1f} | "
        f"{generated[1]:.0f}-{generated[2]:.0f} | 1.00x |",
        f"| exact hit | {exact[0]:.2f} | {exact[1]:.1f}-{exact[2]:.1f} | "
        f"{exact[0] / generated[0]:.3f}x |",
        f"| semantic hit (embeds the question) | {semantic[0]:.2f} | "
        f"{semantic[1]:.1f}-{semantic[2]:.1f} | {semantic[0] / generated[0]:.3f}x |",
        "",
        "### Targets",
        "",
        "| target | measured | met |",
        "|---|---:|---|",
        f"| exact cache hit <= {HIT_TARGET_MS:.0f} ms over the socket | {exact[0]:.2f} ms | "
        f"{'yes' if exact[0] <= HIT_TARGET_MS else 'NO'} |",
        f"| semantic cache hit <= {HIT_TARGET_MS:.0f} ms over the socket | {semantic[0]:.2f} ms | "
        f"{'yes' if semantic[0] <= HIT_TARGET_MS else 'NO'} |",
        "",
        "### Notes",
        "",
        "- The ONNX model carries the GGUF's own Q4_1 blocks, but onnxruntime's MatMulNBits runs "
        "them with int8 activations (accuracy level 4, integer dot products), which is where its "
        "speed comes from on this CPU; its greedy choices agree with llama.cpp's on 91-100% of "
        "positions (tests/test_gguf_onnx.py), not on all of them. It decodes one request at a "
        "time: under concurrent load the GGUF engine's continuous batching is the faster one "
        "(see the concurrency benchmark).",
        "- int2 embeddings are slower than int4 and int8 here: onnxruntime's 2-bit kernel is the "
        "slow path for many tokens at once; 2 bits buy size, not speed (and the vectors "
        "collapse).",
        "- A cache hit skips the model entirely: what is left is HTTP over the socket, the key's "
        "hash and, for a semantic hit, one MiniLM embedding of the question (~4 ms).",
        "",
    ]
    write_section("onnx_dedup", "\n".join(lines), args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
