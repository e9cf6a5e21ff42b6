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
evidence of its own evaluation.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import time
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
    ContextArm,
    ContextEvaluation,
    DistillContextRequest,
    DistillContextResult,
    DistillCycle,
    DistillEvaluateRequest,
    DistillEvaluation,
    DistillPrepared,
    DistillPrepareRequest,
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
from clawctl.serving.tier_call import ask_local, ask_remote

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


def _ledger_examples(
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


def _check_base(services: Services, base: str) -> None:
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


def _training_job(
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
    _check_base(services, request.base)
    if request.examples is not None:
        examples = request.examples
    else:
        examples = _ledger_examples(services, request.since, request.policy)
    if not examples:
        where = "the examples sent" if request.examples is not None else "the ledger"
        hint = "" if request.examples is not None else (
            " (a policy keeps escalations only with store_prompts = true)"
        )  # fmt: skip
        raise BadInput(f"no training examples in {where}{hint}")
    return _training_job(
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


def _held_out(directory: Path, limit: int | None) -> list[TrainExample]:
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
        examples = _held_out(run_dir(services, request.name), request.limit)
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


# --- context distillation ---------------------------------------------------------------

PASSAGE_WORDS = 120
QUESTION_PROMPT = (
    "Here is a passage:\n\n{passage}\n\nWrite one short question that this passage answers "
    "and that begins with '{opening}'. Reply with the question only."
)
# Two openings per passage: small teachers asked for "another" question repeat the first one.
OPENINGS = (("What", "How"), ("Who", "When"), ("Which", "How many"), ("Where", "What"))
DOCUMENT_PROMPT = "Answer the question from this document.\n\n{document}"
_QUESTION = re.compile(r"^\s*(?:(?:Q|Question)\s*\d*\s*[:.)]|\d+\s*[.)])?\s*([^?]{8,}\?)", re.I)


def passages(document: str, limit: int) -> list[str]:
    """The document as passages of up to about `PASSAGE_WORDS` words (paragraphs merged, long
    ones cut), spread evenly over it when there are more than `limit`."""
    pieces: list[str] = []
    current: list[str] = []
    for paragraph in re.split(r"\n\s*\n", document):
        words = paragraph.split()
        while words:
            room = PASSAGE_WORDS - len(current)
            if room <= 0 or (current and len(words) > room):
                pieces.append(" ".join(current))
                current = []
                room = PASSAGE_WORDS
            current.extend(words[:room])
            words = words[room:]
    if current:
        pieces.append(" ".join(current))
    if len(pieces) <= limit:
        return pieces
    return [pieces[round(i * (len(pieces) - 1) / (limit - 1))] for i in range(limit)]


def parse_questions(text: str) -> list[str]:
    """The questions in a teacher's answer: lines like `…?`, `Q: …?`, `Q1. …?` or `1) …?`."""
    found = []
    for line in text.splitlines():
        match = _QUESTION.match(line)
        if match and match.group(1).strip() not in found:
            found.append(match.group(1).strip())
    return found


class _Teacher:
    """The stronger model that writes and answers the questions: a model clawd serves, or a
    policy's remote tier."""

    def __init__(self, services: Services, request: DistillContextRequest) -> None:
        self.services = services
        if (request.teacher is None) == (request.policy is None):
            raise BadInput("name the teacher: a model (teacher) or a policy's remote tier (policy)")
        if request.policy is not None:
            policy = self.services.policies.get(request.policy).policy
            remote = [t for t in policy.tiers if t.kind == "remote"]
            if not remote:
                raise BadInput(f"policy {request.policy!r} has no remote tier to teach with")
            self.tier, self.label = remote[0], f"{request.policy}/{remote[0].name}"
        else:
            assert request.teacher is not None
            services.store.get(request.teacher)
            self.tier = Tier(name="teacher", kind="local", model=request.teacher)
            self.label = request.teacher

    async def ask(self, prompt: Prompt, max_tokens: int) -> str:
        if self.tier.kind == "remote":
            answer = await ask_remote(self.services, self.tier, prompt, max_tokens)
        else:
            answer = await ask_local(self.services, self.tier, prompt, max_tokens, APP)
        return answer.text.strip()


def _with_document(document: str, question: str) -> Prompt:
    return Prompt(
        chat=(
            ChatTurn("system", DOCUMENT_PROMPT.format(document=document)),
            ChatTurn("user", question),
        )
    )


def _alone(question: str) -> Prompt:
    return Prompt(chat=(ChatTurn("user", question),))


async def context(services: Services, request: DistillContextRequest) -> AsyncIterator[JobLine]:
    try:
        async for line in _context(services, request):
            yield line
    except ClawError as exc:
        yield ErrorLine(message=exc.message, code=exc.code, status=exc.http_status)


def check_context(services: Services, request: DistillContextRequest) -> _Teacher:
    """What can be refused before the stream starts (a 4xx with nothing written)."""
    _check_base(services, request.base)
    return _Teacher(services, request)


async def _context(services: Services, request: DistillContextRequest) -> AsyncIterator[JobLine]:
    teacher = check_context(services, request)
    chosen = passages(request.document, request.passages)
    yield StartLine(description=f"{teacher.label} writes questions", total=len(chosen))
    pairs: list[tuple[str, str]] = []
    for index, passage in enumerate(chosen):
        # one question a call (asked for two, small teachers write one and answer it)
        questions: list[str] = []
        for opening in OPENINGS[index % len(OPENINGS)]:
            asking = QUESTION_PROMPT.format(passage=passage, opening=opening)
            found = parse_questions(await teacher.ask(_alone(asking), 48))[:1]
            questions += [q for q in found if q.casefold() not in map(str.casefold, questions)]
        if len(questions) >= 2:
            pairs.append((questions[0], questions[1]))
        yield AdvanceLine(amount=1)
    if len(pairs) < 2:
        raise BadInput(
            f"the teacher {teacher.label} wrote questions for {len(pairs)} of {len(chosen)} "
            "passages; a stronger teacher is needed"
        )
    yield StartLine(description="answering with the document", total=2 * len(pairs))
    firsts: list[tuple[str, str]] = []
    seconds: list[tuple[str, str]] = []
    for first, second in pairs:
        for question, kept in ((first, firsts), (second, seconds)):
            reply = await teacher.ask(
                _with_document(request.document, question), request.max_tokens
            )
            kept.append((question, reply))
            yield AdvanceLine(amount=1)
    # the second question of each passage comes last: the split holds it out
    ordered = [*firsts, *seconds]
    examples = [
        TrainExample(messages=[EvalMessage(role="user", content=q)], answer=a, ts=float(i))
        for i, (q, a) in enumerate(ordered)
        if a
    ]
    job = _training_job(
        services, request.base, request.name, examples, request.options, request.restart
    )
    trained: DistillTrainResult | None = None
    async for line in run_build(TRAIN_OP, job.model_dump(mode="json")):
        if isinstance(line, ResultLine):
            trained = DistillTrainResult.model_validate(line.result)
        else:
            yield line
            if isinstance(line, ErrorLine):
                return
    assert trained is not None
    held = _held_out(run_dir(services, request.name), None)
    if not held:
        raise BadInput("no held-out questions are left to evaluate on")
    plain = Tier(name="local", kind="local", model=request.base)
    adapted = plain.model_copy(update={"adapters": (AdapterUse(name=request.name),)})
    yield StartLine(description="evaluating", total=len(held))
    arms = {"document": [0, 0], "adapter": [0, 0], "neither": [0, 0]}
    for example in held:
        question = example.messages[-1].content
        asks = (
            ("document", plain, _with_document(request.document, question)),
            ("adapter", adapted, _alone(question)),
            ("neither", plain, _alone(question)),
        )
        for arm, tier, prompt in asks:
            answer = await ask_local(services, tier, prompt, request.max_tokens, APP)
            arms[arm][0] += agrees(answer.text, example.answer)
            arms[arm][1] += answer.prompt_tokens
        yield AdvanceLine(amount=1)
    n = len(held)
    scores = {k: ContextArm(agreed=v[0], prompt_tokens=v[1]) for k, v in arms.items()}
    evaluation = ContextEvaluation(
        questions=n,
        with_document=scores["document"],
        with_adapter=scores["adapter"],
        neither=scores["neither"],
        document_tokens=round(
            (scores["document"].prompt_tokens - scores["neither"].prompt_tokens) / n
        ),
        saved_per_request=round(
            (scores["document"].prompt_tokens - scores["adapter"].prompt_tokens) / n, 1
        ),
    )
    result = DistillContextResult(
        trained=trained, evaluation=evaluation, passages=len(chosen),
        questions_written=2 * len(pairs),
        teacher=teacher.label,
    )  # fmt: skip
    atomic_write(
        run_dir(services, request.name) / "context-evaluation.json",
        result.model_dump_json(indent=2).encode(),
    )
    yield ResultLine(result=result.model_dump(mode="json"))


# --- the off-peak worker's cycle ---------------------------------------------------------


def prepare_cycle(services: Services, request: DistillPrepareRequest) -> DistillPrepared:
    """Write the policy's escalations since its last trained cycle into a new run directory;
    with fewer than `min_examples`, record a skipped cycle instead."""
    found = services.policies.get(request.policy)
    local = [t for t in found.policy.tiers if t.kind == "local"]
    if request.base is None and not local:
        raise BadInput(f"policy {request.policy!r} has no local tier to train an adapter for")
    base = request.base or local[0].model
    now = time.time()
    trained = [c for c in services.ledger.cycles(request.policy) if c.outcome != "skipped"]
    since = trained[-1].ts if trained else None
    examples = _ledger_examples(services, since, request.policy)
    if len(examples) < request.min_examples:
        cycle = DistillCycle(
            ts=now, policy=request.policy, adapter=None, examples=len(examples),
            outcome="skipped",
            detail=f"{len(examples)} new escalations, fewer than {request.min_examples}",
        )  # fmt: skip
        services.ledger.record_cycle(cycle)
        return DistillPrepared(job=None, examples=len(examples), prepared_at=now, cycle=cycle)
    _check_base(services, base)
    name = f"{request.policy}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now))}"
    job = _training_job(services, base, name, examples, request.options, False)
    return DistillPrepared(job=job, examples=len(examples), prepared_at=now)
