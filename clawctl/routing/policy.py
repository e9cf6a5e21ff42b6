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
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from clawctl.engines.meter import LogitProbe, ScoreModel, Thresholds
from clawctl.errors import BadInput
from clawctl.schemas.signals import FEATURES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

Impact = Literal["low", "normal", "critical"]
POLICY_NAME = r"^[a-z][a-z0-9_-]{0,63}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScoreSection(_Strict):
    """A logistic model over the meter's summaries (written by `clawctl route calibrate`)."""

    weights: dict[str, float]
    bias: float = 0.0
    center: dict[str, float] = Field(default_factory=dict)
    scale: dict[str, float] = Field(default_factory=dict)

    @field_validator("weights", "center", "scale")
    @classmethod
    def _known(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(FEATURES))
        if unknown:
            raise ValueError(f"unknown features {unknown}; known: {list(FEATURES)}")
        return value


class ProbeSection(_Strict):
    """A logistic model over the first token's log-probabilities (written by `clawctl route
    calibrate`; token ids of the tier's model: recalibrate when the model changes)."""

    tokens: tuple[Annotated[int, Field(ge=0)], ...] = Field(min_length=1, max_length=4096)
    weights: tuple[float, ...] = Field(min_length=1, max_length=4096)
    bias: float = 0.0
    top_k: int = Field(256, ge=1, le=4096)

    @model_validator(mode="after")
    def _one_weight_per_token(self) -> ProbeSection:
        if len(self.tokens) != len(self.weights):
            raise ValueError(
                f"{len(self.tokens)} tokens but {len(self.weights)} weights: one weight per token"
            )
        return self


class EscalateSection(_Strict):
    """Meter thresholds of a local tier (unset: never escalates on that signal)."""

    window_entropy: float | None = Field(None, gt=0)
    max_entropy: float | None = Field(None, gt=0)
    min_prob: float | None = Field(None, gt=0, lt=1)
    first_margin: float | None = Field(None, gt=0, le=1)
    answer_entropy: float | None = Field(None, gt=0)
    answer_margin: float | None = Field(None, gt=0, le=1)
    score: float | None = Field(None, gt=0, lt=1)
    model: ScoreSection | None = None
    probe: float | None = Field(None, gt=0, lt=1)
    probe_model: ProbeSection | None = None
    window: int = Field(8, ge=1, le=256)
    min_tokens: int = Field(1, ge=1)
    decide_within: int = Field(48, ge=1, le=4096)

    @model_validator(mode="after")
    def _score_needs_model(self) -> EscalateSection:
        if self.score is not None and self.model is None:
            raise ValueError("score needs a [tiers.escalate.model] (see clawctl route calibrate)")
        if self.probe is not None and self.probe_model is None:
            raise ValueError(
                "probe needs a [tiers.escalate.probe_model] (see clawctl route calibrate)"
            )
        return self

    def thresholds(self) -> Thresholds:
        values = self.model_dump(exclude={"model", "probe_model"})
        model, probe = self.model, self.probe_model
        score_model = (
            ScoreModel(model.weights, model.bias, model.center, model.scale) if model else None
        )
        probe_model = (
            LogitProbe(probe.tokens, probe.weights, probe.bias, probe.top_k) if probe else None
        )
        return Thresholds(**values, score_model=score_model, probe_model=probe_model)


class AdapterUse(_Strict):
    name: str = Field(min_length=1, max_length=80)
    scale: float = Field(1.0, ge=-4.0, le=4.0)


class Tier(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")
    kind: Literal["local", "remote"]
    model: str = Field(min_length=1)
    # Prices per million tokens, in the ledger's currency.
    price_input: float = Field(0.0, ge=0)
    price_output: float = Field(0.0, ge=0)
    # local tiers
    adapters: tuple[AdapterUse, ...] = ()
    escalate: EscalateSection = EscalateSection()
    # remote tiers
    base_url: str | None = None
    base_url_env: str | None = None
    api_key_env: str | None = None
    api_key_file: str | None = None
    timeout_seconds: float = Field(30.0, gt=0, le=600)
    retries: int = Field(2, ge=0, le=10)
    breaker_failures: int = Field(3, ge=1)
    breaker_cooldown_seconds: float = Field(30.0, ge=0)

    @model_validator(mode="after")
    def _kind_fields(self) -> Tier:
        if self.kind == "remote":
            if not (self.base_url or self.base_url_env):
                raise ValueError("a remote tier needs base_url or base_url_env")
            if self.adapters:
                raise ValueError("adapters apply to local tiers only")
        elif self.base_url or self.base_url_env or self.api_key_env or self.api_key_file:
            raise ValueError("base_url and API keys apply to remote tiers only")
        return self

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.price_input + completion_tokens * self.price_output) / 1e6


class Rule(_Strict):
    """First matching rule wins. Conditions that are unset match anything."""

    name: str = Field(min_length=1, max_length=80)
    # conditions
    impact: Impact | None = None
    json_mode: bool | None = None
    app: str | None = None
    uid: int | None = None
    prompt_regex: str | None = None
    min_prompt_chars: int | None = Field(None, ge=0)
    max_prompt_chars: int | None = Field(None, ge=0)
    min_max_tokens: int | None = Field(None, ge=1)
    # actions
    start: str | None = None
    escalate: bool = True
    temperature: float | None = Field(None, ge=0, le=2)
    max_temperature: float | None = Field(None, ge=0, le=2)
    adapters: tuple[AdapterUse, ...] | None = None

    @field_validator("prompt_regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regular expression: {exc}") from None
        return value


class CacheSettings(_Strict):
    """The policy's say over the answer cache (unset keys take clawd.toml's [cache])."""

    enabled: bool = True
    threshold: float | None = Field(None, gt=0, le=1)  # cosine for a semantic hit
    sampled: bool | None = None  # may requests with temperature > 0 be answered from it?


class Policy(_Strict):
    name: str = Field(pattern=POLICY_NAME)
    description: str = ""
    start: str
    on_remote_failure: Literal["degraded", "error"] = "degraded"
    store_prompts: bool = False
    cache: CacheSettings = CacheSettings()
    tiers: Annotated[tuple[Tier, ...], Field(min_length=1)]
    rules: tuple[Rule, ...] = ()

    @model_validator(mode="after")
    def _references(self) -> Policy:
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError("tier names must be unique")
        if self.start not in names:
            raise ValueError(f"start tier {self.start!r} is not one of the tiers {names}")
        for rule in self.rules:
            if rule.start is not None and rule.start not in names:
                raise ValueError(f"rule {rule.name!r} starts on unknown tier {rule.start!r}")
        return self

    def tier(self, name: str) -> Tier:
        return next(t for t in self.tiers if t.name == name)

    @property
    def remote(self) -> Tier | None:
        """The tier an all-remote request would have used (the last remote one)."""
        remotes = [t for t in self.tiers if t.kind == "remote"]
        return remotes[-1] if remotes else None


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
