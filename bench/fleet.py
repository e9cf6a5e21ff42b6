"""Fleet benchmark: a second box's first request for a prefix another box computed, hydrated
from the fleet store vs computed on the box itself (the anchor), through clawd's API.

Two clawd boxes with separate data dirs share a real SeaweedFS (S3) on loopback. Box A answers
an agent-shaped request once (Qwen2.5-Coder-0.5B, the first part of OpenClaw's real system prompt
from bench/data/openclaw_session.jsonl) and uploads its prefix in the background. Then, per run,
a new box B with an empty data dir answers the same request: once without a fleet (it computes
the prefix) and once with it (it fetches the prefix A froze). Time to first token is the
client's wall time of a one-token answer. Writes its section of bench/RESULTS.md (`make bench`).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.seaweed
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section
from agents import MODEL, SESSION
from foundation import connects, machine, wait_for

from clawctl.paths import Paths
from clawctl.store.models import ModelStore
from tests.seaweed import SeaweedS3

BIN = Path(sys.executable).parent
SIZES = (2048, 4096)  # prompt tokens, about
CHARS_PER_TOKEN = 3.4  # a rough cut of the system prompt; the table reports the real count
GIGABIT = 125e6  # bytes/s


@dataclass(frozen=True)
class Row:
    tokens: int
    saved: int
    cold: list[float]  # seconds to first token, box B computing the prefix
    fleet: list[float]  # ... box B hydrating it from the fleet
    fetched_bytes: int


def system_prompt(tokens: int) -> str:
    first = json.loads(SESSION.read_text().splitlines()[0])
    body = first.get("body", first)
    text = str(body["messages"][0]["content"])
    return text[: int(tokens * CHARS_PER_TOKEN)]


def request(tokens: int) -> dict[str, object]:
    return {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": system_prompt(tokens)},
            {"role": "user", "content": "Which tools can you use?"},
        ],
        "max_tokens": 1,
        "temperature": 0,
        "claw": {"cache": False},
    }


@contextlib.contextmanager
def box(models: Path, work: Path, name: str, fleet: str) -> Iterator[httpx.Client]:
    """A clawd with an empty data dir (the model's blobs hard-linked in) and `fleet` as its
    `[fleet]` section (empty: no fleet)."""
    home = work / name
    shutil.copytree(models, home / "data" / "models", copy_function=os.link)
    config = work / f"{name}.toml"
    config.write_text(fleet)
    sock = Path(tempfile.mkdtemp(prefix="claw-fleet-", dir="/tmp")) / "c.sock"
    env = dict(
        os.environ, CLAW_HOME=str(home), CLAW_SOCKET=str(sock), CLAW_PROFILE="x86-small",
        CLAW_CONFIG=str(config),
    )  # fmt: skip
    proc = subprocess.Popen(
        [str(BIN / "clawd")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for(lambda: connects(sock))
        transport = httpx.HTTPTransport(uds=str(sock))
        with httpx.Client(transport=transport, base_url="http://clawd", timeout=900) as client:
            yield client
    finally:
        proc.terminate()
        proc.wait(60)
        shutil.rmtree(sock.parent, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


def ask(client: httpx.Client, tokens: int) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    response = client.post("/v1/chat/completions", json=request(tokens))
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed, response.json()


def measure(runs: int, work: Path, models: Path, s3: SeaweedS3) -> list[Row]:
    rows = []
    for size in SIZES:
        prefix = f"bench-{size}-{time.time_ns()}"
        fleet = s3.config_section(work, prefix, index_refresh_seconds=0)
        with box(models, work, "box-a", fleet) as a:
            _, first = ask(a, size)
            wait_for(
                lambda: (s := a.get("/admin/fleet").json())["uploaded"] >= 1 and not s["queued"]
            )
        cold, hydrated, fetched = [], [], 0
        for run in range(runs):
            with box(models, work, f"cold-{run}", "") as b:
                seconds, answer = ask(b, size)
                assert answer["claw"]["prefill_tokens_saved"] == 0
                cold.append(seconds)
            with box(models, work, f"fleet-{run}", fleet) as b:
                seconds, answer = ask(b, size)
                assert answer["claw"]["prefix_source"] == "fleet", answer["claw"]
                hydrated.append(seconds)
                fetched = int(b.get("/admin/fleet").json()["fetched_bytes"])
        claw = answer["claw"]
        usage = first["usage"]
        rows.append(
            Row(usage["prompt_tokens"], claw["prefill_tokens_saved"], cold, hydrated, fetched)
        )
    return rows


def _span(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def write_results(rows: list[Row], runs: int) -> None:
    lines = [
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- Machine: {machine()}",
        f"- Command: `make bench` (`python bench/fleet.py --runs {runs}`)",
        "- Workload: the first part of OpenClaw's real system prompt "
        "(bench/data/openclaw_session.jsonl) and a question; Qwen2.5-Coder-0.5B Q4_K_M, profile "
        "x86-small; box A answered it once and uploaded its prefix; each run starts a new box B "
        "with an empty data dir. Anchor: box B computing the prefix itself. SeaweedFS on "
        "loopback; the last column is the object's transfer time on a 1 Gbit/s LAN.",
        f"- Time to first token: client wall time of a one-token answer, median (min-max) of "
        f"{runs} runs, seconds",
        "",
        "| prompt tokens | hydrated from the fleet | B computes it (anchor) | speed-up "
        "| prefill saved | object | at 1 Gbit/s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ratio = statistics.median(row.cold) / statistics.median(row.fleet)
        size = row.fetched_bytes
        lines.append(
            f"| {row.tokens} | {_span(row.fleet)} | {_span(row.cold)} | {ratio:.1f}x "
            f"| {row.saved} | {size / 1e6:.1f} MB | {size / GIGABIT:.2f} s |"
        )
    lines += [
        "",
        "- B's time with the fleet covers listing the fleet's index, downloading the object, "
        "checking its sha256 and identity, decompressing and restoring it, and computing the "
        "prompt's tail after the last full block; the anchor computes the whole prompt.",
        "- Loopback is faster than a LAN: on 1 Gbit/s add the last column's time (still far "
        "below the prefill it replaces); on a link so slow that a fetch would lose, clawd "
        "computes the prefix instead (`[fleet] assumed_bandwidth_mb_s`, then measured).",
    ]
    write_section("fleet", "## Fleet: a prefix another box computed\n\n" + "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    s3 = SeaweedS3(work / "weed", work / "weed.log")
    try:
        models_home = work / "models-home"
        ModelStore(Paths.build(models_home)).pull(MODEL)
        s3.start()
        rows = measure(args.runs, work, models_home / "data" / "models", s3)
        write_results(rows, args.runs)
    finally:
        s3.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(work)


if __name__ == "__main__":
    main()
