"""Learned routing benchmark: thresholds fitted by asking every tier (`route calibrate`, this
round) vs fitted on the local tier's meter alone (the previous calibration: the anchor), at the
same target share escalated, on labelled sets the thresholds were not fitted on; and the same
fit made from audit-sampled traffic alone (no labels), against the shipped policy as written.

SmolLM2-135M (Q4_1) is the local tier, Qwen2.5-Coder-0.5B (Q4_K_M) the next one, both served by
one clawd; each example is answered greedily by both, the local answer with its meter readings.
Per set the examples are split into two folds: thresholds are fitted on one and applied to the
other (and the other way round), so every number is on examples the fit never saw. Across sets,
a threshold fitted on one set is applied to the other: the "unseen work" case. Reported:
accuracy and the share escalated for the old and new fits, and never / always escalating.

The issue's rows (kept here rather than in bench/cascade.py, whose answers are the meter study's):
per labelled set (the development sets and the two unseen tasks of bench/unseen.py), the cascade
calibrated (a) from labels, (b) from audit-sampled traffic only, where the only label is whether
the local answer agrees with the next tier's (`routing.calibrate.agrees`, what `[audit]` records
and `calibrate --from-ledger` fits on), and (c) the shipped `cascade` policy's threshold as
written; a random router at the labelled fit's share; and how much of the labelled fit's gain
over the shipped threshold the audit-only fit recovers. The shipped threshold itself is the
same procedure's pick on the development sets pooled (printed as "pooled fit").

Writes its section of bench/RESULTS.md (`make bench`; `--limit N` examples per set).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section
from cascade import EVAL, REMOTE, Answer, ask, start_clawd
from foundation import machine
from unseen import arithmetic, geography

from clawctl.config import load_paths
from clawctl.resources import bundled_dir
from clawctl.routing.calibrate import (
    Example,
    SignalReport,
    agrees,
    as_example,
    load_examples,
    report_tier,
    unsureness,
)
from clawctl.routing.policy import load_policy
from clawctl.routing.tradeoff import Target, fit_handover
from clawctl.schemas.policy import EvalExample
from clawctl.store.models import ModelStore

SETS = ("which_is_heavier", "born_first")
UNSEEN = {"largest_country": geography, "two-digit arithmetic": arithmetic}
LOCAL = "smollm2-135m"
TARGET = 0.3  # share escalated that both fits aim at
SHIPPED_TARGET = 0.2  # the shipped policy's share (its [adjust] target)


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
    return max(plain, key=lambda s: s.auroc or 0.0) if plain else report.best


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


def fit_audit(local: list[Answer], remote: list[Answer]) -> Fit | None:
    """The same fit with no labels: a local answer counts as right where it agrees with the
    next tier's, and the next tier as always right (what audited traffic can tell)."""
    agreed = [agrees(here.text, there.text) for here, there in zip(local, remote, strict=True)]
    as_labelled = [dataclasses.replace(a, correct=ok) for a, ok in zip(local, agreed, strict=True)]
    sure = [dataclasses.replace(a, correct=True) for a in remote]
    return fit_new(as_labelled, sure)


def shipped() -> Fit:
    """The shipped `cascade` policy's local threshold as written (no online adjustment)."""
    policy = load_policy(bundled_dir("daemon") / "policies" / "cascade.toml")
    tier = next(t for t in policy.tiers if t.kind == "local")
    signal = next(s for s in ("window_entropy", "max_entropy") if getattr(tier.escalate, s))
    return Fit(signal, unsureness(signal, getattr(tier.escalate, signal)))


def pooled_fit(answers: dict[str, tuple[list[Answer], list[Answer]]]) -> Fit:
    """The shipped threshold's procedure: window entropy fitted by asking every tier on the
    development sets pooled, at the shipped share."""
    local = [a for name in SETS for a in answers[name][0]]
    remote = [a for name in SETS for a in answers[name][1]]
    n = len(local)
    unsure = [unsureness("window_entropy", a.signals.get("window_entropy")) for a in local]
    fitted = fit_handover(
        "int4", "remote", unsure, [a.correct for a in local], [0.0] * n,
        [a.correct for a in remote], [1.0] * n, Target(remote_rate=SHIPPED_TARGET),
    )  # fmt: skip
    return Fit("window_entropy", fitted.cut)


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
    results: dict[str, list[Outcome]] = {"old": [], "new": [], "audit": []}
    a, b = _folds(len(local))
    for train, test in ((a, b), (b, a)):
        tl, tr = [local[i] for i in train], [remote[i] for i in train]
        sl, sr = [local[i] for i in test], [remote[i] for i in test]
        results["old"].append(apply(fit_old(tl), sl, sr))
        results["new"].append(apply(fit_new(tl, tr), sl, sr))
        results["audit"].append(apply(fit_audit(tl, tr), sl, sr))
    return {
        name: Outcome(sum(o.accuracy for o in outs) / 2, sum(o.share for o in outs) / 2)
        for name, outs in results.items()
    }


