"""Snapshot benchmark: time to first token after hydrating a frozen context vs cold prefill,
through clawd's API, at 512/1k/2k/~4k tokens; bytes on disk vs the raw state for f16 (plain zstd,
byte-shuffled zstd) and q8_0 KV; and the same work through llama-cpp-python's LlamaDiskCache.

Writes its section of bench/RESULTS.md. Run with `make bench`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS, write_section
from foundation import connects, machine, wait_for

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
SIZES = (512, 1024, 2048, 3968)  # the largest stays inside the 4,096-token context
TEXT_SOURCES = sorted((ROOT / "clawctl").rglob("*.py"))


def corpus() -> str:
    return "\n".join(p.read_text() for p in TEXT_SOURCES)


def prompt_of(tokens: int, tokenize: callable, salt: str) -> str:  # type: ignore[valid-type]
    """A prompt of about `tokens` tokens, unique per salt (so nothing is cached)."""
    text = f"[{salt}]\n" + corpus()
    lo, hi = 0, len(text)
    while lo < hi:  # binary search on characters for the token count
        mid = (lo + hi + 1) // 2
        if len(tokenize(text[:mid])) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


@contextlib.contextmanager
def clawd(home: Path, profile: str) -> Iterator[httpx.Client]:
    sock_dir = Path(tempfile.mkdtemp(prefix="claw-snap-", dir="/tmp"))
    sock = sock_dir / "c.sock"
    config = sock_dir / "clawd.toml"
    config.write_text("[snapshots]\npool = false\n")  # measure named snapshots alone
    env = dict(
        os.environ,
        CLAW_HOME=str(home),
        CLAW_SOCKET=str(sock),
        CLAW_PROFILE=profile,
        CLAW_CONFIG=str(config),
    )
    proc = subprocess.Popen(
        [str(BIN / "clawd")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for(lambda: connects(sock))
        with httpx.Client(
            transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://clawd", timeout=600
        ) as client:
            yield client
    finally:
        proc.terminate()
        proc.wait(60)
        shutil.rmtree(sock_dir, ignore_errors=True)


def ttft(client: httpx.Client, prompt: str, **claw: object) -> float:
    body = {
        "model": "smollm2-135m",
        "prompt": prompt,
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
        "claw": claw,
    }
    started = time.perf_counter()
    with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                return time.perf_counter() - started
    raise RuntimeError("no token streamed")


def evict(client: httpx.Client) -> None:
    client.post(
        "/v1/completions",
        json={"model": "smollm2-135m", "max_tokens": 1, "prompt": "Something else entirely."},
    ).raise_for_status()


def api_rows(home: Path, profile: str, tokenize: callable, runs: int) -> list[dict[str, float]]:  # type: ignore[valid-type]
    rows = []
    with clawd(home, profile) as client:
        evict(client)  # load the model
        for size in SIZES:
            colds = []
            for i in range(max(2, runs // 2)):
                colds.append(ttft(client, prompt_of(size, tokenize, f"cold-{size}-{i}")))
            prompt = prompt_of(size, tokenize, f"frozen-{size}")
            name = f"bench-{profile}-{size}"
            client.post(
                "/v1/completions",
                json={
                    "model": "smollm2-135m",
                    "prompt": prompt,
                    "max_tokens": 1,
                    "claw": {"snapshot": {"save": name}},
                },
            ).raise_for_status()
            warms = []
            for _ in range(runs):
                evict(client)
                warms.append(ttft(client, prompt, snapshot={"load": name}))
            snap = home / "data" / "snapshots" / "named" / f"{name}.snap"
            rows.append(
                {
                    "tokens": size,
                    "cold": statistics.median(colds),
                    "hydrated": statistics.median(warms),
                    "bytes": snap.stat().st_size,
                }
            )
    return rows


def disk_rows(model: Path, tokenize: callable) -> list[dict[str, object]]:  # type: ignore[valid-type]
    """Raw vs stored bytes at 2k tokens for each KV type and filter."""
    from clawctl.engines.base import EngineSettings
    from clawctl.engines.llama.engine import LlamaEngine
    from clawctl.store.snapshot_format import encode

    tokens = None
    rows = []
    for kv in ("f16", "q8_0"):
        engine = LlamaEngine(EngineSettings(model, 4096, 512, os.cpu_count() or 2, kv, False, "x"))
        try:
            if tokens is None:
                tokens = engine.prepare(
                    __import__("clawctl.engines.base", fromlist=["Prompt"]).Prompt(
                        text=prompt_of(2048, tokenize, "disk")
                    )
                ).tokens
            engine.prefill(tokens)
            raw, held = engine.capture_state()
            identity = engine.identity()
        finally:
            engine.close()
        for filter_ in ("none", "shuffle2") if kv == "f16" else ("none",):
            started = time.perf_counter()
            _, chunks = encode(
                raw,
                kind="named",
                name="x",
                identity=identity,
                tokens=held,
                filter_=filter_,
                level=1,
            )
            seconds = time.perf_counter() - started
            rows.append(
                {
                    "kv": kv,
                    "filter": filter_,
                    "raw": len(raw),
                    "stored": sum(len(c) for c in chunks),
                    "encode_s": seconds,
                }
            )
    return rows


def disk_cache_row(model: Path, tokenize: callable, runs: int) -> dict[str, float]:  # type: ignore[valid-type]
    """llama-cpp-python's own answer: LlamaDiskCache (pickled LlamaState) at 2k tokens."""
    import llama_cpp

    cache_dir = Path(tempfile.mkdtemp(prefix="claw-diskcache-"))
    prompt = prompt_of(2048, tokenize, "diskcache")

    def first_token_seconds(llama: llama_cpp.Llama) -> float:
        started = time.perf_counter()
        stream = iter(llama.create_completion(prompt, max_tokens=4, temperature=0, stream=True))
        next(stream)
        seconds = time.perf_counter() - started
        list(stream)  # finishing the completion stores the state again (a hit pops it)
        return seconds

    try:
        llama = llama_cpp.Llama(
            str(model), n_ctx=4096, n_batch=512, n_threads=os.cpu_count(), verbose=False
        )
        llama.set_cache(llama_cpp.LlamaDiskCache(str(cache_dir)))
        with contextlib.redirect_stderr(open(os.devnull, "w")):
            cold = first_token_seconds(llama)
            size = sum(p.stat().st_size for p in cache_dir.rglob("*") if p.is_file())
            warms = []
            for _ in range(runs):
                llama.reset()
                list(llama.create_completion("Something else.", max_tokens=1))
                warms.append(first_token_seconds(llama))
        llama.close()
        return {"cold": cold, "hydrated": statistics.median(warms), "bytes": size}
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import llama_cpp

    from clawctl.config import load_paths
    from clawctl.paths import Paths
    from clawctl.store.models import ModelStore

    model = ModelStore(load_paths()).model_file("smollm2-135m")
    vocab = llama_cpp.Llama(str(model), vocab_only=True, verbose=False)

    def tokenize(text: str) -> list[int]:
        return vocab.tokenize(text.encode())

    disk = disk_rows(model, tokenize)
    lcp = disk_cache_row(model, tokenize, args.runs)
    home = Path(tempfile.mkdtemp(prefix="claw-snap-home-"))
    try:
        ModelStore(Paths.build(home)).add(model, name="smollm2-135m")
        f16 = api_rows(home, "x86-small", tokenize, args.runs)
        profile_dir = home / "config" / "edge_profiles"
        profile_dir.mkdir(parents=True)
        base = (ROOT / "edge_profiles" / "x86-small.toml").read_text()
        (profile_dir / "x86-small-q8.toml").write_text(
            base.replace('kv_cache_type = "f16"', 'kv_cache_type = "q8_0"')
        )
        q8 = api_rows(home, "x86-small-q8", tokenize, args.runs)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    report(args, f16, q8, disk, lcp)


