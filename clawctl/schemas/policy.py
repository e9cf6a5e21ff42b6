"""A routing policy as a typed document: what `daemon/policies/*.toml` holds, what
`/admin/policies` returns, and what the router reads.

These are data only (the tiers, their meter thresholds and prices, the rules), so the CLI can
render a policy without importing the router or the engines; parsing TOML with line-numbered
errors and choosing a route live in `clawctl.routing.policy`, and turning thresholds into the
meter's objects in `clawctl.routing.policy.escalation_thresholds`.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from clawctl.errors import BadInput
from clawctl.schemas.signals import FEATURES

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


class AdapterUse(_Strict):
    name: str = Field(min_length=1, max_length=80)
    scale: float = Field(1.0, ge=-4.0, le=4.0)


class Endpoint(_Strict):
    """One server of a remote tier's pool (vLLM, llama-server, a LiteLLM proxy, another clawd)."""

    base_url: str | None = None
    base_url_env: str | None = None
    api_key_env: str | None = None
    api_key_file: str | None = None

    @model_validator(mode="after")
    def _has_url(self) -> Endpoint:
        if not (self.base_url or self.base_url_env):
            raise ValueError("an endpoint needs base_url or base_url_env")
        return self


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
    # The least quality the tier's model must have kept of its source (`models quantize`
    # measures it); a policy whose local tier falls below is refused when applied.
    min_quality: float | None = Field(None, gt=0, le=1)
    # remote tiers
    base_url: str | None = None
    base_url_env: str | None = None
    api_key_env: str | None = None
    api_key_file: str | None = None
    # A pool of servers instead of the one above: tried in `failover` order, each with its own
    # circuit breaker and Retry-After; `retries` counts rounds through the pool.
    endpoints: tuple[Endpoint, ...] = ()
    failover: Literal["order", "least_recent_failure"] = "order"
    timeout_seconds: float = Field(30.0, gt=0, le=600)
    # How long one attempt may wait for its first token; unset: what is left of timeout_seconds
    # shared evenly among the endpoints still to try (a hung server leaves time for the next).
    attempt_timeout_seconds: float | None = Field(None, gt=0, le=600)
    retries: int = Field(2, ge=0, le=10)
    breaker_failures: int = Field(3, ge=1)
    breaker_cooldown_seconds: float = Field(30.0, ge=0)

    @model_validator(mode="after")
    def _kind_fields(self) -> Tier:
        single = self.base_url or self.base_url_env or self.api_key_env or self.api_key_file
        if self.kind == "remote":
            if self.endpoints and single:
                raise ValueError("give either endpoints or base_url and its key, not both")
            if not (self.endpoints or self.base_url or self.base_url_env):
                raise ValueError("a remote tier needs base_url, base_url_env or endpoints")
            if self.adapters:
                raise ValueError("adapters apply to local tiers only")
        elif single or self.endpoints:
            raise ValueError("base_url, endpoints and API keys apply to remote tiers only")
        return self

    def pool(self) -> tuple[Endpoint, ...]:
        """The servers of a remote tier: its endpoints, or the one its own fields name."""
        if self.endpoints:
            return self.endpoints
        return (
            Endpoint(
                base_url=self.base_url, base_url_env=self.base_url_env,
                api_key_env=self.api_key_env, api_key_file=self.api_key_file,
            ),
        )  # fmt: skip

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


class AuditSection(_Strict):
    """Labels from traffic: a share of the requests a local tier answered (without escalating)
    is also sent to the next tier, in the background after the response, and both answers are
    kept in the ledger; agreement with the stronger tier is the label calibration fits on
    (`clawctl route calibrate --from-ledger`)."""

    share: float = Field(0.0, ge=0, le=1)  # every round(1/share)-th eligible request
    max_per_day: int = Field(200, ge=0)  # audits per UTC day, whatever the share


