"""Cascade benchmark: SmolLM2-135M locally (INT4 = Q4_1 and INT2 = Q2_0) with Qwen2.5-Coder-0.5B
as the "remote" tier, served by a second clawd on 127.0.0.1, on the labelled sets in
../shared/eval/ (development data).

Per set and local tier: local-only and remote-only accuracy, the oracle escalation rate (exactly
the local errors), each meter signal's AUROC for predicting a wrong local answer, and accuracy
against the share of remote calls for the cascade (escalating the least sure answers by the best
signal), a random router and the oracle, summarised as APGR and CPT(50%) (RouteLLM's metrics);
tokens and cost at the shipped prices; and the entropy meter's decode overhead, in-process.

Two oracles. The *oracle* is the issue's: it escalates exactly the local errors and knows nothing
about the remote's answers, so below the error rate which errors it sends is a uniform draw (its
accuracy is the expected value). The *best case* also knows where the remote is right and sends
those errors first; no router that sees only the local generation can reach it, and it is shown
for scale. "Recovered" is the cascade's gain over local-only as a share of the oracle's.
Answers are graded leniently and the same way for every tier (clawctl.routing.calibrate.grade).
AUROCs are over all examples of a set; the cascade curve is cross-fitted: examples are split into
two folds and each fold is escalated by the signal chosen (best AUROC) on the other fold.

Writes its section of bench/RESULTS.md. Run with `make bench` (or `--limit N` per set).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from platformdirs import user_cache_path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _results import write_section
from foundation import BIN, connects, machine, wait_for

from clawctl.config import load_paths
from clawctl.fsutil import atomic_write
from clawctl.routing.calibrate import (
    PROBE_TOKENS,
    Example,
    auroc,
    fit_probe,
    fit_score,
    grade,
    load_examples,
    read_probe,
    unsureness,
)
from clawctl.schemas.signals import SIGNALS, Signals
from clawctl.store.models import ModelStore

EVAL = Path(__file__).resolve().parents[2] / "shared" / "eval"
SETS = ("which_is_heavier", "born_first", "binary_operations_300")
LOCAL = {"int4": "smollm2-135m", "int2": "smollm2-135m-q2_0"}
REMOTE = "qwen2.5-coder-0.5b"
PRICE_IN, PRICE_OUT = 0.15, 0.60  # the shipped policy's remote prices per 1M tokens
MAX_TOKENS = 32
RATES = [i / 20 for i in range(21)]
# Every answer of the last run, so the analysis can be redone (`--reuse`) without asking again.
ANSWERS = user_cache_path("clawctl") / "bench" / "cascade-answers.json"


@dataclass
class Answer:
    text: str
    correct: bool
    signals: dict[str, float | None]
    prompt_tokens: int
    completion_tokens: int
    first_top: list[tuple[int, float]] = field(default_factory=list)  # for the probe


def ensure_models() -> None:
    from clawctl.build.quantize_gguf import quantize_model

    store = ModelStore(load_paths())
    for name in ("smollm2-135m", REMOTE):
        store.pull(name)
    installed = {m.name for m in store.installed()}
    if LOCAL["int2"] not in installed:
        quantize_model(store, "smollm2-135m", "q2_0", new_name=LOCAL["int2"])


@dataclass(frozen=True)
class Box:
    """A clawd the benchmark started: a client for its API and the environment in which
    `clawctl` reaches it (its CLAW_HOME and socket)."""

    client: httpx.Client
    env: dict[str, str]


def start_box(stack: contextlib.ExitStack, tcp_port: int | None = None, **extra_env: str) -> Box:
    base = Path(tempfile.mkdtemp(prefix="claw-cascade-", dir="/tmp"))
    stack.callback(shutil.rmtree, base, True)
    source = load_paths().models_dir
    shutil.copytree(source, base / "home" / "data" / "models", copy_function=os.link)
    sock = base / "c.sock"
    env = dict(os.environ, CLAW_HOME=str(base / "home"), CLAW_SOCKET=str(sock))
    env["CLAW_PROFILE"] = "x86-small"
    env.update(extra_env)
    if tcp_port is not None:
        (base / "token").write_text("bench")
        config = base / "clawd.toml"
        config.write_text(
            f'[tcp]\nlisten = "127.0.0.1:{tcp_port}"\ntoken_file = "{base / "token"}"\n'
        )
        env["CLAW_CONFIG"] = str(config)
    proc = subprocess.Popen(
        [str(BIN / "clawd")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    stack.callback(lambda: (proc.terminate(), proc.wait(30)))
    wait_for(lambda: connects(sock))
    if tcp_port is not None:
        client = httpx.Client(
            base_url=f"http://127.0.0.1:{tcp_port}",
            headers={"Authorization": "Bearer bench"},
            timeout=600,
        )
    else:
        client = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://clawd", timeout=600
        )
    return Box(stack.enter_context(client), env)


def answer_graded(box: Box, model: str, example: dict[str, Any], app: str) -> tuple[bool, bool]:
    """(right, escalated) for one Evals line asked greedily of `model` (a model or a policy),
    with no answer cache."""
    response = box.client.post(
        "/v1/chat/completions",
        json={
            "model": model, "messages": example["input"], "max_tokens": MAX_TOKENS,
            "temperature": 0, "claw": {"cache": False, "app": app},
        },
    )  # fmt: skip
    response.raise_for_status()
    body = response.json()
    text = body["choices"][0]["message"]["content"] or ""
    return grade(text, example["ideal"]), bool(body["claw"].get("escalated"))


def start_clawd(stack: contextlib.ExitStack, tcp_port: int | None = None) -> httpx.Client:
    return start_box(stack, tcp_port).client


def ask(client: httpx.Client, model: str, example: Example) -> Answer:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": r, "content": c} for r, c in example.messages],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "claw": {"app": "bench-cascade", "meter": {"first_top": PROBE_TOKENS}},
    }
    response = client.post("/v1/chat/completions", json=body)
    response.raise_for_status()
    data = response.json()
    entropy = data["claw"].get("entropy")
    text = data["choices"][0]["message"]["content"]
    return Answer(
        text=text,
        correct=grade(text, example.ideal),
        signals=Signals.model_validate(entropy).features() if entropy else {},
        prompt_tokens=data["usage"]["prompt_tokens"],
        completion_tokens=data["usage"]["completion_tokens"],
        first_top=[(t, lp) for t, lp in (entropy or {}).get("first_top") or []],
    )


def ranking(local: list[Answer], train: list[int], ranked: list[int]) -> tuple[str, list[int]]:
    """Choose the signal with the best AUROC on `train` (for `score` and `probe`: out-of-fold,
    and fit on `train`), and rank `ranked` least-sure-first by it."""
    wrong = [not local[i].correct for i in train]
    scored: dict[str, float] = {}
    score = fit_score([local[i].signals for i in train], wrong)
    probe = fit_probe([local[i].first_top for i in train], wrong)
    for s in SIGNALS:
        fitted = {"score": score, "probe": probe}.get(s)
        if s in ("score", "probe"):
            if fitted is not None and fitted[2] is not None:
                scored[s] = fitted[2]
            continue
        area = auroc([unsureness(s, local[i].signals.get(s)) for i in train], wrong)
        if area is not None:
            scored[s] = area
    best = max(scored, key=lambda s: scored[s]) if scored else SIGNALS[0]
    if best == "score" and score is not None:
        value = {i: score[0].probability(local[i].signals) for i in ranked}
    elif best == "probe" and probe is not None:
        readings = read_probe(probe[0], [local[i].first_top for i in ranked])
        value = dict(zip(ranked, readings, strict=True))
    else:
        value = {i: unsureness(best, local[i].signals.get(best)) for i in ranked}
    return best, sorted(ranked, key=lambda i: value[i], reverse=True)


def cross_fitted(local: list[Answer]) -> tuple[list[list[int]], list[str]]:
    """Two folds (even and odd examples); each is ranked least-sure-first by the signal chosen
    (and, for `score`, fit) on the *other* fold, so the cascade's numbers are not in-sample."""
    folds = [list(range(0, len(local), 2)), list(range(1, len(local), 2))]
    first = ranking(local, folds[1], folds[0])
    second = ranking(local, folds[0], folds[1])
    return [first[1], second[1]], [first[0], second[0]]


