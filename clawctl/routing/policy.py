"""Routing policies: which tier a request starts on, when a tier gives up, what tiers cost.

A policy is a TOML file (see daemon/policies/cascade.toml and docs/routing.md). Requests are
routed by a policy when their `model` is the policy's name. Tiers are tried in order from the
starting tier; a local tier hands over to the next when its entropy meter fires. Rules choose the
starting tier (and sampling and adapters) from what the request *declares* - `claw.impact`, JSON
mode, sizes, the calling app - and from regular expressions the policy itself writes on the
prompt; nothing inside the prompt text can pick a tier otherwise.

Errors name the line: TOML syntax errors carry tomllib's position, schema errors are located by
`_locate`, which maps a pydantic error path back to the line of the offending key.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from clawctl.engines.meter import LogitProbe, ScoreModel, Thresholds
from clawctl.errors import BadInput
from clawctl.schemas.policy import AdapterUse, EscalateSection, Impact, Policy, Rule, Tier

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib


@dataclass(frozen=True)
class RouteInput:
    """What routing may look at: the request's declared options and its prompt text."""

    prompt: str
    impact: Impact = "normal"
    json_mode: bool = False
    max_tokens: int | None = None
    app: str | None = None
    uid: int | None = None


@dataclass(frozen=True)
class Route:
    """The routing decision for one request."""

    policy: str
    rule: str | None
    tiers: tuple[Tier, ...]  # the starting tier and every later one
    escalate: bool
    temperature: float | None
    max_temperature: float | None
    adapters: tuple[AdapterUse, ...] | None


def _matches(rule: Rule, request: RouteInput) -> bool:
    checks = (
        rule.impact is None or rule.impact == request.impact,
        rule.json_mode is None or rule.json_mode == request.json_mode,
        rule.app is None or rule.app == request.app,
        rule.uid is None or rule.uid == request.uid,
        rule.min_prompt_chars is None or len(request.prompt) >= rule.min_prompt_chars,
        rule.max_prompt_chars is None or len(request.prompt) <= rule.max_prompt_chars,
        rule.min_max_tokens is None or (request.max_tokens or 0) >= rule.min_max_tokens,
        rule.prompt_regex is None or re.search(rule.prompt_regex, request.prompt) is not None,
    )
    return all(checks)


def route(policy: Policy, request: RouteInput) -> Route:
    rule = next((r for r in policy.rules if _matches(r, request)), None)
    start = (rule.start if rule else None) or policy.start
    index = [t.name for t in policy.tiers].index(start)
    return Route(
        policy=policy.name,
        rule=rule.name if rule else None,
        tiers=policy.tiers[index:],
        escalate=rule.escalate if rule else True,
        temperature=rule.temperature if rule else None,
        max_temperature=rule.max_temperature if rule else None,
        adapters=rule.adapters if rule else None,
    )


def escalation_thresholds(section: EscalateSection) -> Thresholds:
    """A tier's thresholds as the meter's objects (score and probe models built here)."""
    values = section.model_dump(exclude={"model", "probe_model"})
    model, probe = section.model, section.probe_model
    score_model = (
        ScoreModel(model.weights, model.bias, model.center, model.scale) if model else None
    )
    probe_model = (
        LogitProbe(probe.tokens, probe.weights, probe.bias, probe.top_k) if probe else None
    )
    return Thresholds(**values, score_model=score_model, probe_model=probe_model)


# --- loading -------------------------------------------------------------------------------


def parse_policy(text: str, source: str) -> Policy:
    """Parse and check a policy; errors say `source:line: what`."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"{source}: invalid TOML: {exc}") from None
    try:
        return Policy.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = tuple(first["loc"])
        where = ".".join(str(part) for part in loc) or "policy"
        line = _locate(text, loc)
        message = str(first["msg"]).removeprefix("Value error, ")
        raise BadInput(f"{source}:{line}: {where}: {message}") from None


def load_policy(path: Path) -> Policy:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInput(f"policy file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read policy file {path}: {exc}") from None
    return parse_policy(text, str(path))


_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\"-]+?)\s*\]\]?")
_KEY = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=")


def _locate(text: str, loc: tuple[object, ...]) -> int:
    """The line of the key a pydantic error path points at (best effort: the closest table)."""
    counts: dict[str, int] = {}
    table: tuple[object, ...] = ()
    best_line, best_depth = 1, -1
    for number, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line)
        if header:
            parts: list[object] = []
            dotted = header.group(2).replace('"', "").split(".")
            for i, name in enumerate(dotted):
                parts.append(name)
                prefix = ".".join(dotted[: i + 1])
                if header.group(1) == "[[" and i == len(dotted) - 1:
                    counts[prefix] = counts.get(prefix, -1) + 1
                if prefix in counts:
                    parts.append(counts[prefix])
            table = tuple(parts)
            path: tuple[object, ...] = table
        else:
            key = _KEY.match(line)
            if not key:
                continue
            path = (*table, key.group(1))
        depth = _common_prefix(path, loc)
        if depth == len(path) and depth > best_depth:
            best_line, best_depth = number, depth
    return best_line


def _common_prefix(a: tuple[object, ...], b: tuple[object, ...]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
