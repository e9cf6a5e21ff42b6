"""Context distillation inside clawd: a document that requests keep carrying, turned into an
adapter (`clawctl distill context`).

A teacher (a model clawd serves, or a policy's remote tier) writes two questions about each
passage and answers them with the whole document in its prompt; the adapter learns the first
question of each passage without the document (the same training job as `distill train`), and
the second ones measure it: the local model answers them with the document in the prompt, with
the adapter alone, and with neither. See docs/distillation.md.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

from clawctl.engines.base import ChatTurn, Prompt
from clawctl.errors import BadInput, ClawError
from clawctl.fsutil import atomic_write
from clawctl.routing.calibrate import agrees
from clawctl.schemas.distill import (
    ContextArm,
    ContextEvaluation,
    DistillContextRequest,
    DistillContextResult,
    DistillTrainResult,
    TrainExample,
)
from clawctl.schemas.jobs import AdvanceLine, ErrorLine, JobLine, ResultLine, StartLine
from clawctl.schemas.policy import AdapterUse, EvalMessage, Tier
from clawctl.services import Services
from clawctl.serving.build_runner import run_build
from clawctl.serving.distill import APP, TRAIN_OP, check_base, held_out, run_dir, training_job
from clawctl.serving.tier_call import ask_local, ask_remote

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
    check_base(services, request.base)
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
    job = training_job(
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
    held = held_out(run_dir(services, request.name), None)
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