class AdjustSection(_Strict):
    """Hold a remote share, or a spend per day, online: every `every` requests clawd moves each
    local tier's threshold toward the one that would have escalated the target share of its last
    `window` requests, by at most `max_step` of its value per change and never outside
    `min_factor` to `max_factor` times the threshold written in the policy (a tier with one armed
    signal). With `spend_per_day` (the ledger's currency) the target share is what that budget
    buys at the window's measured request rate and cost per escalation."""

    target_remote_rate: float | None = Field(None, ge=0, le=1)
    spend_per_day: float | None = Field(None, ge=0)
    window: int = Field(200, ge=10, le=100_000)
    every: int = Field(20, ge=1)
    max_step: float = Field(0.1, gt=0, le=1)
    min_factor: float = Field(0.5, gt=0, le=1)
    max_factor: float = Field(2.0, ge=1)

    @model_validator(mode="after")
    def _one_target(self) -> AdjustSection:
        if (self.target_remote_rate is None) == (self.spend_per_day is None):
            raise ValueError("[adjust] needs exactly one of target_remote_rate and spend_per_day")
        return self


class Policy(_Strict):
    name: str = Field(pattern=POLICY_NAME)
    description: str = ""
    start: str
    on_remote_failure: Literal["degraded", "error"] = "degraded"
    store_prompts: bool = False
    cache: CacheSettings = CacheSettings()
    audit: AuditSection = AuditSection()
    adjust: AdjustSection | None = None
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


# --- /admin/policies ------------------------------------------------------------------------


class PolicyText(BaseModel):
    """`POST /admin/policies` (install) and `/admin/policies/validate`: a policy file's text;
    `source` names it in error messages (`my.toml:11: tiers.1.kind: ...`)."""

    text: str = Field(max_length=1 << 20)
    source: str = Field("policy.toml", max_length=4096)


class PolicyEntry(BaseModel):
    """One policy as `clawctl route list` shows it."""

    name: str
    tiers: list[str]
    shipped: bool  # from the package (daemon/policies), not installed by an admin
    path: str


class PolicyListing(BaseModel):
    """`GET /admin/policies`: installed and shipped policies (an installed one hides a shipped
    one of the same name)."""

    policies: list[PolicyEntry]


class LiveTier(BaseModel):
    """A local tier's escalation as clawd runs it now (`clawctl route show`)."""

    tier: str
    signal: str | None  # the one armed signal (None: none, or several: not adjusted)
    written: float | None  # its threshold in the policy file
    live: float | None  # what clawd uses now (online adjustment may have moved it)
    requests: int  # recent requests this tier answered or handed over
    remote_share: float | None  # of those, the share it escalated
    audits: int  # audited answers of this tier in the window
    local_error: float | None  # share of audited answers the next tier disagreed with
    changes: int  # adjustments since clawd started
    target: float | None = None  # the share it aims at (from spend_per_day: derived, live)
    spend_per_day: float | None = None  # at the window's request rate and escalation cost


class PolicyDetail(BaseModel):
    """`GET /admin/policies/{name}`, and the answer to install and validate."""

    path: str
    shipped: bool
    policy: Policy
    live: list[LiveTier] = []


