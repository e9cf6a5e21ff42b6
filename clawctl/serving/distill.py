"""Distillation inside clawd: preparing a training run, evaluating an adapter under a policy,
promoting it into the policy's local tier and rolling back.

Why here: the ledger's escalations, the models, the adapters and the policies are the daemon's.
Training itself runs in a niced build subprocess (`build/distill_ops.py`); clawd only writes the
examples into the run directory `<data>/distill/runs/<name>/` and relays the job's lines.

The evaluation replays the run's held-out split (the newest examples, kept out of training)
through the policy twice, as requests of their own (no answer cache): once as the policy stands,
once with the adapter on its local tiers. An example is right when the answer matches its label
(`grade`), or, unlabelled, when it agrees with the stronger tier's answer it was escalated for
(`agrees`). The canary set (general questions shipped with clawctl) goes to the local tier alone,
with and without the adapter: what the adapter must not make the model forget. The evaluation is
stored beside the run, and promotion reads it, so an adapter reaches a policy only on the
evidence of its own evaluation. Context distillation (`distill_context.py`) and the off-peak
worker's side (`distill_cycle.py`) build on the run directories kept here.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from clawctl.engines.base import ChatTurn, Prompt, SamplingParams
from clawctl.errors import BadInput, ClawError, NotFound
from clawctl.fsutil import atomic_write
from clawctl.resources import bundled_dir
from clawctl.routing.calibrate import agrees, grade
from clawctl.routing.policy_store import PolicyFile
from clawctl.schemas.distill import (
    CANARY_FILE,
    DISTILL_ARCHITECTURES,
    ArmScore,
    DistillEvaluateRequest,
    DistillEvaluation,
    DistillPromoteRequest,
    DistillPromotion,
    DistillRollbackRequest,
    DistillTrainJob,
    DistillTrainRequest,
    DistillTrainResult,
    GateSettings,
    GateVerdict,
    TrainExample,
    TrainOptions,
)
from clawctl.schemas.jobs import AdvanceLine, ErrorLine, JobLine, ResultLine, StartLine
from clawctl.schemas.openai import AdapterChoice, ClawRequest
from clawctl.schemas.policy import AdapterUse, EvalMessage, Tier, parse_evals
from clawctl.services import Services
from clawctl.serving.build_runner import run_build
from clawctl.serving.tier_call import ask_local

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

APP = "clawctl-distill"
TRAIN_OP = "distill_train"


def _runs(services: Services) -> Path:
    return services.store.paths.data_dir / "distill" / "runs"


def run_dir(services: Services, name: str) -> Path:
    """Where a training run keeps its examples, split, checkpoint and results."""
    return _runs(services) / name


def ledger_examples(
    services: Services, since: float | None, policy: str | None
) -> list[TrainExample]:
    """The ledger's stored escalations as training examples (text turns only)."""
    found = []
    for stored in services.ledger.examples(since, policy):
        turns = [
            EvalMessage(role=m["role"], content=m["content"])
            for m in stored.messages
            if m.get("role") in ("system", "user", "assistant")
            and isinstance(m.get("content"), str)
        ]
        if turns and turns[-1].role == "user" and stored.answer.strip():
            found.append(TrainExample(messages=turns, answer=stored.answer, ts=stored.ts))
    return found


def check_base(services: Services, base: str) -> None:
    """Refuse a base distill cannot train for, or an installation without the training tools."""
    missing = [m for m in ("torch", "transformers", "peft") if importlib.util.find_spec(m) is None]
    if missing:  # looked up, not imported: the daemon never loads them
        raise BadInput(
            f"training needs {', '.join(missing)}, which this installation lacks: "
            "pip install 'clawctl[distill]' where clawd runs"
        )
    manifest = services.store.get(base)
    if manifest.format != "gguf" or manifest.gguf is None:
        raise BadInput(f"{base} is not a GGUF model; distill trains LoRAs for GGUF bases")
    architecture = manifest.gguf.architecture
    if architecture not in DISTILL_ARCHITECTURES:
        known = ", ".join(DISTILL_ARCHITECTURES)
        raise BadInput(
            f"distill trains adapters for the {known} architectures; {base} is {architecture!r}"
        )