def _cell(outcome: Outcome) -> str:
    return f"{outcome.accuracy:.0%} ({outcome.share:.0%})"


def _labelled(name: str, limit: int) -> list[Example]:
    """A development set from ../shared/eval, or one of the unseen tasks of bench/unseen.py."""
    if name in UNSEEN:
        return [as_example(EvalExample.model_validate(e)) for e in UNSEEN[name](limit)]
    return load_examples(EVAL / f"{name}.jsonl", limit)


def _random_at(share: float, local: list[Answer], remote: list[Answer]) -> float:
    """A random router's expected accuracy escalating `share` of the requests."""
    alone = sum(a.correct for a in local) / len(local)
    after = sum(a.correct for a in remote) / len(remote)
    return (1 - share) * alone + share * after


def _recovery(audit: float, labels: float, written: float) -> float | None:
    """The share of the labelled fit's gain over the shipped threshold the audit fit keeps."""
    gain = labels - written
    return None if gain <= 1e-9 else (audit - written) / gain


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
        for name in (*SETS, *UNSEEN):
            examples = _labelled(name, args.limit)
            local = [ask(client, LOCAL, e) for e in examples]
            remote = [ask(client, REMOTE, e) for e in examples]
            answers[name] = (local, remote)
            print(f"{name}: answered", flush=True)
    seconds = time.perf_counter() - started
    rows = []
    for name in SETS:
        local, remote = answers[name]
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
        "- Where the next tier is not better, asking every tier stops escalating and spends no "
        "remote calls for the same accuracy; where it is better (born_first), both fits escalate "
        "about the target share. A fit only knows the work it saw: fitted on one set and used on "
        "another it can be wrong either way. That is what `[audit]` and `calibrate --from-ledger` "
        "are for: fit on the traffic the policy serves (next table).",
    ]
    lines += _labels_vs_audit(answers)
    write_section("routing", "## Learned routing: asking every tier vs the meter alone\n\n"
                  + "\n".join(lines))  # fmt: skip


def _labels_vs_audit(answers: dict[str, tuple[list[Answer], list[Answer]]]) -> list[str]:
    """The issue's rows: labels, audited traffic only, the shipped threshold, per set."""
    written, pooled = shipped(), pooled_fit(answers)
    lines = [
        "",
        "### Calibrated from labels, from audited traffic only, and the shipped default",
        "",
        f"Per set, 2 folds as above, target {TARGET:.0%} escalated. Labels: the fit asks every "
        "tier and grades with the labels. Audit only: the same fit where the only label is "
        "whether the local answer agrees with the next tier's (what `[audit]` records; no labels "
        "used). Shipped: the `cascade` policy's threshold as written (`window_entropy` "
        f"{written.cut:g}), no online adjustment. "
        "Random: a router escalating at random at the labelled fit's share. Recovered: the "
        "audit fit's gain over the shipped threshold as a share of the labelled fit's.",
        "",
        "| set | local alone | remote alone | shipped | labels | random at that share | "
        "audit only | recovered | labels >= max(local, random) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    met_cascade = met_recovery = 0
    counted = 0
    for name, (local, remote) in answers.items():
        got = cross_fitted(local, remote)
        ship = apply(written, local, remote)
        alone = sum(a.correct for a in local) / len(local)
        after = sum(a.correct for a in remote) / len(remote)
        rand = _random_at(got["new"].share, local, remote)
        ok = got["new"].accuracy + 1e-9 >= max(alone, rand)
        met_cascade += ok
        recovered = _recovery(got["audit"].accuracy, got["new"].accuracy, ship.accuracy)
        if recovered is not None:
            counted += 1
            met_recovery += recovered >= 0.8
        kind = "" if name in SETS else " (unseen)"
        lines.append(
            f"| {name}{kind} | {alone:.0%} | {after:.0%} | {_cell(ship)} | {_cell(got['new'])} "
            f"| {rand:.0%} | {_cell(got['audit'])} | "
            f"{'-' if recovered is None else f'{recovered:.0%}'} | {'yes' if ok else 'no'} |"
        )
    lines += [
        "",
        f"- Pooled fit (the shipped threshold's procedure: window entropy, asking every tier on "
        f"the development sets pooled, {SHIPPED_TARGET:.0%} escalated): "
        + ("never escalate" if pooled.cut is None else f"window_entropy {pooled.cut:.3g}")
        + f"; shipped: {written.cut:g}.",
        f"- Targets: the labelled cascade at least as accurate as the better of local alone and "
        f"random at its share on every set: {met_cascade}/{len(answers)}; audit-only recovers "
        f">= 80% of the labelled gain: {met_recovery}/{counted} sets where labels gain over the "
        "shipped threshold (`-`: no gain to recover).",
    ]
    return lines


if __name__ == "__main__":
    main()
