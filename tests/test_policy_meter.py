"""Policies (schema, line-numbered errors, rules), the entropy meter's arithmetic and triggers,
calibration maths and the circuit breaker - the pure parts of routing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from clawctl.engines.meter import EntropyMeter, LogitProbe, ScoreModel, Thresholds
from clawctl.errors import BadInput
from clawctl.resources import bundled_dir
from clawctl.routing.calibrate import (
    auroc,
    fit_probe,
    fit_score,
    grade,
    threshold_for_error,
    threshold_for_rate,
)
from clawctl.routing.policy import RouteInput, load_policy, parse_policy, route
from clawctl.routing.remote import CircuitBreaker

GOOD = """name = "p"
start = "a"

[[tiers]]
name = "a"
kind = "local"
model = "smollm2-135m"

[[tiers]]
name = "b"
kind = "remote"
base_url = "http://127.0.0.1:1/v1"
model = "m"
"""


_PROBE_ONLY = 'model = "smollm2-135m"\n[tiers.escalate]\nprobe = 0.5\n'
_PROBE_MISMATCH = (
    'model = "smollm2-135m"\n[tiers.escalate]\nprobe = 0.5\n'
    "[tiers.escalate.probe_model]\ntokens = [1, 2]\nweights = [0.5]\n"
)


def test_shipped_policy_is_valid() -> None:
    policy = load_policy(bundled_dir("daemon") / "policies" / "cascade.toml")
    assert [t.name for t in policy.tiers] == ["int4", "remote"]
    assert policy.adjust is not None  # unseen work: the escalated share is held online
    assert policy.audit.share > 0
    assert policy.remote is not None
    assert policy.remote.name == "remote"


@pytest.mark.parametrize(
    ("broken", "line", "words"),
    [
        (GOOD.replace('kind = "remote"', 'kind = "cloud"'), 11, "tiers.1.kind"),
        (GOOD.replace('model = "m"', 'model = "m"\ntimeout_seconds = -1'), 14, "timeout"),
        (GOOD.replace('start = "a"', 'start = "zzz"'), 1, "start tier 'zzz'"),
        (GOOD.replace('base_url = "http://127.0.0.1:1/v1"\n', ""), 9, "base_url"),
        (GOOD + '\n[[rules]]\nname = "r"\nprompt_regex = "("\n', 17, "regular expression"),
        (GOOD.replace('name = "a"\n', 'name = "a"\ncolour = 3\n'), 6, "colour"),
        (GOOD.replace('start = "a"', 'start = "a'), 2, "invalid TOML"),
        (GOOD.replace('model = "smollm2-135m"\n', _PROBE_ONLY), 8, "probe needs"),
        (GOOD.replace('model = "smollm2-135m"\n', _PROBE_MISMATCH), 10, "one weight per token"),
    ],
)
def test_invalid_policies_name_the_line(broken: str, line: int, words: str) -> None:
    with pytest.raises(BadInput) as caught:
        parse_policy(broken, "x.toml")
    message = str(caught.value.message)
    assert words in message
    assert f"x.toml:{line}:" in message or f"line {line}" in message


def test_rules_match_declared_options_and_policy_regexes() -> None:
    policy = parse_policy(
        GOOD
        + """
[[rules]]
name = "low"
impact = "low"
max_temperature = 0.2

[[rules]]
name = "app"
app = "mailer"
start = "b"

