"""Distillation benchmark. (a) Escalation distillation: a labelled set through the cascade, a
LoRA trained on the first half's escalations (what the remote tier answered), the second half
evaluated with and without it. (b) Context distillation: a ~1,850-token handbook into an adapter,
answered without the document against with it in the prompt.

SmolLM2-135M (Q4_1) is the local tier, Qwen2.5-Coder-0.5B (Q4_K_M, a second clawd on loopback)
the remote one. The policy is the shipped cascade's local threshold (window entropy 1.4) and
prices, with `store_prompts = true`. Per set: the first half goes through the policy (the ledger
keeps each escalation with the remote's answer), `clawctl distill train --policy` trains on
exactly those, and `clawctl distill evaluate --data` replays the second half through the policy
without and with the adapter (anchor: without), plus the shipped canary set on the local tier.

Writes its section of bench/RESULTS.md (`make bench`; `--sets`, `--limit`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section
from cascade import EVAL, MAX_TOKENS, REMOTE, Box, answer_graded, start_box
from foundation import BIN, machine

from clawctl.store.models import ModelStore

SETS = ("born_first", "which_is_heavier")
POLICY = "bench-distill"
TRAIN = ("--epochs", "4", "--lr", "1e-3", "--held-out", "0")


def policy_text(remote_url: str, token_file: Path) -> str:
    return f"""
name = "{POLICY}"
start = "local"
on_remote_failure = "degraded"
store_prompts = true

[[tiers]]
name = "local"
kind = "local"
model = "smollm2-135m"
[tiers.escalate]
window_entropy = 1.4