def accuracy_at(
    orders: list[list[int]], local: list[Answer], remote: list[Answer], rate: float
) -> float:
    escalated = {i for order in orders for i in order[: round(rate * len(order))]}
    right = sum((remote[i] if i in escalated else local[i]).correct for i in range(len(local)))
    return right / len(local)


def top_answer(answers: list[Answer]) -> tuple[str, float]:
    """The most common first line among `answers` and its share: a model that gives one answer to
    most questions is right exactly when the label is that answer, which its own token
    distributions cannot tell (so no meter signal can either)."""
    lines = collections.Counter(a.text.strip().split("\n", 1)[0][:16] for a in answers)
    text, count = lines.most_common(1)[0]
    return text, count / len(answers)


def local_error_oracle(local: list[Answer], remote: list[Answer], rate: float) -> float:
    """Expected accuracy of the issue's oracle escalator at `rate`: it escalates the local errors
    first (a uniform draw among them, as it does not know the remote's answers), then, past the
    error rate, local-right answers (again a uniform draw)."""
    n = len(local)
    wrong = [i for i in range(n) if not local[i].correct]
    right = [i for i in range(n) if local[i].correct]
    budget = round(rate * n)
    if budget <= len(wrong):
        fixed = budget * statistics.mean(remote[i].correct for i in wrong) if wrong else 0.0
        return (len(right) + fixed) / n
    lost = (budget - len(wrong)) * statistics.mean(not remote[i].correct for i in right)
    return (sum(remote[i].correct for i in wrong) + len(right) - lost) / n