[[rules]]
name = "long"
min_prompt_chars = 100
start = "b"
escalate = false
""",
        "p.toml",
    )
    assert route(policy, RouteInput("hi")).rule is None
    low = route(policy, RouteInput("hi", impact="low"))
    assert low.rule == "low"
    assert low.max_temperature == 0.2
    assert low.tiers[0].name == "a"
    assert route(policy, RouteInput("hi", app="mailer")).tiers[0].name == "b"
    long = route(policy, RouteInput("x" * 100))
    assert long.rule == "long"
    assert not long.escalate
    # words in the prompt are just words
    assert route(policy, RouteInput("impact=low app=mailer")).rule is None


def test_meter_entropy_and_margin_match_the_definitions() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=1000).astype(np.float32) * 3
    meter = EntropyMeter(1000, Thresholds(), lambda _t: "word")
    meter.observe(logits)
    p = np.exp(logits.astype(np.float64) - logits.max())
    p /= p.sum()
    top2 = np.sort(p)[-2:]
    signals = meter.signals()
    assert signals.mean_entropy == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-4)
    assert signals.min_prob == pytest.approx(float(top2[1]), rel=1e-4)
    assert signals.first_margin == pytest.approx(float(top2[1] - top2[0]), rel=1e-4)
    uniform = EntropyMeter(512, Thresholds(), lambda _t: "word")
    uniform.observe(np.zeros(512, dtype=np.float32))
    assert uniform.signals().mean_entropy == pytest.approx(math.log(512), rel=1e-5)


def _peaked(height: float, n: int = 100) -> np.ndarray:
    logits = np.zeros(n, dtype=np.float32)
    logits[0] = height
    return logits


def test_meter_triggers_within_the_decision_window_only() -> None:
    sure, unsure = _peaked(30), _peaked(0.5)
    spike = EntropyMeter(100, Thresholds(max_entropy=3.0, min_tokens=3), lambda _t: "word")
    assert spike.observe(unsure) is None  # before min_tokens
    assert spike.observe(sure) is None
    fired = spike.observe(unsure)
    assert fired is not None
    assert fired.signal == "max_entropy"
    assert fired.token == 3

    late = EntropyMeter(100, Thresholds(max_entropy=3.0, decide_within=2), lambda _t: "word")
    for _ in range(2):
        assert late.observe(sure) is None
    assert late.observe(unsure) is None  # committed: measured, never triggers

    window = EntropyMeter(100, Thresholds(window_entropy=2.0, window=4), lambda _t: "word")
    for logits in (unsure, unsure, unsure):
        assert window.observe(logits) is None
    assert window.finish() is not None  # a 3-token answer judged by its mean

    texts = ["  ", "Yes"]
    margin = EntropyMeter(100, Thresholds(first_margin=0.5), lambda _t: texts.pop(0))
    assert margin.observe(sure) is None  # not a content token: not the answer yet
    fired = margin.observe(unsure)
    assert fired is not None
    assert fired.signal == "first_margin"
    assert fired.token == 2


def test_answer_span_and_score() -> None:
    texts = iter(["The", " answer", " is", " 4", "8", "0", "."])
    meter = EntropyMeter(100, Thresholds(answer_margin=0.5), lambda _t: next(texts))
    margins = [0.9, 0.9, 0.9, 0.7, 0.3, 0.6, 0.9]
    for i, margin in enumerate(margins):
        assert meter.account(entropy=float(i), p1=0.9, margin=margin, token=0) is None
    signals = meter.signals()
    assert signals.answer_margin == pytest.approx(0.3)  # the digits are the span
    assert signals.answer_entropy == pytest.approx((3 + 4 + 5) / 3)
    fired = meter.finish()  # judged when the answer ends
    assert fired is not None
    assert fired.signal == "answer_margin"

    yes_no = iter(["Yes", ",", " 5", " pounds"])
    meter = EntropyMeter(100, Thresholds(), lambda _t: next(yes_no))
    for margin in (0.2, 0.9, 0.8, 0.9):
        meter.account(entropy=1.0, p1=0.9, margin=margin, token=0)
    assert meter.signals().answer_margin == pytest.approx(0.2)  # the yes/no word only

    model = ScoreModel(weights={"mean_entropy": 2.0}, bias=0.0, center={"mean_entropy": 1.0})
    assert model.probability({"mean_entropy": 1.0}) == pytest.approx(0.5)
    assert model.probability({"mean_entropy": None}) == pytest.approx(0.5)  # missing: average
    assert model.probability({"mean_entropy": 3.0}) > 0.95
    unsure = EntropyMeter(100, Thresholds(score=0.9, score_model=model), lambda _t: "x")
    unsure.account(entropy=3.0, p1=0.5, margin=0.1, token=0)
    fired = unsure.finish()
    assert fired is not None
    assert fired.signal == "score"


def test_calibration_fits_a_score_that_separates() -> None:
    rng = np.random.default_rng(1)
    wrong = [bool(i % 2) for i in range(80)]
    observed = [
        {"mean_entropy": float(rng.normal(2.0 if w else 1.0, 0.3)), "tokens": 5.0} for w in wrong
    ]
    fitted = fit_score(observed, wrong)
    assert fitted is not None
    model, probabilities, area = fitted
    assert area is not None
    assert area > 0.9
    assert model.weights["mean_entropy"] > 0
    assert sum(p > 0.5 for p, w in zip(probabilities, wrong, strict=True) if w) > 30


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max()
    return shifted - math.log(float(np.exp(shifted).sum()))


def test_probe_reads_the_first_token_and_fires_before_any_text() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(size=300).astype(np.float32) * 2
    logprobs = _log_softmax(logits)
    probe = LogitProbe(tokens=(5, 17, 250), weights=(0.5, -1.0, 2.0), bias=0.3, top_k=20)
    floor = float(np.sort(logprobs)[-20])  # the 20th most likely token's log-probability
    z = 0.3 + sum(
        w * max(float(logprobs[t]), floor) for t, w in zip(probe.tokens, probe.weights, strict=True)
    )
    expected = 1 / (1 + math.exp(-z))

    meter = EntropyMeter(300, Thresholds(probe_model=probe, first_top=4), lambda _t: "No")
    assert meter.observe(logits) is None  # measured only: no threshold
    signals = meter.signals()
    assert signals.probe == pytest.approx(expected, rel=1e-5)
    best = np.argsort(-logprobs)[:4]
    assert [t for t, _ in signals.first_top] == best.tolist()
    assert [lp for _, lp in signals.first_top] == pytest.approx(logprobs[best].tolist(), abs=1e-4)
    meter.observe(rng.normal(size=300).astype(np.float32))
    assert meter.signals().probe == signals.probe  # the first token's reading, kept

    firing = Thresholds(probe=expected / 2, probe_model=probe)
    fired = EntropyMeter(300, firing, lambda _t: "No").observe(logits)
    assert fired is not None
    assert (fired.signal, fired.token) == ("probe", 1)
    calm = Thresholds(probe=min(0.999, expected * 1.01), probe_model=probe)
    assert EntropyMeter(300, calm, lambda _t: "No").observe(logits) is None

    with pytest.raises(BadInput, match="recalibrate"):
        EntropyMeter(200, firing, lambda _t: "No")  # token 250 is not in a 200-token vocabulary


def test_probe_learns_what_entropy_and_margin_cannot_see() -> None:
    """The first token is always the same answer with the same confidence; whether it is wrong
    shows only in a token further down the distribution. Fitted on the meter's own first-token
    lists, the probe predicts the errors out of fold, and the online meter reads exactly the
    probabilities the fit computed offline."""
    rng = np.random.default_rng(4)
    wrong = [bool(i % 2) for i in range(60)]
    firsts = []
    tops = []
    for w in wrong:
        logits = rng.normal(size=120).astype(np.float32)
        logits[0] = 12.0  # "No.", always, as sure as ever
        # Tokens 9 and 10 swap places: the distribution's shape (entropy, margin) stays put.
        logits[9], logits[10] = (6.0, 5.0) if w else (5.0, 6.0)
        meter = EntropyMeter(120, Thresholds(first_top=16), lambda _t: "No")
        meter.observe(logits)
        firsts.append(logits)
        tops.append(meter.signals().first_top)
    margins = [EntropyMeter(120, Thresholds(), lambda _t: "No") for _ in wrong]
    for meter, logits in zip(margins, firsts, strict=True):
        meter.observe(logits)
    margin_area = auroc([-(m.signals().first_margin or 0.0) for m in margins], wrong)
    assert margin_area is not None
    fitted = fit_probe(tops, wrong)
    assert fitted is not None
    probe, probabilities, area = fitted
    assert area is not None
    assert area > 0.9
    assert margin_area < 0.7
    assert probe.top_k == 16
    assert 9 in probe.tokens
    for logits, offline in zip(firsts, probabilities, strict=True):
        meter = EntropyMeter(120, Thresholds(probe_model=probe), lambda _t: "No")
        meter.observe(logits)
        assert meter.signals().probe == pytest.approx(offline, abs=1e-3)
    assert fit_probe([()] * len(wrong), wrong) is None  # no first-token lists: no probe


def test_grading_is_lenient_and_the_same_for_every_tier() -> None:
    assert grade("The answer is 480.", "480")
    assert grade("1,234", "1234")
    assert not grade("480 or maybe 481", "480")  # the last number counts
    assert grade("Yes, it is heavier.", "Yes")
    assert grade("No.", "N")
    assert not grade("Y", "N")
    assert grade("I think the answer is no", "No")
    assert grade("It is Paris, of course", "paris")


def test_auroc_and_thresholds() -> None:
    assert auroc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [False, False, True, True]) == 0.0
    assert auroc([0.5, 0.5], [False, True]) == 0.5
    assert auroc([0.5, 0.6], [True, True]) is None
    values = [float(i) for i in range(100)]
    high = threshold_for_rate("max_entropy", list(values), 0.3)
    assert high is not None
    assert sum(v > high for v in values) == 30
    low = threshold_for_rate("first_margin", list(values), 0.3)
    assert low is not None
    assert sum(v < low for v in values) == 30
    correct = [v < 80 for v in values]  # the 20 least sure are wrong
    cut = threshold_for_error("max_entropy", list(values), correct, 0.0)
    assert cut is not None
    assert all(c for v, c in zip(values, correct, strict=True) if v <= cut)


def test_circuit_breaker_opens_and_half_opens() -> None:
    breaker = CircuitBreaker(failures=2, cooldown=0.05)
    breaker.record(False)
    assert not breaker.open
    breaker.record(False)
    assert breaker.open
    import time

    time.sleep(0.06)
    assert not breaker.open  # half-open: one may try
    breaker.record(True)
    assert not breaker.open
