"""Distillation's types as they cross the admin API and the build subprocess: training examples,
training options, the train / evaluate / promote requests and their results.

A training example is a prompt (chat turns) and the answer the model should learn to give: the
answer of the tier an escalation went to (from the ledger, `store_prompts = true`), or a line of
a chat-format or OpenAI Evals JSONL file. `ideal` is a label when the example has one; the
evaluation grades with it, and without one it compares with `answer` (the stronger tier's).
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from clawctl.schemas.adapters import AdapterManifest
from clawctl.schemas.policy import EvalMessage

ADAPTER_NAME = r"^[a-z0-9][a-z0-9._-]{0,79}$"
# The layouts the GGUF converter knows (build/distill/lora_gguf.py); a base of another is refused.
DISTILL_ARCHITECTURES = ("llama", "qwen2")
# Labelled general questions (OpenAI Evals lines, shipped in models/) the adapter must not forget.
CANARY_FILE = "distill_canary.jsonl"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainExample(_Strict):
    messages: list[EvalMessage] = Field(min_length=1)
    answer: str = Field(min_length=1)
    ideal: str | None = None
    ts: float | None = None  # when it was asked (the ledger's time); orders the held-out split


class TrainOptions(_Strict):
    """Defaults sized for a 135M-0.5B model on two CPU cores: a few minutes per hundred
    examples."""

    rank: int = Field(8, ge=1, le=128)
    alpha: int = Field(16, ge=1, le=1024)
    targets: tuple[str, ...] = Field(
        ("q_proj", "k_proj", "v_proj", "o_proj"), min_length=1, max_length=7
    )
    epochs: int = Field(3, ge=1, le=100)
    learning_rate: float = Field(3e-4, gt=0, le=1.0)
    held_out: float = Field(0.2, ge=0, le=0.9, description="The newest share, kept for evaluate.")
    replay: float = Field(
        0.25, ge=0, le=2.0, description="Base-model answers to generic prompts, per example."
    )
    max_tokens: int = Field(768, ge=32, le=8192, description="Longest example (prompt cut left).")
    accumulate: int = Field(4, ge=1, le=64, description="Examples per optimizer step.")
    checkpoint_every: int = Field(10, ge=1, le=10_000, description="Optimizer steps.")
    seed: int = 0


TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class DistillTrainRequest(_Strict):
    """`POST /admin/distill/train`: train a LoRA for `base` from the ledger's escalations (the
    default) or from the examples sent, and install it as adapter `name`."""

    base: str = Field(min_length=1)
    name: str = Field(pattern=ADAPTER_NAME)
    examples: list[TrainExample] | None = Field(None, max_length=100_000)
    policy: str | None = None  # ledger source: only this policy's escalations
    since: float | None = None  # ledger source: only escalations after this time
    options: TrainOptions = TrainOptions()
    restart: bool = Field(False, description="Drop a checkpoint of an earlier run of this name.")


class DistillTrainJob(_Strict):
    """What clawd hands the training subprocess: the run directory it prepared (examples
    written there) and the base model's file."""

    base: str
    base_file: str
    name: str
    run_dir: str
    options: TrainOptions
    restart: bool = False
    label: str


class TrainReport(BaseModel):
    examples: int
    held_out: int
    dropped_near_duplicates: int
    replayed: int
    steps: int
    resumed_from_step: int
    tokens: int
    seconds: float
    tokens_per_second: float
    first_loss: float
    last_loss: float
    held_out_loss_before: float | None
    held_out_loss_after: float | None


class LoraProof(BaseModel):
    """The adapter computes in llama.cpp what it computes in PEFT: the change in logits it
    causes, over every probe position and vocabulary entry, correlates this much, and is about
    as large."""

    correlation: float  # on the base's weights dequantized: the conversion alone (judged)
    served_correlation: float  # on the quantized base clawd serves (reported)
    prompts: int
    positions: int
    llama_delta_rms: float
    peft_delta_rms: float
    scale_ratio: float  # llama.cpp's change over PEFT's
    threshold: float
    passed: bool


class DistillTrainResult(BaseModel):
    adapter: AdapterManifest
    report: TrainReport
    proof: LoraProof
    run_dir: str


class GateSettings(_Strict):
    """What promotion requires of an evaluation."""

    min_escalation_drop: float = Field(
        0.0, ge=0, le=1, description="Escalation rate must fall by at least this (absolute)."
    )
    max_accuracy_drop: float = Field(0.0, ge=0, le=1)
    canary_tolerance: float = Field(0.02, ge=0, le=1)
    require_escalation_drop: bool = True


