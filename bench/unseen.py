"""The shipped `cascade` policy on work it was never fitted to, as a new user meets it.

Two labelled tasks the development sets do not contain: a multiple-choice geography task
(OpenAI Evals' `largest_country`, MIT, in bench/data) and two-digit arithmetic (generated here,
labelled by computing). SmolLM2-135M is the local tier, Qwen2.5-Coder-0.5B the remote one (a
second clawd, reached through the policy's `CLAW_REMOTE_BASE_URL`), greedy, 32 tokens. Each task
runs on a fresh clawd, in order, as one user's traffic:

- the shipped `cascade` (its window-entropy threshold fitted by asking every tier on the
  development sets, `[adjust]` holding 20% escalated);
- the same policy with `[adjust]` removed (the threshold as written);
- the anchor: the policy shipped before (window entropy 1.4, chosen on the local meter alone,
  no `[adjust]`);
- each model alone.

Reported per task: accuracy and the share escalated, over all requests and over the second half
(after online adjustment had requests to learn from).

Writes its section of bench/RESULTS.md (`make bench`; `--limit N` per task).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section
from cascade import MAX_TOKENS, REMOTE, Box, answer_graded, start_box
from foundation import BIN, machine

from clawctl.resources import bundled_dir
from clawctl.routing.policy import load_policy
from clawctl.store.models import ModelStore

DATA = Path(__file__).resolve().parent / "data"
LOCAL = "smollm2-135m"


def geography(limit: int) -> list[dict[str, Any]]:
    lines = (DATA / "largest_country.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()][:limit]


def arithmetic(limit: int) -> list[dict[str, Any]]:
    """Two-digit sums, differences and products, the same every run (seeded)."""
    rng = random.Random(18)
    system = "Answer with the number only."
    examples = []
    for _ in range(limit):
        a, b, op = rng.randint(10, 99), rng.randint(10, 99), rng.choice("+-*")
        value = a + b if op == "+" else a - b if op == "-" else a * b
        examples.append({
            "input": [{"role": "system", "content": system},
                      {"role": "user", "content": f"What is {a} {op} {b}?"}],
            "ideal": str(value),
        })  # fmt: skip
    return examples


def ask(box: Box, model: str, example: dict[str, Any]) -> tuple[bool, bool]:
    return answer_graded(box, model, example, "bench-unseen")


# The shipped policy's threshold before it was fitted by asking every tier (and before
# `[adjust]`): what a new user got, the anchor.
PREVIOUS_THRESHOLD = "1.4"


def fixed_policy(work: Path, name: str, threshold: str | None = None) -> Path:
    """The shipped cascade without its online adjustment (and with another written threshold,
    if given), installed under another name."""
    text = (bundled_dir("daemon") / "policies" / "cascade.toml").read_text()
    start, end = text.index("[adjust]"), text.index("[audit]")
    text = text[:start] + text[end:]
    text = text.replace('name = "cascade"', f'name = "{name}"', 1)
    if threshold is not None:
        text = re.sub(r"(?m)^window_entropy = [0-9.]+", f"window_entropy = {threshold}", text)
    path = work / f"{name}.toml"
    path.write_text(text)
    return path


VARIANTS = {"cascade-previous": PREVIOUS_THRESHOLD, "cascade-fixed": None}


def run(name: str, examples: list[dict[str, Any]], port: int, work: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    env = {"CLAW_REMOTE_BASE_URL": f"http://127.0.0.1:{port}/v1", "CLAW_REMOTE_API_KEY": "bench"}
    for policy in ("cascade", *VARIANTS):
        with contextlib.ExitStack() as stack:
            box = start_box(stack, **env)
            if policy in VARIANTS:
                path = fixed_policy(work, policy, VARIANTS[policy])
                subprocess.run([str(BIN / "clawctl"), "route", "apply", str(path)],
                               env=box.env, check=True, capture_output=True)  # fmt: skip
            results[policy] = [ask(box, policy, e) for e in examples]
    with contextlib.ExitStack() as stack:
        box = start_box(stack)
        results["local"] = [ask(box, LOCAL, e) for e in examples]
    print(f"{name}: done", flush=True)
    return results


def cell(answers: list[tuple[bool, bool]], escalation: bool = True) -> str:
    right = sum(r for r, _ in answers) / len(answers)
    if not escalation:
        return f"{right:.0%}"
    up = sum(e for _, e in answers) / len(answers)
    second = answers[len(answers) // 2 :]
    up2 = sum(e for _, e in second) / len(second)
    return f"{right:.0%} ({up:.0%} escalated; second half {up2:.0%})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--limit", type=int, default=80)
    args = parser.parse_args()
    from clawctl.config import load_paths
    from tests.conftest import free_port

    store = ModelStore(load_paths())
    for model in (LOCAL, REMOTE):
        store.pull(model)
    tasks = {"largest_country (geography, multiple choice)": geography(args.limit),
             "two-digit arithmetic": arithmetic(args.limit)}  # fmt: skip
    rows = []
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="claw-unseen-")))
        port = free_port()
        remote = start_box(stack, tcp_port=port)
        for name, examples in tasks.items():
            results = run(name, examples, port, work)
            remote_alone = [ask(remote, REMOTE, e) for e in examples]
            rows.append(
                f"| {name} | {len(examples)} | {cell(results['local'], False)} | "
                f"{cell(remote_alone, False)} | {cell(results['cascade-previous'])} | "
                f"{cell(results['cascade-fixed'])} | "
                f"{cell(results['cascade'])} |"
            )
            print(rows[-1], flush=True)
    shipped = load_policy(bundled_dir("daemon") / "policies" / "cascade.toml")
    adjust = shipped.adjust
    assert adjust is not None
    reach = (1 + adjust.max_step) ** (args.limit // adjust.every)
    lines = [
        "## The shipped cascade on unseen work",
        "",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- Machine: {machine()}",
        f"- Command: `make bench` (`python bench/unseen.py --limit {args.limit}`); "
        f"{time.monotonic() - started:.0f} s",
        f"- Local tier {LOCAL} (Q4_1), remote {REMOTE} (Q4_K_M, a second clawd), greedy, "
        f"{MAX_TOKENS} tokens, each task on a fresh clawd. Anchor: the policy shipped before "
        f"(window entropy {PREVIOUS_THRESHOLD}, fitted on the local meter alone, no `[adjust]`). "
        "Cells: accuracy (share escalated over the task, and over its second half).",
        "",
        f"| task | n | local alone | remote alone | previous policy ({PREVIOUS_THRESHOLD}, "
        "anchor) | shipped threshold, no `[adjust]` | shipped cascade (`[adjust]` 20%) |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"- Reading: `[adjust]` holds a share of escalations, not accuracy. It moves a threshold "
        f"by at most {adjust.max_step:.0%} per {adjust.every} requests, so in {args.limit} "
        f"requests by at most {reach:.2f}x (and within {adjust.min_factor:g}x-"
        f"{adjust.max_factor:g}x of the written value). Whether escalating pays at all (it does "
        "not where the remote is the weaker tier, and holding a lower share costs accuracy where "
        "the local tier is never right) only the next tier's answers can say: the shipped "
        "`[audit]` collects them (2% of local answers) and `clawctl route calibrate "
        "--from-ledger` fits the policy on them.",
    ]
    write_section("unseen", "\n".join(lines))


if __name__ == "__main__":
    main()
