"""Learned routing benchmark: thresholds fitted by asking every tier (`route calibrate`, this
round) vs fitted on the local tier's meter alone (the previous calibration: the anchor), at the
same target share escalated, on labelled sets the thresholds were not fitted on.

SmolLM2-135M (Q4_1) is the local tier, Qwen2.5-Coder-0.5B (Q4_K_M) the next one, both served by
one clawd; each example is answered greedily by both, the local answer with its meter readings.
Per set the examples are split into two folds: thresholds are fitted on one and applied to the
other (and the other way round), so every number is on examples the fit never saw. Across sets,
a threshold fitted on one set is applied to the other: the "unseen work" case. Reported:
accuracy and the share escalated for the old and new fits, and never / always escalating.

Writes its section of bench/RESULTS.md (`make bench`; `--limit N` examples per set).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section
from cascade import EVAL, REMOTE, Answer, ask, start_clawd
from foundation import machine

from clawctl.config import load_paths
from clawctl.routing.calibrate import SignalReport, load_examples, report_tier, unsureness
from clawctl.routing.tradeoff import Target, fit_handover
from clawctl.store.models import ModelStore

SETS = ("which_is_heavier", "born_first")
LOCAL = "smollm2-135m"
TARGET = 0.3  # share escalated that both fits aim at


@dataclass(frozen=True)
class Fit:
    signal: str
    cut: float | None  # escalate answers whose unsureness is above it (None: never)


@dataclass(frozen=True)
class Outcome:
    accuracy: float
    share: float


def _best(local: list[Answer]) -> SignalReport | None:
    """The meter signal with the best AUROC on these answers. Only the signals the meter reads
    as they are: a fitted `score` or `probe` would need its model carried to the other fold."""
    report = report_tier("int4", LOCAL, [a.signals for a in local], [a.correct for a in local],
                         TARGET, None)  # fmt: skip
    plain = [
        s for s in report.signals
        if s.signal not in ("score", "probe") and s.auroc is not None and s.threshold is not None
    ]  # fmt: skip
    return max(plain, key=lambda s: s.auroc or 0.0) if plain else None


def fit_old(local: list[Answer]) -> Fit | None:
    """The previous calibration: the best signal's threshold for the target share, whatever
    the next tier would answer."""
    best = _best(local)
    if best is None or best.threshold is None:
        return None
    return Fit(best.signal, unsureness(best.signal, best.threshold))


def fit_new(local: list[Answer], remote: list[Answer]) -> Fit | None:
    """This round's: the handover fitted on what both tiers got right."""
    best = _best(local)
    if best is None:
        return None
    n = len(local)
    fitted = fit_handover(
        "int4", "remote", best.unsure(), [a.correct for a in local], [0.0] * n,
        [a.correct for a in remote], [1.0] * n, Target(remote_rate=TARGET),
    )  # fmt: skip
    return Fit(best.signal, fitted.cut)


def apply(fit: Fit | None, local: list[Answer], remote: list[Answer]) -> Outcome:
    right = escalated = 0
    for here, there in zip(local, remote, strict=True):
        send = (
            fit is not None
            and fit.cut is not None
            and (unsureness(fit.signal, here.signals.get(fit.signal)) > fit.cut)
        )
        escalated += send
        right += there.correct if send else here.correct
    return Outcome(right / len(local), escalated / len(local))


def _folds(n: int) -> tuple[list[int], list[int]]:
    return [i for i in range(n) if i % 2 == 0], [i for i in range(n) if i % 2]


def cross_fitted(local: list[Answer], remote: list[Answer]) -> dict[str, Outcome]:
    """Each fit made on one fold and applied to the other; outcomes averaged over both."""
    results: dict[str, list[Outcome]] = {"old": [], "new": []}
    a, b = _folds(len(local))
    for train, test in ((a, b), (b, a)):
        tl, tr = [local[i] for i in train], [remote[i] for i in train]
        sl, sr = [local[i] for i in test], [remote[i] for i in test]
        results["old"].append(apply(fit_old(tl), sl, sr))
        results["new"].append(apply(fit_new(tl, tr), sl, sr))
    return {
        name: Outcome(sum(o.accuracy for o in outs) / 2, sum(o.share for o in outs) / 2)
        for name, outs in results.items()
    }


def _cell(outcome: Outcome) -> str:
    return f"{outcome.accuracy:.0%} ({outcome.share:.0%})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--limit", type=int, default=120)
    args = parser.parse_args()
    store = ModelStore(load_paths())
    for name in (LOCAL, REMOTE):
        store.pull(name)
    started = time.perf_counter()
    answers: dict[str, tuple[list[Answer], list[Answer]]] = {}
    with contextlib.ExitStack() as stack:
        client = start_clawd(stack)
        for name in SETS:
            examples = load_examples(EVAL / f"{name}.jsonl", args.limit)
            local = [ask(client, LOCAL, e) for e in examples]
            remote = [ask(client, REMOTE, e) for e in examples]
            answers[name] = (local, remote)
    seconds = time.perf_counter() - started
    rows = []
    for name, (local, remote) in answers.items():
        got = cross_fitted(local, remote)
        never, always = (
            apply(None, local, remote),
            Outcome(sum(a.correct for a in remote) / len(remote), 1.0),
        )
        rows.append((f"{name} (2 folds)", never, always, got["old"], got["new"]))
    for fitted_on, applied_to in ((SETS[0], SETS[1]), (SETS[1], SETS[0])):
        (fl, fr), (al, ar) = answers[fitted_on], answers[applied_to]
        never = apply(None, al, ar)
        always = Outcome(sum(a.correct for a in ar) / len(ar), 1.0)
        old, new = apply(fit_old(fl), al, ar), apply(fit_new(fl, fr), al, ar)
        rows.append((f"fitted on {fitted_on}, used on {applied_to}", never, always, old, new))
    lines = [
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- Machine: {machine()}",
        f"- Command: `make bench` (`python bench/routing.py --limit {args.limit}`); "
        f"answers took {seconds:.0f} s",
        f"- Local tier {LOCAL} (Q4_1), next tier {REMOTE} (Q4_K_M), greedy, 32 tokens; both fits "
        f"aim at {TARGET:.0%} escalated. Anchor: the previous calibration (the local meter "
        "alone). Cells: accuracy (share escalated), on examples the fit did not see.",
        "",
        "| data | never escalate | always escalate | meter alone (anchor) | asking every tier "
        "| accuracy vs anchor |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, never, always, old, new in rows:
        ratio = new.accuracy / old.accuracy if old.accuracy else float("nan")
        lines.append(
            f"| {label} | {_cell(never)} | {_cell(always)} | {_cell(old)} | {_cell(new)} "
            f"| {ratio:.2f}x |"
        )
    lines += [
        "",
        "- Development data (../shared/eval), two small Y/N sets: read the differences as "
        "direction, not precision (one example is 1-2 points).",
        "- Where the next tier is not better (which_is_heavier: 49% vs 50% local), asking every "
        "tier stops escalating and spends no remote calls for the same accuracy; where it is "
        "better (born_first), both fits escalate about the target share. A fit only knows the "
        "work it saw: fitted on which_is_heavier it never escalates, which on born_first (where "
        "the remote is better) loses to the anchor, whose threshold happened to escalate 80% "
        "there. That is what `[audit]` and `calibrate --from-ledger` are for: fit on the traffic "
        "the policy serves.",
    ]
    write_section("routing", "## Learned routing: asking every tier vs the meter alone\n\n"
                  + "\n".join(lines))  # fmt: skip


if __name__ == "__main__":
    main()
