"""`clawctl route`: check, install, inspect, explain and calibrate routing policies."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer

from clawctl.cli._client import daemon_client
from clawctl.cli._console import RichProgress, emit_json, err, out, table
from clawctl.cli._options import JsonOption
from clawctl.errors import BadInput

if TYPE_CHECKING:
    from clawctl.schemas.policy import (
        CalibrationResult,
        Handover,
        Policy,
        PolicyDetail,
        PolicyText,
    )

app = typer.Typer(
    help="Routing policies: which tier answers, when to escalate, what it costs.",
    no_args_is_help=True,
)
PolicyName = Annotated[str, typer.Option("--policy", help="Policy name.")]


def _policy_text(file: Path) -> PolicyText:
    from clawctl.schemas.policy import PolicyText

    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read policy file {file}: {exc}") from None
    return PolicyText(text=text, source=str(file))


@app.command()
def validate(file: Annotated[Path, typer.Argument(help="Policy TOML file.")]) -> None:
    """Check a policy file; errors name the line.

    Example: clawctl route validate my-policy.toml
    """
    with daemon_client() as client:
        policy = client.validate_policy(_policy_text(file)).policy
    err.print(f"{file}: policy {policy.name!r} is valid ({len(policy.tiers)} tiers)")


@app.command()
def apply(file: Annotated[Path, typer.Argument(help="Policy TOML file.")]) -> None:
    """Validate a policy and install it under its name; clawd uses it from the next request.

    Example: clawctl route apply my-policy.toml
    """
    with daemon_client() as client:
        installed = client.install_policy(_policy_text(file))
    err.print(f"applied policy {installed.policy.name!r} → {installed.path}")


@app.command("list")
def list_(json_: JsonOption = False) -> None:
    """Installed and shipped policies."""
    with daemon_client() as client:
        listing = client.list_policies()
    if json_:
        emit_json(listing.policies)
        return
    grid = table("NAME", "TIERS", "SOURCE")
    for entry in listing.policies:
        grid.add_row(
            entry.name, " > ".join(entry.tiers), "shipped" if entry.shipped else entry.path
        )
    out.print(grid)


@app.command()
def show(
    name: Annotated[str, typer.Argument(help="Policy name.")] = "cascade",
    live: Annotated[
        bool, typer.Option("--live", help="With --json: also what clawd runs now.")
    ] = False,
    json_: JsonOption = False,
) -> None:
    """A policy's tiers, thresholds, prices and rules; with [adjust] or [audit], also the live
    thresholds, the share escalated and the audited local error rate.

    Example: clawctl route show cascade
    """
    with daemon_client() as client:
        found = client.show_policy(name)
    policy = found.policy
    if json_:
        if live:
            emit_json(found)
        else:
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
    if policy.adjust is not None or policy.audit.share > 0:
        _render_live(found)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _render_live(found: PolicyDetail) -> None:
    """What clawd runs now: live thresholds, the share escalated, the audited error rate."""
    policy = found.policy
    adjust = policy.adjust
    if adjust is not None and adjust.spend_per_day is not None:
        out.print(f"online adjustment: holding a spend of {adjust.spend_per_day:.4g} a day")
    elif adjust is not None:
        out.print(f"online adjustment: holding {_percent(adjust.target_remote_rate)} escalated")
    grid = table(
        "TIER", "SIGNAL", "WRITTEN", "LIVE", "ESCALATED", "TARGET", "SPEND/DAY", "REQUESTS",
        "LOCAL ERROR",
    )  # fmt: skip
    for live in found.live:
        grid.add_row(
            live.tier,
            live.signal or "-",
            "-" if live.written is None else f"{live.written:.4g}",
            "-" if live.live is None else f"{live.live:.4g}",
            _percent(live.remote_share),
            _percent(live.target),
            "-" if live.spend_per_day is None else f"{live.spend_per_day:.4g}",
            str(live.requests),
            f"{_percent(live.local_error)} of {live.audits} audited",
        )
    out.print(grid)


def _pairs(values: dict[str, object]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "always"


def _thresholds_text(policy: Policy, tier_name: str) -> str:
    from clawctl.schemas.signals import LOW_IS_UNSURE, SIGNALS

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
    from clawctl.schemas.policy import ExplainRequest

    request = ExplainRequest(
        prompt=prompt, impact=impact, json_mode=json_mode, max_tokens=max_tokens, app=app_name
    )
    with daemon_client() as client:
        decision = client.explain_route(policy, request)
        found = client.show_policy(policy)
    if json_:
        emit_json(decision)
        return
    out.print(f"policy {decision.policy}: rule {decision.rule or '(none: default start)'}")
    chain = " > ".join(decision.tiers)
    out.print(f"tiers: {chain}" + ("" if decision.escalate else " (no escalation)"))
    for tier in decision.tiers:
        out.print(f"  {tier}: escalate when {_thresholds_text(found.policy, tier)}")
    if decision.temperature is not None:
        out.print(f"temperature set to {decision.temperature:g}")
    if decision.max_temperature is not None:
        out.print(f"temperature capped at {decision.max_temperature:g}")


@app.command()
def calibrate(
    data: Annotated[
        Path | None, typer.Option(help="Labelled examples (OpenAI Evals JSONL).")
    ] = None,
    from_ledger: Annotated[
        bool,
        typer.Option("--from-ledger", help="Fit on the policy's audited traffic instead."),
    ] = False,
    policy: PolicyName = "cascade",
    target_remote_rate: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, help="Share of requests to escalate.")
    ] = None,
    target_error_rate: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, help="Highest error rate to keep.")
    ] = None,
    target_cost_per_1000: Annotated[
        float | None,
        typer.Option(min=0.0, help="Spend per 1,000 requests at the policy's prices."),
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Use the first N examples.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens per answer.")] = 32,
    local_only: Annotated[
        bool, typer.Option("--local-only", help="Do not ask the tiers escalation leads to.")
    ] = False,
    dry_run: Annotated[bool, typer.Option(help="Report only; do not write the policy.")] = False,
    json_: JsonOption = False,
) -> None:
    """Run the policy's tiers (remote ones too) on labelled examples through clawd, report each
    signal's AUROC for predicting a wrong local answer and whether escalating pays, and write
    thresholds into the policy (a tier whose next tier is not better never escalates).

    Example: clawctl route calibrate --data born_first.jsonl --target-remote-rate 0.3
    Example: clawctl route calibrate --from-ledger --policy cascade --target-remote-rate 0.1
    """
    from clawctl.schemas.policy import CalibrateRequest, parse_evals

    if (data is not None) == from_ledger:
        raise BadInput("give labelled examples with --data FILE, or --from-ledger")
    examples = []
    if data is not None:
        try:
            text = data.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise BadInput(f"cannot read {data}: {exc}") from None
        examples = parse_evals(text, str(data), limit)
    targets = (target_remote_rate, target_error_rate, target_cost_per_1000)
    if sum(t is not None for t in targets) != 1:
        raise BadInput(
            "give exactly one of --target-remote-rate, --target-error-rate and "
            "--target-cost-per-1000"
        )
    if target_cost_per_1000 is not None and local_only:
        raise BadInput("--target-cost-per-1000 needs the next tiers' answers (no --local-only)")
    request = CalibrateRequest(
        examples=examples,
        from_ledger=from_ledger,
        target_remote_rate=target_remote_rate,
        target_error_rate=target_error_rate,
        target_cost_per_1000=target_cost_per_1000,
        max_tokens=max_tokens,
        ask_next_tiers=not local_only,
        dry_run=dry_run,
    )
    with daemon_client() as client, RichProgress(steps=True) as progress:
        result = client.calibrate_policy(policy, request, progress)
    if result.written:
        err.print(f"wrote thresholds into {result.written}")
    if json_:
        emit_json(result)
        return
    _render(result)


def _render(result: CalibrationResult) -> None:
    grid = table("TIER", "MODEL", "N", "ACCURACY", "SIGNAL", "AUROC", "THRESHOLD", "")
    for tier in result.tiers:
        for signal, score in tier.signals.items():
            grid.add_row(
                tier.tier,
                tier.model,
                str(tier.examples),
                f"{tier.accuracy:.1%}",
                signal,
                "-" if score.auroc is None else f"{score.auroc:.3f}",
                "-" if score.threshold is None else f"{score.threshold:.4g}",
                "← chosen" if result.chosen.get(tier.tier) == signal else "",
            )
    out.print(grid)
    for handover in result.handovers:
        _render_handover(handover)


BAR = 24  # characters for 100% accuracy


def _bar(value: float) -> str:
    filled = round(max(0.0, min(1.0, value)) * BAR)
    return "█" * filled + "·" * (BAR - filled)


def _render_handover(handover: Handover) -> None:
    """One handover's verdict and its accuracy against the share escalated, as bars: the fitted
    cascade, a random router and the oracle."""
    verdict = (f"escalates {handover.rate:.0%}" if handover.escalates else "never escalates") + (
        "" if handover.target_met else " (target not met)"
    )
    out.print(
        f"\n{handover.tier} → {handover.next_tier}: {verdict}; accuracy {handover.accuracy:.0%} "
        f"({handover.tier} alone {handover.alone:.0%}, {handover.next_tier} alone "
        f"{handover.next_alone:.0%}), {handover.cost_per_1000:.4g} per 1,000 requests",
        markup=False,
    )
    out.print(f"  {handover.reason}", markup=False)
    grid = table("ESCALATED", "CASCADE", "", "RANDOM", "ORACLE")
    for point in handover.curve:
        grid.add_row(
            f"{point.rate:.0%}",
            f"{point.cascade:.0%}",
            _bar(point.cascade),
            f"{point.random:.0%}",
            f"{point.oracle:.0%}",
        )
    out.print(grid)