[[tiers]]
name = "remote"
kind = "remote"
base_url = "{remote_url}"
api_key_file = "{token_file}"
model = "{REMOTE}"
price_input = 0.15
price_output = 0.60
"""


def clawctl(box: Box, *args: str) -> Any:
    done = subprocess.run(
        [str(BIN / "clawctl"), *args, "--json"], env=box.env, capture_output=True, text=True,
        timeout=7200, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"clawctl {' '.join(args)} failed: {done.stderr.strip()}")
    return json.loads(done.stdout)


def run_set(box: Box, name: str, limit: int | None, work: Path) -> dict[str, Any]:
    lines = (EVAL / f"{name}.jsonl").read_text().splitlines()
    examples = [json.loads(line) for line in lines if line.strip()][:limit]
    half = len(examples) // 2
    train, test = examples[:half], examples[half:]
    started = time.time()
    escalated = sum(answer_graded(box, POLICY, e, "bench-distill")[1] for e in train)
    span = f"{int(time.time() - started) + 5}s"
    adapter = f"bd-{name.replace('_', '-')}"
    clock = time.monotonic()
    trained = clawctl(box, "distill", "train", "--base", "smollm2-135m", "--name", adapter,
                      "--policy", POLICY, "--since", span, *TRAIN)  # fmt: skip
    train_seconds = time.monotonic() - clock
    data = work / f"{name}-test.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in test))
    evaluation = clawctl(box, "distill", "evaluate", adapter, "--policy", POLICY,
                         "--data", str(data), "--max-tokens", str(MAX_TOKENS))  # fmt: skip
    return {
        "set": name, "train": len(train), "test": len(test), "escalated_train": escalated,
        "trained": trained, "train_seconds": train_seconds, "evaluation": evaluation,
    }  # fmt: skip


def target_met(result: dict[str, Any]) -> bool:
    """The issue's target: escalations down by at least 30% at no loss of accuracy, the canary
    within 2 points."""
    evaluation = result["evaluation"]
    n, c = evaluation["examples"], max(1, evaluation["canary"])
    before, after = evaluation["without"], evaluation["with_adapter"]
    drop = 1 - after["escalated"] / before["escalated"] if before["escalated"] else 0.0
    return (
        drop >= 0.3
        and after["correct"] >= before["correct"]
        and (after["canary_correct"] - before["canary_correct"]) / c >= -0.02
    ) and n > 0


def row(result: dict[str, Any]) -> str:
    evaluation, report = result["evaluation"], result["trained"]["report"]
    n, c = evaluation["examples"], max(1, evaluation["canary"])
    before, after = evaluation["without"], evaluation["with_adapter"]
    esc_before, esc_after = before["escalated"] / n, after["escalated"] / n
    drop = (esc_before - esc_after) / esc_before if esc_before else 0.0
    return (
        f"| {result['set']} | {result['train']} / {result['test']} | "
        f"{report['examples']} (+{report['replayed']}) | {result['train_seconds']:.0f} s | "
        f"{before['correct'] / n:.0%} → {after['correct'] / n:.0%} | "
        f"{esc_before:.0%} → {esc_after:.0%} ({drop:+.0%} fewer) | "
        f"{before['cost'] / n * 1000:.4f} → {after['cost'] / n * 1000:.4f} "
        f"({(after['cost'] / before['cost']) if before['cost'] else 0:.2f}x) | "
        f"{before['canary_correct'] / c:.0%} → {after['canary_correct'] / c:.0%} | "
        f"{'passes' if evaluation['verdict']['passed'] else 'fails'} |"
    )


DOCUMENT = Path(__file__).resolve().parent / "data" / "heron_handbook.md"


def run_context(box: Box) -> dict[str, Any]:
    """(b) A ~1,850-token handbook into an adapter, Qwen (the policy's remote tier) teaching."""
    clock = time.monotonic()
    result = clawctl(box, "distill", "context", str(DOCUMENT), "--base", "smollm2-135m",
                     "--name", "bd-handbook", "--policy", POLICY)  # fmt: skip
    return {"result": result, "seconds": time.monotonic() - clock}


def context_lines(context: dict[str, Any]) -> list[str]:
    result = context["result"]
    ev = result["evaluation"]
    n = max(1, ev["questions"])
    rows = [
        ("document in the prompt, no adapter (the anchor)", ev["with_document"]),
        ("adapter, no document", ev["with_adapter"]),
        ("neither", ev["neither"]),
    ]
    anchor = max(1, ev["with_document"]["agreed"])
    return [
        "",
        "### Context distillation: a handbook into an adapter",
        "",
        f"- Document: bench/data/heron_handbook.md (a fictional field-station handbook, "
        f"{ev['document_tokens']} tokens in the prompt). Teacher: {result['teacher']} "
        f"({REMOTE}) writes two questions about each of the document's {result['passages']} "
        f"passages ({result['questions_written'] // 2} got two distinct ones) and answers them "
        "with the "
        "document in its prompt; the adapter (4 epochs, lr 1e-3) learns the first question of "
        "each passage without the document, the second ones are held out. "
        f"{result['questions_written']} questions written; {context['seconds']:.0f} s in all.",
        "- Cells: held-out questions whose SmolLM2 answer agrees with the teacher's "
        "(routing.calibrate.agrees), and prompt tokens per request.",
        "",
        "| SmolLM2 answers with | agreement | vs anchor | prompt tokens / request |",
        "|---|---:|---:|---:|",
        *(
            f"| {label} | {arm['agreed'] / n:.0%} ({arm['agreed']}/{n}) | "
            f"{arm['agreed'] / anchor:.2f}x | {arm['prompt_tokens'] / n:.0f} |"
            for label, arm in rows
        ),
        "",
        f"- The adapter saves {ev['saved_per_request']:.0f} prompt tokens a request. "
        f"{n} held-out questions, graded by agreement with a 0.5B teacher's answers, not by "
        "labels: read the differences as direction, not precision (one question is "
        f"{100 / n:.0f} points).",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sets", nargs="+", default=list(SETS))
    parser.add_argument("--limit", type=int, default=None, help="Examples per set.")
    args = parser.parse_args()
    from clawctl.config import load_paths
    from tests.conftest import free_port

    store = ModelStore(load_paths())
    for model in ("smollm2-135m", REMOTE):
        store.pull(model)
    results = []
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="claw-distill-")))
        port = free_port()
        start_box(stack, tcp_port=port)  # the remote tier: Qwen on loopback
        box = start_box(stack)
        token = work / "token"
        token.write_text("bench")
        policy = work / "policy.toml"
        policy.write_text(policy_text(f"http://127.0.0.1:{port}/v1", token))
        subprocess.run([str(BIN / "clawctl"), "route", "apply", str(policy)], env=box.env,
                       check=True, capture_output=True)  # fmt: skip
        for name in args.sets:
            results.append(run_set(box, name, args.limit, work))
            print(row(results[-1]), flush=True)
        context = run_context(box)
        print("\n".join(context_lines(context)), flush=True)
    command = "python bench/distill.py" + (f" --limit {args.limit}" if args.limit else "")
    lines = [
        "## Escalation distillation: a LoRA trained on the box from its own escalations",
        "",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- Machine: {machine()}",
        f"- Command: `make bench` (`{command}`)",
        "- Cascade: smollm2-135m (Q4_1) local, window entropy 1.4 (the shipped threshold), "
        f"{REMOTE} (Q4_K_M, a second clawd) remote at the shipped prices; greedy, "
        f"{MAX_TOKENS} tokens. Per set the first half goes through the cascade, the LoRA "
        "(rank 8 on q/k/v/o, 4 epochs, lr 1e-3, a quarter of base-model replay) learns what "
        "the remote answered to the escalated ones, and the second half is replayed without "
        "(the anchor) and with it. Canary: the 30 shipped general questions on the local tier.",
        "",
        "| set | train / test | learned from | training | accuracy | escalated | "
        "cost per 1,000 | canary | default gate |",
        "|---|---|---|---:|---|---|---|---|---|",
        *(row(r) for r in results),
        "",
        "- Target (escalations down >= 30% at no loss of accuracy, canary within 2 points, on at "
        "least one set): "
        + ", ".join(f"{r['set']} {'met' if target_met(r) else 'missed'}" for r in results)
        + ". The default gate (escalations down, accuracy not down, canary within 2 points) "
        "decides promotion the same way.",
        *context_lines(context),
    ]
    write_section("distill", "\n".join(lines))


if __name__ == "__main__":
    main()
