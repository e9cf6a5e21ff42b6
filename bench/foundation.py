"""Foundation benchmark: streaming decode and time to first token through clawd over its Unix
socket, against in-process llama-cpp-python (the anchor) and `python -m llama_cpp.server`, on the
same model and settings, in one run; plus `clawctl --help` time and clawd's idle RSS.

Writes bench/RESULTS.md. Run with `make bench` (which pulls the default model first).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS, write_section

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PROFILE = "x86-small"  # n_ctx 4096, n_batch 512, 2 threads, f16 KV: used by all three contenders
N_CTX, N_BATCH = 4096, 512
STORY = "Write a long story about a robot who learns to paint."
_counter = iter(range(1_000_000))


def messages() -> list[dict[str, str]]:
    """A fresh prompt per run (a number up front), so every contender pays a cold prefill."""
    return [{"role": "user", "content": f"Story number {next(_counter)}. {STORY}"}]


MAX_TOKENS = 128
ANCHOR = "in-process llama-cpp-python (anchor)"


@dataclass
class Run:
    ttft: float
    tokens: int
    decode_tps: float


def stream_run(chunks: Iterator[str], started: float) -> Run:
    first = last = None
    count = 0
    for _ in chunks:
        now = time.perf_counter()
        first = first or now
        last = now
        count += 1
    if first is None or last is None or count < 2:
        raise RuntimeError("the server streamed fewer than two tokens")
    return Run(first - started, count, (count - 1) / (last - first))


def sse_chunks(client: httpx.Client, path: str) -> Iterator[str]:
    """Stream a chat completion and yield each content delta.

    A lean SSE reader (httpx + json.loads), the same for every server, so the figures measure the
    servers rather than the client library's per-chunk model building (the openai client costs
    the shared 2-core machine several percent of decode speed; the API tests use it).
    """
    body = {
        "model": "smollm2-135m",
        "messages": messages(),
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
    }
    with client.stream("POST", path, json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                content = choice.get("delta", {}).get("content")
                if content:
                    yield content


Once = Callable[[], Run]


def in_process(model: Path, threads: int, stack: contextlib.ExitStack) -> Once:
    import llama_cpp

    llama = llama_cpp.Llama(
        str(model),
        n_ctx=N_CTX,
        n_batch=N_BATCH,
        n_ubatch=N_BATCH,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    stack.callback(llama.close)

    def once() -> Run:
        started = time.perf_counter()
        stream = llama.create_chat_completion(
            messages=messages(), max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
        pieces = (c["choices"][0]["delta"].get("content") for c in stream)  # type: ignore[index,union-attr]
        return stream_run((p for p in pieces if p), started)

    return once


def connects(sock: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(sock))
        except OSError:
            return False
    return True


def wait_for(ready: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError("server did not start")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(30)


def spawn_clawd(home: Path, stack: contextlib.ExitStack) -> tuple[subprocess.Popen[bytes], Path]:
    """clawd with the bench profile on a temporary socket, stopped with `stack`; returns the
    process and its socket once it accepts connections."""
    sock_dir = Path(tempfile.mkdtemp(prefix="claw-bench-", dir="/tmp"))
    stack.callback(shutil.rmtree, sock_dir, True)
    sock = sock_dir / "clawd.sock"
    env = dict(os.environ, CLAW_HOME=str(home), CLAW_SOCKET=str(sock), CLAW_PROFILE=PROFILE)
    proc = subprocess.Popen(
        [str(BIN / "clawd")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    stack.callback(_stop, proc)
    wait_for(lambda: connects(sock))
    return proc, sock


def through_clawd(home: Path, stack: contextlib.ExitStack) -> tuple[Once, int]:
    """clawd on a temporary socket; returns the run function and its idle RSS (no model)."""
    proc, sock = spawn_clawd(home, stack)
    time.sleep(1.0)
    idle_rss = psutil.Process(proc.pid).memory_info().rss
    client = stack.enter_context(
        httpx.Client(
            transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://clawd", timeout=300
        )
    )

    def once() -> Run:
        started = time.perf_counter()
        return stream_run(sse_chunks(client, "/v1/chat/completions"), started)

    return once, idle_rss


def through_llama_cpp_server(model: Path, threads: int, stack: contextlib.ExitStack) -> Once:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            str(N_CTX),
            "--n_batch",
            str(N_BATCH),
            "--n_threads",
            str(threads),
            "--n_threads_batch",
            str(threads),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stack.callback(_stop, proc)

    def up() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up)
    client = stack.enter_context(httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300))

    def once() -> Run:
        started = time.perf_counter()
        return stream_run(sse_chunks(client, "/v1/chat/completions"), started)

    return once


def interleaved(contenders: dict[str, Once], runs: int) -> dict[str, list[Run]]:
    """Round-robin the contenders so machine noise falls on all of them alike."""
    for once in contenders.values():
        once()  # warm-up: load the model, fill caches
    results: dict[str, list[Run]] = {label: [] for label in contenders}
    for round_ in range(runs):
        for label, once in contenders.items():
            results[label].append(once())
        print(f"round {round_ + 1}/{runs} done", file=sys.stderr)
    return results


def help_time(runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([str(BIN / "clawctl"), "--help"], capture_output=True, check=True)
        times.append(time.perf_counter() - started)
    return times


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import llama_cpp

    return (
        f"{cpu}, {psutil.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, Python "
        f"{platform.python_version()}, llama-cpp-python {llama_cpp.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from clawctl.config import load_paths
    from clawctl.profiles import load_profile
    from clawctl.store.models import ModelStore

    threads = load_profile(load_paths(), PROFILE).effective_threads()
    model = ModelStore(load_paths()).model_file("smollm2-135m")
    with contextlib.ExitStack() as stack:
        home = Path(tempfile.mkdtemp(prefix="claw-bench-home-"))
        stack.callback(shutil.rmtree, home, True)
        ModelStore(load_paths_for(home)).add(model, name="smollm2-135m")
        ours, idle_rss = through_clawd(home, stack)
        contenders = {
            ANCHOR: in_process(model, threads, stack),
            "clawd over Unix socket": ours,
            "python -m llama_cpp.server (TCP)": through_llama_cpp_server(model, threads, stack),
        }
        results = interleaved(contenders, args.runs)
    helps = help_time(10)
    write_results(args, results, helps, idle_rss)


def load_paths_for(home: Path):  # type: ignore[no-untyped-def]
    from clawctl.paths import Paths

    return Paths.build(home)


def write_results(
    args: argparse.Namespace, results: dict[str, list[Run]], helps: list[float], idle_rss: int
) -> None:
    def med(runs: list[Run], field: str) -> float:
        return statistics.median(getattr(r, field) for r in runs)

    base_tps = med(results[ANCHOR], "decode_tps")
    rows = list(results.items())
    ours = results["clawd over Unix socket"]
    lines = [
        "## Foundation: clawd vs in-process llama-cpp-python vs llama_cpp.server",
        "",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- Machine: {machine()}",
        f"- Command: `make bench` (`python bench/foundation.py --runs {args.runs}`)",
        f"- Model: smollm2-135m (SmolLM2-135M-Instruct Q4_1), n_ctx {N_CTX}, n_batch {N_BATCH}, "
        f"profile {PROFILE}; streaming chat, {MAX_TOKENS} tokens max, temperature 0; "
        f"median of {args.runs} interleaved rounds after one warm-up each; "
        "every run's prompt is new (cold prefill)",
        "- All three generate with llama-cpp-python; one client at a time; both servers are read "
        "by the same lean SSE client (httpx + json.loads)",
        "",
        "### Streaming decode and time to first token",
        "",
        "| contender | decode tok/s (median) | min-max | vs anchor | TTFT ms | tokens |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, runs in rows:
        tps = med(runs, "decode_tps")
        spread = [r.decode_tps for r in runs]
        lines.append(
            f"| {label} | {tps:.1f} | {min(spread):.0f}-{max(spread):.0f} | "
            f"{tps / base_tps:.2f}x | {med(runs, 'ttft') * 1000:.0f} | {int(med(runs, 'tokens'))} |"
        )
    ratio = med(ours, "decode_tps") / base_tps
    help_s = statistics.median(helps)
    lines += [
        "",
        "### Targets",
        "",
        "| target | measured | met |",
        "|---|---:|---|",
        f"| clawd decode >= 0.95x in-process | {ratio:.2f}x | {'yes' if ratio >= 0.95 else 'NO'} |",
        f"| `clawctl --help` <= 0.25 s | {help_s:.3f} s | {'yes' if help_s <= 0.25 else 'NO'} |",
        f"| clawd idle RSS <= 80 MB (no model loaded) | {idle_rss / 1e6:.1f} MB | "
        f"{'yes' if idle_rss <= 80e6 else 'NO'} |",
        "",
    ]
    lines += [
        "### Notes",
        "",
        "- Decode speed on this shared 2-core machine varies by about ±10% between runs (see "
        "min-max); contenders are interleaved round by round so the noise falls on all alike.",
        "- Read through the official `openai` client instead, clawd measured 0.93-0.97x of the "
        "anchor here: the client's per-chunk parsing competes with the two decode threads.",
        "- llama_cpp.server was not bimodal with one sequential client here; its OpenMP slowdown "
        "shows when requests land on different worker threads (see the batching benchmark).",
        "",
    ]
    write_section("foundation", "\n".join(lines), args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