def training_job(
    services: Services,
    base: str,
    name: str,
    examples: list[TrainExample],
    options: TrainOptions,
    restart: bool,
) -> DistillTrainJob:
    """Write the examples into the run directory: what the build subprocess trains on."""
    directory = run_dir(services, name)
    directory.mkdir(parents=True, exist_ok=True)
    text = "".join(e.model_dump_json() + "\n" for e in examples)
    atomic_write(directory / "examples.jsonl", text.encode())
    return DistillTrainJob(
        base=base,
        base_file=str(services.store.model_file(base)),
        name=name,
        run_dir=str(directory),
        options=options,
        restart=restart,
        label=f"distill:{name}",
    )


def prepare_training(services: Services, request: DistillTrainRequest) -> DistillTrainJob:
    """Check the request and write its examples into the run directory; nothing is written
    when it is refused."""
    check_base(services, request.base)
    if request.examples is not None:
        examples = request.examples
    else:
        examples = ledger_examples(services, request.since, request.policy)
    if not examples:
        where = "the examples sent" if request.examples is not None else "the ledger"
        hint = "" if request.examples is not None else (
            " (a policy keeps escalations only with store_prompts = true)"
        )  # fmt: skip
        raise BadInput(f"no training examples in {where}{hint}")
    return training_job(
        services, request.base, request.name, examples, request.options, request.restart
    )


async def run_training(job: DistillTrainJob) -> AsyncIterator[JobLine]:
    async for line in run_build(TRAIN_OP, job.model_dump(mode="json")):
        yield line


def _read_model(path: Path, model: type[Any], missing: str) -> Any:
    if not path.is_file():
        raise BadInput(missing)
    try:
        return model.model_validate_json(path.read_bytes())
    except ValidationError:
        raise BadInput(f"{path} is damaged; train again") from None


def trained(services: Services, name: str) -> DistillTrainResult:
    result: DistillTrainResult = _read_model(
        run_dir(services, name) / "result.json",
        DistillTrainResult,
        f"no finished training run named {name!r}; see 'clawctl distill train'",
    )
    return result


def _local_tier(found: PolicyFile, base: str) -> Tier:
    for tier in found.policy.tiers:
        if tier.kind == "local" and tier.model == base:
            return tier
    raise BadInput(f"policy {found.policy.name!r} has no local tier running {base}")