def report(
    args: argparse.Namespace,
    f16: list[dict[str, float]],
    q8: list[dict[str, float]],
    disk: list[dict[str, object]],
    lcp: dict[str, float],
) -> None:
    lines = [
        "## Snapshots: hydration vs cold prefill",
        "",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- Machine: {machine()}",
        f"- Command: `make bench` (`python bench/snapshots.py --runs {args.runs}`)",
        "- Time to first token of a streaming /v1/completions through clawd's socket; cold = a "
        "prompt never seen (median of several), hydrated = the same prompt with "
        f"`claw.snapshot.load` after another prompt took the context (median of {args.runs}). "
        "Profile x86-small (f16 KV, byte-shuffled zstd) and the same with a q8_0 KV cache.",
        "",
        "| KV | tokens | cold TTFT ms | hydrated TTFT ms | speed-up | snapshot on disk |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for kv, rows in (("f16", f16), ("q8_0", q8)):
        for r in rows:
            lines.append(
                f"| {kv} | {int(r['tokens'])} | {r['cold'] * 1000:.0f} | "
                f"{r['hydrated'] * 1000:.1f} | {r['cold'] / r['hydrated']:.0f}x | "
                f"{r['bytes'] / 1e6:.1f} MB |"
            )
    raw_f16 = next(int(d["raw"]) for d in disk if d["kv"] == "f16")  # type: ignore[call-overload]
    lines += [
        "",
        "### Bytes on disk at 2,048 tokens",
        "",
        "| KV | filter | raw state | stored | vs raw f16 state | encode ms |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for d in disk:
        lines.append(
            f"| {d['kv']} | {d['filter']} | {int(d['raw']) / 1e6:.1f} MB | "  # type: ignore[call-overload]
            f"{int(d['stored']) / 1e6:.1f} MB | {int(d['stored']) / raw_f16:.2f} | "  # type: ignore[call-overload]
            f"{float(d['encode_s']) * 1000:.0f} |"
        )  # type: ignore[arg-type]
    two_k = next(r for r in f16 if r["tokens"] == 2048)
    two_k_q8 = next(r for r in q8 if r["tokens"] == 2048)
    best_disk = min(disk, key=lambda d: int(d["stored"]))  # type: ignore[call-overload]
    smallest = int(best_disk["stored"]) / raw_f16  # type: ignore[call-overload]
    lines += [
        "",
        "### llama-cpp-python's LlamaDiskCache at 2,048 tokens (in-process, same model)",
        "",
        "| cold TTFT ms | hydrated TTFT ms | speed-up | on disk |",
        "|---:|---:|---:|---:|",
        f"| {lcp['cold'] * 1000:.0f} | {lcp['hydrated'] * 1000:.0f} | "
        f"{lcp['cold'] / lcp['hydrated']:.0f}x | {lcp['bytes'] / 1e6:.1f} MB |",
        "",
        "### Targets",
        "",
        "| target | measured | met |",
        "|---|---:|---|",
        *(
            f"| hydration >= 150x faster than prefill at 2k tokens, {kv} KV | "
            f"{row['cold'] / row['hydrated']:.0f}x | "
            f"{'yes' if row['cold'] / row['hydrated'] >= 150 else 'NO'} |"
            for kv, row in (("f16", two_k), ("q8_0", two_k_q8))
        ),
        f"| on disk <= 0.70 of the raw f16 state | {smallest:.2f} ({best_disk['kv']} KV, "
        f"{best_disk['filter']}) | "
        f"{'yes' if smallest <= 0.70 else 'NO'} |",
        "",
    ]
    write_section("snapshots", "\n".join(lines), args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