def analyse(local: list[Answer], remote: list[Answer]) -> dict[str, Any]:
    n = len(local)
    local_acc = sum(a.correct for a in local) / n
    remote_acc = sum(a.correct for a in remote) / n
    wrong = [not a.correct for a in local]
    areas = {
        s: auroc([unsureness(s, a.signals.get(s)) for a in local], wrong)
        for s in SIGNALS
        if s not in ("score", "probe")
    }
    fitted = fit_score([a.signals for a in local], wrong)
    areas["score"] = fitted[2] if fitted else None  # out-of-fold
    probed = fit_probe([a.first_top for a in local], wrong)
    areas["probe"] = probed[2] if probed else None  # out-of-fold
    orders, chosen = cross_fitted(local)
    best_case = [sorted(range(n), key=lambda i: (local[i].correct, not remote[i].correct))]
    gap = remote_acc - local_acc
    cascade = [accuracy_at(orders, local, remote, r) for r in RATES]
    oracle_curve = [local_error_oracle(local, remote, r) for r in RATES]
    random_curve = [local_acc + r * gap for r in RATES]
    apgr = statistics.mean((c - local_acc) / gap for c in cascade) if gap > 0 else None
    reached = [r for r, c in zip(RATES, cascade, strict=True) if c - local_acc >= gap / 2]
    cpt50 = reached[0] if gap > 0 and reached else None
    half = RATES.index(0.5)
    oracle_gain = oracle_curve[half] - local_acc
    # Only meaningful where the remote tier is better than the local one at all.
    recovered = (cascade[half] - local_acc) / oracle_gain if gap > 0 and oracle_gain > 0 else None
    # tokens and cost at a 50% remote rate vs all-remote
    escalated = {i for order in orders for i in order[: round(0.5 * len(order))]}

    def price(a: Answer) -> float:
        return (a.prompt_tokens * PRICE_IN + a.completion_tokens * PRICE_OUT) / 1e6

    return {
        "n": n,
        "local": local_acc,
        "remote": remote_acc,
        "oracle_rate": sum(wrong) / n,
        "auroc": areas,
        "best": "/".join(dict.fromkeys(chosen)),
        "cascade50": cascade[half],
        "random50": random_curve[half],
        "oracle50": oracle_curve[half],
        "best50": accuracy_at(best_case, local, remote, 0.5),
        "recovered50": recovered,
        "apgr": apgr,
        "cpt50": cpt50,
        "cost50": sum(price(remote[i]) for i in escalated),
        "cost_all_remote": sum(price(a) for a in remote),
        "local_tokens": sum(a.prompt_tokens + a.completion_tokens for a in local),
        "top_answer": top_answer(local),
    }


def probe_transfer(answers: dict[str, list[Answer]], tier: str) -> dict[tuple[str, str], float]:
    """AUROC of a probe fit on all of one set and read on another: how task-specific it is."""
    areas: dict[tuple[str, str], float] = {}
    for source in SETS:
        local = answers[f"{source}/{tier}"]
        probed = fit_probe([a.first_top for a in local], [not a.correct for a in local])
        if probed is None:
            continue
        for target in SETS:
            if target == source:
                continue
            other = answers[f"{target}/{tier}"]
            readings = read_probe(probed[0], [a.first_top for a in other])
            area = auroc(readings, [not a.correct for a in other])
            if area is not None:
                areas[(source, target)] = area
    return areas