class ExplainRequest(BaseModel):
    """`POST /admin/policies/{name}/explain`: what routing may look at, as a request declares it."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(max_length=1 << 20)
    impact: Impact = "normal"
    json_mode: bool = False
    max_tokens: int | None = Field(None, ge=1)
    app: str | None = Field(None, max_length=128)


class RouteExplanation(BaseModel):
    """Which rule and tiers a request would get, without running it."""

    policy: str
    rule: str | None
    tiers: list[str]
    escalate: bool
    temperature: float | None
    max_temperature: float | None


class EvalMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class EvalExample(BaseModel):
    """One labelled example, an OpenAI Evals line: chat `input` and the `ideal` answer(s)."""

    input: list[EvalMessage] = Field(min_length=1)
    ideal: str | list[str]

    @property
    def ideal_text(self) -> str:
        """The first ideal answer (graders compare with one)."""
        if isinstance(self.ideal, list):
            return self.ideal[0] if self.ideal else ""
        return self.ideal


def parse_evals(text: str, source: str, limit: int | None = None) -> list[EvalExample]:
    """The examples of an Evals JSONL text (the first `limit`); errors say `source:line:`."""
    examples: list[EvalExample] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            examples.append(EvalExample.model_validate_json(line))
        except ValidationError:
            raise BadInput(
                f"{source}:{number}: not an Evals line (need 'input' messages and 'ideal')"
            ) from None
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise BadInput(f"{source}: no examples")
    return examples


class CalibrateRequest(BaseModel):
    """`POST /admin/policies/{name}/calibrate`: run the policy's local tiers on labelled
    examples and choose each tier's escalation threshold for one target."""

    model_config = ConfigDict(extra="forbid")

    examples: list[EvalExample] = Field(default_factory=list, max_length=100_000)
    # Fit on the audit pairs the ledger keeps for this policy instead of labelled examples.
    from_ledger: bool = False
    target_remote_rate: float | None = Field(None, ge=0, le=1)
    target_error_rate: float | None = Field(None, ge=0, le=1)
    # Spend per 1,000 requests at the policy's prices (needs the next tiers' answers).
    target_cost_per_1000: float | None = Field(None, ge=0)
    max_tokens: int = Field(32, ge=1, le=4096)
    # Also answer the examples with the tiers escalation leads to (remote ones included), and
    # escalate only where that pays; False: calibrate the local meters alone.
    ask_next_tiers: bool = True
    dry_run: bool = False

    @model_validator(mode="after")
    def _one_target(self) -> CalibrateRequest:
        targets = (self.target_remote_rate, self.target_error_rate, self.target_cost_per_1000)
        if sum(t is not None for t in targets) != 1:
            raise ValueError(
                "give exactly one of target_remote_rate, target_error_rate and target_cost_per_1000"
            )
        if self.target_cost_per_1000 is not None and not self.ask_next_tiers:
            raise ValueError("a cost target needs the next tiers' answers (ask_next_tiers)")
        if bool(self.examples) == self.from_ledger:
            raise ValueError("give labelled examples, or from_ledger (audited traffic), not both")
        return self


class SignalScore(BaseModel):
    """How well one meter signal predicted a wrong local answer, and the threshold that meets
    the target (`score` and `probe`: fitted, with out-of-fold AUROC)."""

    auroc: float | None
    threshold: float | None


class CurvePoint(BaseModel):
    """Accuracy at one share of requests escalated: the fitted cascade, a random router, the
    oracle (which escalates exactly the answers the next tier fixes)."""

    rate: float
    cascade: float
    random: float
    oracle: float


class Handover(BaseModel):
    """One step of a cascade as calibration fitted it on examples both sides answered."""

    tier: str
    next_tier: str
    escalates: bool  # False: the next tier is not better here (or the target allows none)
    rate: float  # share of requests escalated from `tier`
    accuracy: float  # of the cascade from `tier` at that rate
    alone: float  # `tier` answering everything
    next_alone: float  # the cascade after `tier` answering everything
    cost_per_1000: float
    target_met: bool
    reason: str
    curve: list[CurvePoint]


class TierCalibration(BaseModel):
    tier: str
    model: str
    examples: int
    accuracy: float
    signals: dict[str, SignalScore]


class CalibrationResult(BaseModel):
    """The result line of a calibration: per tier, every signal, and the one chosen."""

    tiers: list[TierCalibration]
    chosen: dict[str, str]  # tier name -> signal written into the policy
    skipped: list[str] = Field(default_factory=list)  # tiers whose model is not installed
    handovers: list[Handover] = Field(default_factory=list)  # with the next tiers' answers
    written: str | None = None  # the policy file written (None: dry run or nothing chosen)
