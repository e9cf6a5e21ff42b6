"""`clawctl route`: check, install, inspect, explain and calibrate routing policies."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer

from clawctl.cli._console import emit_json, err, out, table
from clawctl.cli._options import JsonOption

if TYPE_CHECKING:
    from clawctl.client import ClawClient
    from clawctl.routing.calibrate import Example, SignalReport, TierReport
    from clawctl.routing.policy import Policy, Tier
    from clawctl.routing.policy_store import PolicyStore

app = typer.Typer(
    help="Routing policies: which tier answers, when to escalate, what it costs.",
    no_args_is_help=True,
)
PolicyName = Annotated[str, typer.Option("--policy", help="Policy name.")]


def _store() -> PolicyStore:
    from clawctl.config import load_paths
    from clawctl.routing.policy_store import PolicyStore

    return PolicyStore(load_paths())


@app.command()
def validate(file: Annotated[Path, typer.Argument(help="Policy TOML file.")]) -> None:
    """Check a policy file; errors name the line.

    Example: clawctl route validate my-policy.toml
    """
    from clawctl.routing.policy import load_policy

    policy = load_policy(file)
    err.print(f"{file}: policy {policy.name!r} is valid ({len(policy.tiers)} tiers)")


@app.command()
def apply(file: Annotated[Path, typer.Argument(help="Policy TOML file.")]) -> None:
    """Validate a policy and install it under its name; clawd uses it from the next request.

    Example: clawctl route apply my-policy.toml
    """
    installed = _store().apply(file)
    err.print(f"applied policy {installed.policy.name!r} → {installed.path}")


@app.command("list")
def list_(json_: JsonOption = False) -> None:
    """Installed and shipped policies."""
    store = _store()
    found = [(name, store.get(name)) for name in store.names()]
    if json_:
        emit_json({name: {"path": str(f.path), "shipped": f.shipped} for name, f in found})
        return
    grid = table("NAME", "TIERS", "SOURCE")
    for name, f in found:
        tiers = " > ".join(t.name for t in f.policy.tiers)
        grid.add_row(name, tiers, "shipped" if f.shipped else str(f.path))
    out.print(grid)


@app.command()
def show(
    name: Annotated[str, typer.Argument(help="Policy name.")] = "cascade",
    json_: JsonOption = False,
) -> None:
    """A policy's tiers, thresholds, prices and rules.

    Example: clawctl route show cascade
    """
    found = _store().get(name)
    policy = found.policy
    if json_:
        emit_json(policy)
        return
    out.print(f"[bold]{policy.name}[/bold]  {policy.description}  ({found.path})")
    out.print(f"start: {policy.start}   remote failure → {policy.on_remote_failure}")
    grid = table("TIER", "KIND", "MODEL", "ESCALATE WHEN", "PRICE IN/OUT per 1M")
    for tier in policy.tiers:
        grid.add_row(
            tier.name,
            tier.kind,
            tier.model,
            _thresholds_text(policy, tier.name),
            f"{tier.price_input:g} / {tier.price_output:g}",
        )
    out.print(grid)
    if policy.rules:
        rules = table("RULE", "WHEN", "THEN")
        for rule in policy.rules:
            when = rule.model_dump(
                include={
                    "impact",
                    "json_mode",
                    "app",
                    "uid",
                    "prompt_regex",
                    "min_prompt_chars",
                    "max_prompt_chars",
                    "min_max_tokens",
                },
                exclude_none=True,
            )
            then = rule.model_dump(
                include={"start", "temperature", "max_temperature", "adapters"}, exclude_none=True
            )
            if not rule.escalate:
                then["escalate"] = False
            rules.add_row(rule.name, _pairs(when), _pairs(then))
        out.print(rules)


def _pairs(values: dict[str, object]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "always"


def _thresholds_text(policy: Policy, tier_name: str) -> str:
    from clawctl.engines.meter import LOW_IS_UNSURE, SIGNALS

    tier = policy.tier(tier_name)
    if tier.kind == "remote":
        return "-"
    parts = []
    for signal in SIGNALS:
        value = getattr(tier.escalate, signal)
        if value is not None:
            parts.append(f"{signal} {'<' if signal in LOW_IS_UNSURE else '>'} {value:g}")
    return " or ".join(parts) or "never"


@app.command()
def explain(
    prompt: Annotated[str, typer.Argument(help="The prompt to route.")],
    policy: Annotated[str, typer.Option(help="Policy name.")] = "cascade",
    impact: Annotated[Literal["low", "normal", "critical"], typer.Option()] = "normal",
    app_name: Annotated[str | None, typer.Option("--app", help="Calling app.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="The request's max_tokens.")] = None,
    json_mode: Annotated[bool, typer.Option("--json-mode", help="JSON output requested.")] = False,
    json_: JsonOption = False,
) -> None:
    """Which rule and tiers a request would get, without running it.

    Example: clawctl route explain "Is 2 > 1?" --impact low
    """
    from clawctl.routing.policy import RouteInput, route

    found = _store().get(policy)
    decision = route(
        found.policy,
        RouteInput(
            prompt=prompt, impact=impact, json_mode=json_mode, max_tokens=max_tokens, app=app_name
        ),
    )
    chain = [t.name for t in decision.tiers]
    if json_:
        emit_json(
            {
                "policy": decision.policy,
                "rule": decision.rule,
                "tiers": chain,
                "escalate": decision.escalate,
                "temperature": decision.temperature,
                "max_temperature": decision.max_temperature,
            }
        )
        return
    out.print(f"policy {decision.policy}: rule {decision.rule or '(none: default start)'}")
    out.print(f"tiers: {' > '.join(chain)}" + ("" if decision.escalate else " (no escalation)"))
    for tier in decision.tiers:
        out.print(f"  {tier.name}: escalate when {_thresholds_text(found.policy, tier.name)}")
    if decision.temperature is not None:
        out.print(f"temperature set to {decision.temperature:g}")
    if decision.max_temperature is not None:
        out.print(f"temperature capped at {decision.max_temperature:g}")


@app.command()
def calibrate(
    data: Annotated[Path, typer.Option(help="Labelled examples (OpenAI Evals JSONL).")],
    policy: PolicyName = "cascade",
    target_remote_rate: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, help="Share of requests to escalate.")
    ] = None,
    target_error_rate: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, help="Highest local error rate to keep.")
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Use the first N examples.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens per local answer.")] = 32,
    dry_run: Annotated[bool, typer.Option(help="Report only; do not write the policy.")] = False,
    json_: JsonOption = False,
) -> None:
    """Run the policy's local tiers on labelled examples through clawd, report each signal's
    AUROC for predicting a wrong local answer, and write thresholds into the policy.

    Example: clawctl route calibrate --data born_first.jsonl --target-remote-rate 0.3
    """
    from clawctl.cli._client import daemon_client
    from clawctl.errors import BadInput
    from clawctl.routing.calibrate import load_examples, with_thresholds

    if (target_remote_rate is None) == (target_error_rate is None):
        raise BadInput("give exactly one of --target-remote-rate and --target-error-rate")
    store = _store()
    found = store.get(policy)
    examples = load_examples(data, limit)
    reports = []
    with daemon_client() as client:
        installed = {m.id for m in client.models().data}
        for tier in found.policy.tiers:
            if tier.kind != "local":
                continue
            if tier.model not in installed:
                err.print(f"[yellow]skipping tier {tier.name}: {tier.model} is not installed")
                continue
            reports.append(
                _calibrate_tier(
                    client, tier, examples, max_tokens, target_remote_rate, target_error_rate
                )
            )
    if not reports:
        raise BadInput(f"policy {policy}: none of its local tiers' models is installed")
    chosen: dict[str, SignalReport] = {}
    for report in reports:
        best = report.best
        if best is not None:
            chosen[report.tier] = best
    if not dry_run and chosen:
        text = with_thresholds(found.path.read_text(encoding="utf-8"), chosen)
        written = store.write(found, text)
        err.print(f"wrote thresholds into {written.path}")
    if json_:
        emit_json(
            {
                "tiers": [_report_json(r) for r in reports],
                "chosen": {k: v.signal for k, v in chosen.items()},
            }
        )
        return
    _render_reports(reports, chosen)


def _calibrate_tier(
    client: ClawClient,
    tier: Tier,
    examples: list[Example],
    max_tokens: int,
    rate: float | None,
    error: float | None,
) -> TierReport:
    from rich.progress import Progress

    from clawctl.routing.calibrate import PROBE_TOKENS, FirstTop, grade, report_tier

    observed: list[dict[str, float | None]] = []
    first_tops: list[FirstTop] = []
    correct: list[bool] = []
    meter = tier.escalate.model_dump(include={"window", "min_tokens", "decide_within"})
    meter["first_top"] = PROBE_TOKENS
    with Progress(console=err, transient=True) as progress:
        task = progress.add_task(f"{tier.name} ({tier.model})", total=len(examples))
        for example in examples:
            answer = client.chat(
                {
                    "model": tier.model,
                    "messages": [{"role": r, "content": c} for r, c in example.messages],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "claw": {
                        "app": "clawctl-calibrate",
                        "meter": meter,
                        "adapters": [a.model_dump() for a in tier.adapters],
                    },
                }
            )
            entropy = answer.claw.entropy
            observed.append(entropy.features() if entropy else {})
            first_tops.append((entropy.first_top or []) if entropy else [])
            correct.append(grade(answer.choices[0].message.content, example.ideal))
            progress.advance(task)
    return report_tier(tier.name, tier.model, observed, correct, rate, error, first_tops)


def _report_json(report: TierReport) -> dict[str, object]:
    return {
        "tier": report.tier,
        "model": report.model,
        "examples": report.examples,
        "accuracy": report.accuracy,
        "signals": {s.signal: {"auroc": s.auroc, "threshold": s.threshold} for s in report.signals},
    }


def _render_reports(reports: list[TierReport], chosen: dict[str, SignalReport]) -> None:
    grid = table("TIER", "MODEL", "N", "ACCURACY", "SIGNAL", "AUROC", "THRESHOLD", "")
    for report in reports:
        for s in report.signals:
            grid.add_row(
                report.tier,
                report.model,
                str(report.examples),
                f"{report.accuracy:.1%}",
                s.signal,
                "-" if s.auroc is None else f"{s.auroc:.3f}",
                "-" if s.threshold is None else f"{s.threshold:.4g}",
                "← chosen" if chosen.get(report.tier) is s else "",
            )
    out.print(grid)