class DistillEvaluateRequest(_Strict):
    """`POST /admin/distill/evaluate`: the run's held-out split (or the examples sent: a
    labelled set of the user's) and the canary set through `policy`, with and without adapter
    `name` on its local tier."""

    name: str = Field(pattern=ADAPTER_NAME)
    policy: str = Field(min_length=1)
    examples: list[TrainExample] | None = Field(None, min_length=1, max_length=100_000)
    limit: int | None = Field(None, ge=1, le=10_000)
    canary_limit: int | None = Field(None, ge=0, le=10_000)
    max_tokens: int = Field(96, ge=1, le=4096)
    gate: GateSettings | None = None  # None: the defaults


class ArmScore(BaseModel):
    """One side of the evaluation (without or with the adapter)."""

    correct: int
    escalated: int
    prompt_tokens: int
    completion_tokens: int
    cost: float
    canary_correct: int


class GateVerdict(BaseModel):
    passed: bool
    reasons: list[str]


class DistillEvaluation(BaseModel):
    name: str
    base: str
    policy: str
    tier: str
    adapter_digest: str
    examples: int
    canary: int
    grading: Literal["ideal", "agreement"]
    without: ArmScore
    with_adapter: ArmScore
    gate: GateSettings
    verdict: GateVerdict
    evaluated_at: datetime


class DistillPromoteRequest(_Strict):
    name: str = Field(pattern=ADAPTER_NAME)
    policy: str = Field(min_length=1)
    gate: GateSettings | None = None  # None: the evaluation's own
    force: bool = False


class DistillPromotion(BaseModel):
    """A policy's local tier's adapters before and after a promotion (or a rollback)."""

    policy: str
    tier: str
    before: list[str]
    after: list[str]
    path: str
    at: datetime
    action: Literal["promote", "rollback"]


class DistillRollbackRequest(_Strict):
    policy: str = Field(min_length=1)


class DistillContextRequest(_Strict):
    """`POST /admin/distill/context`: turn a document that requests keep carrying into an
    adapter for `base`. The teacher (a model clawd serves, or `policy`'s remote tier) writes
    questions about each passage and answers them with the whole document in its prompt; the
    adapter learns the answers from the questions alone."""

    document: str = Field(min_length=200, max_length=400_000)
    source: str = Field("document", max_length=200)
    base: str = Field(min_length=1)
    name: str = Field(pattern=ADAPTER_NAME)
    teacher: str | None = None  # a model name clawd serves
    policy: str | None = None  # or this policy's first remote tier
    passages: int = Field(
        24, ge=2, le=500, description="Passages asked about (two questions each)."
    )
    max_tokens: int = Field(64, ge=8, le=1024, description="Tokens per teacher answer.")
    options: TrainOptions = TrainOptions(held_out=0.5, replay=0.25, epochs=4)
    restart: bool = False


class ContextArm(BaseModel):
    agreed: int  # answers agreeing with the teacher's (which had the document)
    prompt_tokens: int


class ContextEvaluation(BaseModel):
    """The held-out questions (the second question of each passage) answered by the local model
    three ways."""

    questions: int
    with_document: ContextArm  # the document in the prompt, no adapter
    with_adapter: ContextArm  # no document, the adapter
    neither: ContextArm  # no document, no adapter: the floor
    document_tokens: int
    saved_per_request: float  # prompt tokens the adapter saves against the document


class DistillContextResult(BaseModel):
    trained: DistillTrainResult
    evaluation: ContextEvaluation
    passages: int  # asked about
    questions_written: int  # two for each passage that got two distinct ones
    teacher: str


class DistillPrepareRequest(_Strict):
    """`POST /admin/distill/prepare`: the off-peak worker's first step. clawd writes the
    policy's escalations since its last trained cycle into a new run directory and returns the
    job the worker trains in its own (niced, CPU-capped) process; too few: a skipped cycle."""

    policy: str = Field(min_length=1)
    base: str | None = None  # None: the model of the policy's first local tier
    min_examples: int = Field(20, ge=1, le=100_000)
    options: TrainOptions = TrainOptions()


class DistillCycle(BaseModel):
    """What one off-peak cycle did: a row of the ledger's `distill_cycles` table."""

    ts: float
    policy: str
    adapter: str | None
    examples: int
    outcome: Literal["promoted", "refused", "skipped", "failed"]
    detail: str
    escalated_before: float | None = None
    escalated_after: float | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None


class DistillPrepared(BaseModel):
    job: DistillTrainJob | None  # None: skipped (see `cycle`)
    examples: int
    prepared_at: float  # the cycle's time: escalations after it wait for the next cycle
    cycle: DistillCycle | None = None  # the skipped cycle's ledger row


class DistillCycleListing(BaseModel):
    cycles: list[DistillCycle]