def meter_overhead(runs: int) -> tuple[float, float]:
    """Decode tok/s with the meter off and on, in-process, alternating; medians."""
    from clawctl.engines.base import ChatTurn, EngineSettings, Prompt, SamplingParams, generate
    from clawctl.engines.llama.engine import LlamaEngine
    from clawctl.engines.meter import LogitProbe, Thresholds

    # "on" is everything the meter does: per-token signals, and on the first token a probe of
    # PROBE_TOKENS tokens and the top list calibration asks for.
    probe = LogitProbe(tuple(range(PROBE_TOKENS)), (0.0,) * PROBE_TOKENS, 0.0, PROBE_TOKENS)
    metered = Thresholds(probe_model=probe, first_top=PROBE_TOKENS)
    store = ModelStore(load_paths())
    engine = LlamaEngine(EngineSettings(store.model_file("smollm2-135m"), 2048, 512, 2))
    prompt = engine.prepare(Prompt(chat=(ChatTurn("user", "Write a long story about a cat."),)))
    speeds: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(runs):
        for on in (False, True):
            events = list(
                generate(
                    engine,
                    prompt,
                    SamplingParams(max_tokens=200, temperature=0),
                    lambda: False,
                    metered if on else None,
                )
            )
            done = events[-1]
            speeds[on].append(done.completion_tokens / done.decode_seconds)  # type: ignore[union-attr]
    engine.close()
    return statistics.median(speeds[False]), statistics.median(speeds[True])


def ask_all(limit: int, remote: dict[str, list[Answer]] | None) -> dict[str, list[Answer]]:
    """Every example of every set from the remote and each local tier, keyed `set/tier`; the
    remote's answers are taken from `remote` when given (greedy: they would be the same)."""
    answers: dict[str, list[Answer]] = {}
    with contextlib.ExitStack() as stack:
        local_client = start_clawd(stack)
        from tests.conftest import free_port

        remote_client = None if remote else start_clawd(stack, tcp_port=free_port())
        for name in SETS:
            examples = load_examples(EVAL / f"{name}.jsonl", limit)
            if remote_client is None:
                answers[f"{name}/remote"] = remote[f"{name}/remote"]  # type: ignore[index]
            else:
                answers[f"{name}/remote"] = [ask(remote_client, REMOTE, e) for e in examples]
            for tier, model in LOCAL.items():
                answers[f"{name}/{tier}"] = [ask(local_client, model, e) for e in examples]
    return answers


