"""`clawctl distill`: turn escalations into fine-tuning data for a LoRA of the local model."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from clawctl.cli._console import RichProgress, emit_json, err, out, table
from clawctl.cli._options import JsonOption, parse_duration
from clawctl.errors import BadInput, ClawError

if TYPE_CHECKING:
    from clawctl.schemas.distill import DistillCycle, DistillPromotion, TrainExample

app = typer.Typer(
    help="Distillation: train LoRA adapters from escalations, evaluate, promote, roll back.",
    no_args_is_help=True,
)


@app.command()
def export(
    out: Annotated[Path, typer.Option("--out", help="JSONL file to write (chat format).")],
    since: Annotated[str | None, typer.Option(help="Only the last span, e.g. 7d.")] = None,
    policy: Annotated[str | None, typer.Option(help="Only this policy's requests.")] = None,
) -> None:
    """Write escalated requests and their remote answers as `{"messages": [...]}` lines.

    Only policies with `store_prompts = true` keep prompts; see docs/adapters.md for the path
    from this file to a GGUF LoRA and back through `clawctl adapters install`.

    Example: clawctl distill export --since 30d --policy cascade --out escalations.jsonl
    """
    from clawctl.cli._client import daemon_client
    from clawctl.fsutil import atomic_write

    start = time.time() - parse_duration(since) if since else None
    with daemon_client() as client:
        data = b"".join(client.distill_export(start, policy))
    atomic_write(out, data)
    examples = data.count(b"\n")
    err.print(f"wrote {examples} examples to {out}")


def _read_examples(path: Path) -> list[TrainExample]:
    """A chat-format (`{"messages": [..., assistant]}`) or OpenAI Evals (`input`, `ideal`)
    JSONL file as training examples; a bad line is named with its number."""
    import json

    from clawctl.schemas.distill import TrainExample
    from clawctl.schemas.policy import EvalMessage

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read {path}: {exc}") from None
    examples = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
            if "answer" in row:  # this module's own format (a run's examples.jsonl)
                examples.append(TrainExample.model_validate(row))
            elif "messages" in row:
                turns = [EvalMessage.model_validate(m) for m in row["messages"]]
                if len(turns) < 2 or turns[-1].role != "assistant":
                    raise BadInput(f"{where}: the last message must be the assistant's answer")
                examples.append(TrainExample(messages=turns[:-1], answer=turns[-1].content))
            elif "input" in row:
                ideal = row["ideal"][0] if isinstance(row["ideal"], list) else row["ideal"]
                turns = [EvalMessage.model_validate(m) for m in row["input"]]
                examples.append(TrainExample(messages=turns, answer=str(ideal), ideal=str(ideal)))
            else:
                raise ValueError(row)
        except BadInput:
            raise
        except (ValueError, KeyError, TypeError, IndexError):
            raise BadInput(
                f"{where}: not a training example (chat 'messages' ending with the answer, or "
                "Evals 'input' and 'ideal')"
            ) from None
    if not examples:
        raise BadInput(f"{path} holds no examples")
    return examples


@app.command()
def train(
    base: Annotated[str, typer.Option("--base", help="The GGUF model the adapter is for.")],
    name: Annotated[str, typer.Option("--name", help="The adapter's name.")],
    data: Annotated[
        Path | None,
        typer.Option(help="Chat or Evals JSONL; default: the ledger's stored escalations."),
    ] = None,
    policy: Annotated[str | None, typer.Option(help="Ledger: this policy's escalations.")] = None,
    since: Annotated[str | None, typer.Option(help="Ledger: only the last span, e.g. 30d.")] = None,
    rank: Annotated[int, typer.Option(min=1, max=128)] = 8,
    alpha: Annotated[int, typer.Option(min=1, max=1024)] = 16,
    targets: Annotated[
        str, typer.Option(help="Comma-separated modules: q_proj,k_proj,v_proj,o_proj,…")
    ] = "q_proj,k_proj,v_proj,o_proj",
    epochs: Annotated[int, typer.Option(min=1, max=100)] = 3,
    learning_rate: Annotated[float, typer.Option("--lr", min=1e-7, max=1.0)] = 3e-4,
    held_out: Annotated[
        float, typer.Option(min=0.0, max=0.9, help="Newest share kept for evaluate.")
    ] = 0.2,
    replay: Annotated[
        float, typer.Option(min=0.0, max=2.0, help="Base answers replayed, per example.")
    ] = 0.25,
    max_tokens: Annotated[int, typer.Option(min=32, max=8192, help="Longest example.")] = 768,
    restart: Annotated[bool, typer.Option(help="Ignore an earlier run's checkpoint.")] = False,
    json_: JsonOption = False,
) -> None:
    """Fine-tune a LoRA for a GGUF model on the box (PEFT on the CPU, in a niced subprocess of
    clawd), convert it to GGUF, prove llama.cpp computes what PEFT computed, and install it.

    An interrupted run resumes from its checkpoint when run again with the same data and options.

    Example: clawctl distill train --base smollm2-135m --name support --policy cascade --since 30d
    Example: clawctl distill train --base smollm2-135m --name codes --data examples.jsonl
    """
    from clawctl.cli._client import daemon_client
    from clawctl.schemas.distill import TARGET_MODULES, DistillTrainRequest, TrainOptions

    chosen = tuple(t.strip() for t in targets.split(",") if t.strip())
    unknown = [t for t in chosen if t not in TARGET_MODULES]
    if unknown or not chosen:
        raise BadInput(f"unknown target modules {unknown}; choose from {', '.join(TARGET_MODULES)}")
    if data is not None and (policy or since):
        raise BadInput("--policy and --since select ledger examples; not with --data")
    request = DistillTrainRequest(
        base=base,
        name=name,
        examples=_read_examples(data) if data is not None else None,
        policy=policy,
        since=time.time() - parse_duration(since) if since else None,
        options=TrainOptions(
            rank=rank,
            alpha=alpha,
            targets=chosen,
            epochs=epochs,
            learning_rate=learning_rate,
            held_out=held_out,
            replay=replay,
            max_tokens=max_tokens,
        ),
        restart=restart,
    )
    with daemon_client() as client, RichProgress(steps=True) as progress:
        result = client.distill_train(request, progress)
    if json_:
        emit_json(result)
        return
    report, proof = result.report, result.proof
    out.print(
        f"installed adapter {result.adapter.name} for {result.adapter.base} "
        f"(rank {result.adapter.rank}, {len(result.adapter.targets)} tensors)",
        markup=False,
    )
    grid = table("", "")
    grid.add_row("examples", f"{report.examples} (+{report.replayed} replayed)")
    grid.add_row(
        "held out", f"{report.held_out} ({report.dropped_near_duplicates} near-dups dropped)"
    )
    grid.add_row("steps", f"{report.steps} (resumed at {report.resumed_from_step})")
    grid.add_row("loss", f"{report.first_loss:.3f} → {report.last_loss:.3f}")
    if report.held_out_loss_before is not None and report.held_out_loss_after is not None:
        grid.add_row(
            "held-out loss", f"{report.held_out_loss_before:.3f} → {report.held_out_loss_after:.3f}"
        )
    grid.add_row("speed", f"{report.tokens_per_second:.0f} tokens/s, {report.seconds:.0f} s")
    grid.add_row(
        "proof",
        f"logit change correlation {proof.correlation:.4f} (≥ {proof.threshold}), "
        f"size ratio {proof.scale_ratio:.3f}; on the quantized base {proof.served_correlation:.4f}",
    )
    out.print(grid)


@app.command()
def context(
    document: Annotated[Path, typer.Argument(help="The document requests keep carrying.")],
    base: Annotated[str, typer.Option("--base", help="The GGUF model the adapter is for.")],
    name: Annotated[str, typer.Option("--name", help="The adapter's name.")],
    teacher: Annotated[
        str | None, typer.Option(help="A model clawd serves that writes and answers questions.")
    ] = None,
    policy: Annotated[
        str | None, typer.Option(help="Or: teach with this policy's remote tier.")
    ] = None,
    passages: Annotated[int, typer.Option(min=2, max=500, help="Passages asked about.")] = 24,
    epochs: Annotated[int, typer.Option(min=1, max=100)] = 4,
    learning_rate: Annotated[float, typer.Option("--lr", min=1e-7, max=1.0)] = 1e-3,
    restart: Annotated[bool, typer.Option(help="Ignore an earlier run's checkpoint.")] = False,
    json_: JsonOption = False,
) -> None:
    """Turn a long document into an adapter: the teacher writes two questions about each
    passage and answers them with the document in its prompt; the adapter learns the answers
    from the first questions alone, and the second ones measure it: answered without the
    document but with the adapter, against with the document and without it.

    Example: clawctl distill context handbook.md --base smollm2-135m --name handbook
    --teacher qwen2.5-coder-0.5b
    """
    from clawctl.cli._client import daemon_client
    from clawctl.schemas.distill import DistillContextRequest, TrainOptions

    try:
        text = document.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read {document}: {exc}") from None
    if len(text.strip()) < 200:
        raise BadInput(f"{document} is too short to distill (under 200 characters)")
    request = DistillContextRequest(
        document=text,
        source=document.name,
        base=base,
        name=name,
        teacher=teacher,
        policy=policy,
        passages=passages,
        options=TrainOptions(held_out=0.5, epochs=epochs, learning_rate=learning_rate),
        restart=restart,
    )
    with daemon_client() as client, RichProgress(steps=True) as progress:
        result = client.distill_context(request, progress)
    if json_:
        emit_json(result)
        return
    ev = result.evaluation
    n = max(1, ev.questions)
    out.print(
        f"installed adapter {result.trained.adapter.name}: {result.questions_written} questions "
        f"by {result.teacher}, {ev.questions} held out; agreement with the teacher's answers:",
        markup=False,
    )
    grid = table("", "AGREED", "PROMPT TOKENS / REQUEST")
    for label, arm in (
        ("document in the prompt", ev.with_document),
        ("adapter, no document", ev.with_adapter),
        ("neither", ev.neither),
    ):
        grid.add_row(label, f"{arm.agreed / n:.0%}", f"{arm.prompt_tokens / n:.0f}")
    out.print(grid)
    out.print(
        f"the adapter saves {ev.saved_per_request:.0f} prompt tokens a request "
        f"(the document is about {ev.document_tokens})",
        markup=False,
    )


@app.command()
def evaluate(
    name: Annotated[str, typer.Argument(help="The trained adapter (its run's name).")],
    policy: Annotated[str, typer.Option(help="The policy to evaluate under.")] = "cascade",
    data: Annotated[
        Path | None,
        typer.Option(help="Evaluate on this Evals or chat JSONL instead of the held-out split."),
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="First N examples.")] = None,
    canary_limit: Annotated[int | None, typer.Option(min=0, help="First N canaries.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens per answer.")] = 96,
    json_: JsonOption = False,
) -> None:
    """Replay the run's held-out examples through the policy with and without the adapter, and
    the canary set through its local tier: accuracy (or agreement with the stronger tier),
    escalations, tokens and cost, and whether promotion's gate passes.

    Example: clawctl distill evaluate support --policy cascade
    Example: clawctl distill evaluate support --policy cascade --data labelled.jsonl
    """
    from clawctl.cli._client import daemon_client
    from clawctl.schemas.distill import DistillEvaluateRequest

    request = DistillEvaluateRequest(
        name=name,
        policy=policy,
        examples=_read_examples(data) if data is not None else None,
        limit=limit,
        canary_limit=canary_limit,
        max_tokens=max_tokens,
    )
    with daemon_client() as client, RichProgress(steps=True) as progress:
        evaluation = client.distill_evaluate(request, progress)
    if json_:
        emit_json(evaluation)
        return
    n, c = max(1, evaluation.examples), max(1, evaluation.canary)
    grid = table("", "WITHOUT", "WITH " + evaluation.name)
    arms = (evaluation.without, evaluation.with_adapter)
    label = "accuracy" if evaluation.grading == "ideal" else "agreement"
    grid.add_row(label, *(f"{a.correct / n:.0%}" for a in arms))
    grid.add_row("escalated", *(f"{a.escalated / n:.0%}" for a in arms))
    grid.add_row("tokens", *(f"{a.prompt_tokens + a.completion_tokens:,}" for a in arms))
    grid.add_row("cost / 1,000", *(f"{a.cost / n * 1000:.4g}" for a in arms))
    grid.add_row("canary", *(f"{a.canary_correct / c:.0%}" for a in arms))
    out.print(
        f"{evaluation.examples} held-out examples and {evaluation.canary} canaries under "
        f"{evaluation.policy} (tier {evaluation.tier})",
        markup=False,
    )
    out.print(grid)
    verdict = "passes" if evaluation.verdict.passed else "fails"
    out.print(f"gate {verdict}: " + "; ".join(evaluation.verdict.reasons), markup=False)


@app.command()
def promote(
    name: Annotated[str, typer.Argument(help="The evaluated adapter.")],
    policy: Annotated[str, typer.Option(help="The policy whose local tier gets it.")] = "cascade",
    min_escalation_drop: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, help="Gate: escalation rate must fall by.")
    ] = None,
    max_accuracy_drop: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, help="Gate: accuracy may fall by.")
    ] = None,
    canary_tolerance: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, help="Gate: canary may fall by.")
    ] = None,
    force: Annotated[bool, typer.Option(help="Promote even if the gate fails.")] = False,
    json_: JsonOption = False,
) -> None:
    """Put the adapter on the policy's local tier, if its evaluation passed the gate; the
    previous adapters are kept for `rollback`.

    Example: clawctl distill promote support --policy cascade
    """
    from clawctl.cli._client import daemon_client
    from clawctl.schemas.distill import DistillPromoteRequest, GateSettings

    gate = None
    given = (min_escalation_drop, max_accuracy_drop, canary_tolerance)
    if any(v is not None for v in given):
        defaults = GateSettings()
        gate = GateSettings(
            min_escalation_drop=_or(min_escalation_drop, defaults.min_escalation_drop),
            max_accuracy_drop=_or(max_accuracy_drop, defaults.max_accuracy_drop),
            canary_tolerance=_or(canary_tolerance, defaults.canary_tolerance),
        )
    request = DistillPromoteRequest(name=name, policy=policy, gate=gate, force=force)
    with daemon_client() as client:
        promotion = client.distill_promote(request)
    _render_promotion(promotion, json_)


@app.command()
def rollback(
    policy: Annotated[str, typer.Option(help="The policy to roll back.")] = "cascade",
    json_: JsonOption = False,
) -> None:
    """Give the policy's local tier back the adapters it had before its latest promotion.

    Example: clawctl distill rollback --policy cascade
    """
    from clawctl.cli._client import daemon_client
    from clawctl.schemas.distill import DistillRollbackRequest

    with daemon_client() as client:
        promotion = client.distill_rollback(DistillRollbackRequest(policy=policy))
    _render_promotion(promotion, json_)


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _render_promotion(promotion: DistillPromotion, json_: bool) -> None:
    if json_:
        emit_json(promotion)
        return
    before = ", ".join(promotion.before) or "no adapter"
    after = ", ".join(promotion.after) or "no adapter"
    out.print(
        f"{promotion.policy} tier {promotion.tier}: {before} → {after} ({promotion.path})",
        markup=False,
    )


@app.command()
def cycle(
    policy: Annotated[str, typer.Option(help="The policy whose escalations to learn from.")] = (
        "cascade"
    ),
    base: Annotated[
        str | None, typer.Option(help="Default: the model of the policy's first local tier.")
    ] = None,
    min_examples: Annotated[
        int, typer.Option(min=1, help="Fewer new escalations: skip this cycle.")
    ] = 20,
    epochs: Annotated[int, typer.Option(min=1, max=100)] = 3,
    json_: JsonOption = False,
) -> None:
    """One off-peak cycle (what clawd-distill.timer runs): train on the policy's escalations
    since the last cycle, in this process's own niced, CPU-capped unit; evaluate under the
    policy; promote through the gate; leave a ledger row of what it did (`distill history`).

    Example: clawctl distill cycle --policy cascade --min-examples 50
    """
    from clawctl.cli._client import daemon_client
    from clawctl.schemas.distill import (
        DistillCycle,
        DistillEvaluateRequest,
        DistillPrepareRequest,
        DistillPromoteRequest,
        TrainOptions,
    )

    with daemon_client() as client:
        prepared = client.distill_prepare(
            DistillPrepareRequest(
                policy=policy,
                base=base,
                min_examples=min_examples,
                options=TrainOptions(epochs=epochs),
            )
        )
        job = prepared.job
        if job is None:
            assert prepared.cycle is not None
            _render_cycle(prepared.cycle, json_)
            return
        done = DistillCycle(
            ts=prepared.prepared_at, policy=policy, adapter=job.name,
            examples=prepared.examples, outcome="failed", detail="",
        )  # fmt: skip
        try:
            with RichProgress(steps=True) as progress:
                _train_here(job.model_dump_json(), progress)
                evaluation = client.distill_evaluate(
                    DistillEvaluateRequest(name=job.name, policy=policy), progress
                )
        except ClawError as exc:
            done = done.model_copy(update={"detail": exc.message})
            client.distill_record(done)
            raise
        n = max(1, evaluation.examples)
        scores = {
            "escalated_before": evaluation.without.escalated / n,
            "escalated_after": evaluation.with_adapter.escalated / n,
            "accuracy_before": evaluation.without.correct / n,
            "accuracy_after": evaluation.with_adapter.correct / n,
            "detail": "; ".join(evaluation.verdict.reasons),
        }
        if evaluation.verdict.passed:
            client.distill_promote(DistillPromoteRequest(name=job.name, policy=policy))
            done = done.model_copy(update={"outcome": "promoted", **scores})
        else:
            done = done.model_copy(update={"outcome": "refused", **scores})
        client.distill_record(done)
    _render_cycle(done, json_)


def _train_here(job_json: str, progress: RichProgress) -> None:
    """Run the training build operation as a child of this process (so the unit's Nice,
    CPUQuota and IOSchedulingClass apply to it), with this process's environment: the
    worker's unit gives it the daemon's user and data directory."""
    import subprocess
    import sys

    from clawctl.client import follow_job
    from clawctl.schemas.distill import DistillTrainResult

    command = [sys.executable, "-m", "clawctl.build", "distill_train", job_json]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as child:
        assert child.stdout is not None
        assert child.stderr is not None
        if follow_job(child.stdout, DistillTrainResult, progress) is not None:
            return
        stderr = child.stderr.read().strip().splitlines()
    raise ClawError(
        f"training ended without a result: {stderr[-1] if stderr else child.returncode}"
    )


@app.command()
def history(
    policy: Annotated[str | None, typer.Option(help="Only this policy's cycles.")] = None,
    json_: JsonOption = False,
) -> None:
    """What the off-peak cycles did: trained, promoted, refused or skipped, and why.

    Example: clawctl distill history --policy cascade
    """
    from clawctl.cli._client import daemon_client

    with daemon_client() as client:
        listing = client.distill_cycles(policy)
    if json_:
        emit_json(listing)
        return
    grid = table("WHEN", "POLICY", "ADAPTER", "EXAMPLES", "OUTCOME", "ESCALATED", "DETAIL")
    for row in listing.cycles:
        escalated = (
            f"{row.escalated_before:.0%} → {row.escalated_after:.0%}"
            if row.escalated_before is not None and row.escalated_after is not None
            else "-"
        )
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(row.ts))
        grid.add_row(
            when, row.policy, row.adapter or "-", str(row.examples), row.outcome, escalated,
            row.detail,
        )  # fmt: skip
    out.print(grid)


def _render_cycle(done: DistillCycle, json_: bool) -> None:
    if json_:
        emit_json(done)
        return
    out.print(
        f"{done.policy}: {done.outcome}"
        + (f" adapter {done.adapter}" if done.adapter else "")
        + f" ({done.examples} examples) - {done.detail}",
        markup=False,
    )