def held_out(directory: Path, limit: int | None) -> list[TrainExample]:
    path = directory / "held_out.jsonl"
    examples = [
        TrainExample.model_validate_json(line)
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    return examples[:limit] if limit else examples


def canary_set(limit: int | None = None) -> list[tuple[str, str]]:
    """The shipped canary questions (Evals lines) as (question, ideal)."""
    text = (bundled_dir("models") / CANARY_FILE).read_text(encoding="utf-8")
    examples = parse_evals(text, CANARY_FILE)
    pairs = [(e.input[-1].content, e.ideal_text) for e in examples]
    return pairs[:limit] if limit is not None else pairs


def _chat(messages: list[EvalMessage]) -> Prompt:
    return Prompt(chat=tuple(ChatTurn(m.role, m.content) for m in messages))


async def _through_policy(
    services: Services, policy: str, example: TrainExample, adapter: str | None, max_tokens: int
) -> tuple[bool, bool, int, int, float]:
    """(right, escalated, prompt tokens, completion tokens, cost) of one example answered
    through the whole policy."""
    from clawctl.serving.dedup import begin
    from clawctl.serving.generation import GenerationRun

    run = GenerationRun(
        services,
        "chat",
        policy,
        _chat(example.messages),
        SamplingParams(max_tokens=max_tokens, temperature=0.0),
        ClawRequest(
            app=APP, cache=False, adapters=[AdapterChoice(name=adapter)] if adapter else []
        ),
        None,
    )
    await begin(run)
    text = await run.answer()
    info = run.info()
    right = grade(text, example.ideal) if example.ideal else agrees(text, example.answer)
    prompt = sum(u.prompt_tokens for u in info.usage_by_tier.values())
    completion = sum(u.completion_tokens for u in info.usage_by_tier.values())
    return right, info.escalated, prompt, completion, info.cost


def judge(evaluation: DistillEvaluation, gate: GateSettings) -> GateVerdict:
    """Whether the adapter earned promotion, each check with its numbers."""
    n, c = max(1, evaluation.examples), max(1, evaluation.canary)
    base, new = evaluation.without, evaluation.with_adapter
    esc_before, esc_after = base.escalated / n, new.escalated / n
    acc_before, acc_after = base.correct / n, new.correct / n
    can_before, can_after = base.canary_correct / c, new.canary_correct / c
    reasons, passed = [], True
    drop_ok = esc_after <= esc_before - gate.min_escalation_drop
    if gate.require_escalation_drop:
        drop_ok = drop_ok and esc_after < esc_before
    passed &= drop_ok
    reasons.append(
        f"escalations {esc_before:.0%} -> {esc_after:.0%} "
        f"({'ok' if drop_ok else 'not down enough'})"
    )
    acc_ok = acc_after >= acc_before - gate.max_accuracy_drop - 1e-9
    passed &= acc_ok
    reasons.append(f"accuracy {acc_before:.0%} -> {acc_after:.0%} ({'ok' if acc_ok else 'down'})")
    can_ok = evaluation.canary == 0 or can_after >= can_before - gate.canary_tolerance - 1e-9
    passed &= can_ok
    reasons.append(
        f"canary {can_before:.0%} -> {can_after:.0%} "
        f"({'ok' if can_ok else f'beyond the {gate.canary_tolerance:.0%} tolerance'})"
    )
    return GateVerdict(passed=passed, reasons=reasons)


def _evaluation_path(services: Services, name: str, policy: str) -> Path:
    return run_dir(services, name) / f"evaluation-{policy}.json"


async def evaluate(
    services: Services, found: PolicyFile, request: DistillEvaluateRequest, gate: GateSettings
) -> AsyncIterator[JobLine]:
    try:
        async for line in _evaluate(services, found, request, gate):
            yield line
    except ClawError as exc:
        yield ErrorLine(message=exc.message, code=exc.code, status=exc.http_status)


async def _evaluate(
    services: Services, found: PolicyFile, request: DistillEvaluateRequest, gate: GateSettings
) -> AsyncIterator[JobLine]:
    result = trained(services, request.name)
    adapter = services.adapters.get(result.adapter.base, request.name)
    tier = _local_tier(found, adapter.base)
    if request.examples is not None:
        examples = request.examples[: request.limit] if request.limit else request.examples
    else:
        examples = held_out(run_dir(services, request.name), request.limit)
    if not examples:
        raise BadInput(f"run {request.name!r} kept no held-out examples to evaluate on")
    canary = canary_set(request.canary_limit)
    with_tier = tier.model_copy(update={"adapters": (AdapterUse(name=request.name),)})
    yield StartLine(description="evaluating", total=2 * (len(examples) + len(canary)))
    arms: list[ArmScore] = []
    for name, local in ((None, tier), (request.name, with_tier)):
        correct = escalated = prompt = completion = canary_right = 0
        cost = 0.0
        for example in examples:
            right, up, p, c, spent = await _through_policy(
                services, found.policy.name, example, name, request.max_tokens
            )
            correct += right
            escalated += up
            prompt, completion, cost = prompt + p, completion + c, cost + spent
            yield AdvanceLine(amount=1)
        for question, ideal in canary:
            turn = Prompt(chat=(ChatTurn("user", question),))
            answer = await ask_local(services, local, turn, request.max_tokens, APP)
            canary_right += grade(answer.text, ideal)
            yield AdvanceLine(amount=1)
        arms.append(
            ArmScore(
                correct=correct, escalated=escalated, prompt_tokens=prompt,
                completion_tokens=completion, cost=round(cost, 6), canary_correct=canary_right,
            )
        )  # fmt: skip
    evaluation = DistillEvaluation(
        name=request.name,
        base=adapter.base,
        policy=found.policy.name,
        tier=tier.name,
        adapter_digest=adapter.digest,
        examples=len(examples),
        canary=len(canary),
        grading="ideal" if all(e.ideal for e in examples) else "agreement",
        without=arms[0],
        with_adapter=arms[1],
        gate=gate,
        verdict=GateVerdict(passed=False, reasons=[]),
        evaluated_at=datetime.now(timezone.utc),
    )
    evaluation = evaluation.model_copy(update={"verdict": judge(evaluation, gate)})
    atomic_write(
        _evaluation_path(services, request.name, found.policy.name),
        evaluation.model_dump_json(indent=2).encode(),
    )
    yield ResultLine(result=evaluation.model_dump(mode="json"))


class _History(BaseModel):
    entries: list[DistillPromotion] = []


def _history_path(services: Services, policy: str) -> Path:
    return services.store.paths.data_dir / "distill" / "promotions" / f"{policy}.json"


def _history(services: Services, policy: str) -> _History:
    path = _history_path(services, policy)
    if not path.is_file():
        return _History()
    return _History.model_validate_json(path.read_bytes())


def _with_adapters(found: PolicyFile, tier: str, names: list[str]) -> str:
    """The policy's text with the tier's adapters replaced by `names` (scale 1)."""
    import tomli_w

    data: dict[str, Any] = tomllib.loads(found.path.read_text(encoding="utf-8"))
    for entry in data.get("tiers", []):
        if entry.get("name") == tier:
            if names:
                entry["adapters"] = [{"name": n, "scale": 1.0} for n in names]
            else:
                entry.pop("adapters", None)
    return tomli_w.dumps(data)


def _record(
    services: Services,
    found: PolicyFile,
    tier: Tier,
    after: list[str],
    action: Literal["promote", "rollback"],
) -> DistillPromotion:
    before = [a.name for a in tier.adapters]
    installed = services.policies.install(
        _with_adapters(found, tier.name, after), f"distill {action}"
    )
    entry = DistillPromotion(
        policy=found.policy.name, tier=tier.name, before=before, after=after,
        path=str(installed.path), at=datetime.now(timezone.utc), action=action,
    )  # fmt: skip
    history = _history(services, found.policy.name)
    history.entries.append(entry)
    atomic_write(_history_path(services, found.policy.name), history.model_dump_json().encode())
    return entry


def promote(
    services: Services, found: PolicyFile, request: DistillPromoteRequest
) -> DistillPromotion:
    """Put the adapter on the policy's local tier if its evaluation passed the gate."""
    evaluation: DistillEvaluation = _read_model(
        _evaluation_path(services, request.name, found.policy.name),
        DistillEvaluation,
        f"adapter {request.name!r} has not been evaluated under {found.policy.name!r}; "
        f"run 'clawctl distill evaluate {request.name} --policy {found.policy.name}'",
    )
    adapter = services.adapters.get(evaluation.base, request.name)
    if adapter.digest != evaluation.adapter_digest:
        raise BadInput(f"adapter {request.name!r} changed since its evaluation; evaluate again")
    verdict = judge(evaluation, request.gate or evaluation.gate)
    if not verdict.passed and not request.force:
        raise BadInput("promotion refused: " + "; ".join(verdict.reasons))
    tier = _local_tier(found, evaluation.base)
    return _record(services, found, tier, [request.name], "promote")


def rollback(
    services: Services, found: PolicyFile, request: DistillRollbackRequest
) -> DistillPromotion:
    """Give the policy's tier back the adapters it had before its latest promotion."""
    history = _history(services, found.policy.name)
    current = {t.name: [a.name for a in t.adapters] for t in found.policy.tiers}
    for entry in reversed(history.entries):
        if entry.action == "promote" and current.get(entry.tier) == entry.after:
            tier = next(t for t in found.policy.tiers if t.name == entry.tier)
            return _record(services, found, tier, entry.before, "rollback")
    raise NotFound(f"policy {found.policy.name!r} has no promotion to roll back")