def fmt(value: float | None, pattern: str = "{:.3f}") -> str:
    return "-" if value is None else pattern.format(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=300, help="examples per set (300: all)")
    parser.add_argument("--runs", type=int, default=5, help="meter overhead runs")
    parser.add_argument(
        "--reuse", action="store_true", help=f"analyse the answers saved in {ANSWERS} again"
    )
    parser.add_argument(
        "--keep-remote",
        action="store_true",
        help="ask the local tiers again but take the remote's answers from the saved run",
    )
    args = parser.parse_args()
    started = time.time()
    saved: dict[str, Any] = {}
    if args.reuse or args.keep_remote:
        if not ANSWERS.exists():
            parser.error(f"no saved answers at {ANSWERS}: run once without --reuse/--keep-remote")
        saved = json.loads(ANSWERS.read_text())
        if args.keep_remote and saved["limit"] != args.limit:
            parser.error(f"the saved run used --limit {saved['limit']}, not {args.limit}")
    if args.reuse:
        answers = {key: [Answer(**a) for a in rows] for key, rows in saved["answers"].items()}
        off, on, args.limit, args.runs = saved["off"], saved["on"], saved["limit"], saved["runs"]
        elapsed = saved["seconds"]
    else:
        ensure_models()
        off, on = meter_overhead(args.runs)
        remote = None
        if args.keep_remote:
            remote = {
                key: [Answer(**a) for a in rows]
                for key, rows in saved["answers"].items()
                if key.endswith("/remote")
            }
        answers = ask_all(args.limit, remote)
        elapsed = time.time() - started
        ANSWERS.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(
            ANSWERS,
            json.dumps(
                {
                    "limit": args.limit,
                    "runs": args.runs,
                    "off": off,
                    "on": on,
                    "seconds": elapsed,
                    "remote_kept": bool(args.keep_remote) or saved.get("remote_kept", False),
                    "answers": {k: [asdict(a) for a in v] for k, v in answers.items()},
                }
            ).encode(),
        )
    results: dict[tuple[str, str], dict[str, Any]] = {}
    for name in SETS:
        for tier in LOCAL:
            r = analyse(answers[f"{name}/{tier}"], answers[f"{name}/remote"])
            results[(name, tier)] = r
            print(name, tier, {k: r[k] for k in ("local", "remote", "best", "recovered50")})
    counts = {name: results[(name, "int4")]["n"] for name in SETS}
    transfer = probe_transfer(answers, "int4")
    kept = saved.get("remote_kept", False) if args.reuse else args.keep_remote
    command = f"python bench/cascade.py --limit {args.limit}" + (" --keep-remote" if kept else "")
    lines = [
        "## Cascade routing (issue 7)",
        "",
        f"Machine: {machine()}. Command: `{command}` "
        f"(examples: {', '.join(f'{n} {counts[n]}' for n in SETS)}; greedy, {MAX_TOKENS} tokens; "
        f"{elapsed:.0f} s"
        + (
            "; local tiers asked again, the remote's greedy answers kept from the run before"
            if kept
            else ""
        )
        + f"). Remote tier: {REMOTE} (Q4_K_M) in a second clawd on "
        "127.0.0.1 over TCP. Development data; the cascade is cross-fitted over two folds "
        "(see the docstring); `signal` is the one each fold's escalation used. The oracle "
        "escalates exactly the local errors without knowing the remote's answers (the issue's "
        "definition; expected value of its uniform pick); the best case also knows where the "
        "remote is right and is shown for scale only.",
        "",
        "| set | local tier | local acc | remote acc | oracle rate | AUROC "
        + " / ".join(SIGNALS)
        + " | signal | acc @50% cascade / random / oracle / best case | recovered @50% "
        "| APGR | CPT(50%) | cost @50% / all-remote | top local answer |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (name, tier), r in results.items():
        a, top = r["auroc"], r["top_answer"]
        lines.append(
            f"| {name} | {tier} | {r['local']:.2f} | {r['remote']:.2f} | {r['oracle_rate']:.2f} "
            f"| {' / '.join(fmt(a[s], '{:.2f}') for s in SIGNALS)} | {r['best']} "
            f"| {r['cascade50']:.2f} / {r['random50']:.2f} / {r['oracle50']:.2f} "
            f"/ {r['best50']:.2f} "
            f"| {fmt(r['recovered50'], '{:.0%}')} | {fmt(r['apgr'], '{:.2f}')} "
            f"| {fmt(r['cpt50'], '{:.0%}')} | ${r['cost50']:.6f} / ${r['cost_all_remote']:.6f} "
            f"| `{ascii(top[0]).replace('|', '/')}` {top[1]:.0%} |"
        )
    lines += [
        "",
        f"Entropy meter overhead (in-process SmolLM2 Q4_1, 200 tokens, median of {args.runs}): "
        f"{off:.1f} tok/s off, {on:.1f} tok/s on = {on / off:.3f}x "
        f"({(1 - on / off) * 100:.1f}% overhead; target <= 3%).",
        "",
        "Targets: AUROC >= 0.75 where local and remote accuracy differ; at a 50% remote rate the "
        "cascade recovers >= 80% of the oracle's gain. Rows where AUROC or recovery fall short "
        "are misses, reported as measured.",
        "",
        "Reading the table: an AUROC is `-` where the local tier is never right (nothing to "
        "predict: every answer should escalate). Where one local answer dominates (`top local "
        "answer`), the tier is right exactly when the label is that answer; how peaked its "
        "distribution is (entropy, margins, `score`) does not show that, but the rest of the "
        "first token's distribution can (`probe`: a logistic model over the first token's "
        f"log-probabilities at {PROBE_TOKENS} token ids, fitted by `clawctl route calibrate`; "
        "AUROC out-of-fold, and the cascade's probe is fit on the other fold only). Where "
        "the local tier is almost never right, the oracle is no better than the random router "
        "(neither knows where the remote is right), and recovery above 100% is noise. The best "
        "case shows what knowing the remote's answers too would add.",
        "",
        "A probe learns the model *and* the task of its calibration data. Fit on all of one set "
        "and read on another (int4), its AUROC is: "
        + "; ".join(f"{a} -> {b} {v:.2f}" for (a, b), v in transfer.items())
        + ". So a deployment calibrates on its own labelled traffic, per model and quant, as "
        "`clawctl route calibrate` does; a probe is not a general-purpose uncertainty measure.",
    ]
    write_section("cascade", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
