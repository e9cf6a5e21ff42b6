"""Build operation `distill_train` (registered in build/ops.py): train a LoRA on the examples
clawd wrote into the run directory, convert it to GGUF, prove the conversion, install it.

The adapter reaches the store only after the proof passed, so a failed run leaves the store as
it was; the run directory keeps the split, the replayed answers, the checkpoint and the
converted file for a rerun (which resumes) or a look.
"""

from __future__ import annotations

import json
from pathlib import Path

from clawctl.build.distill.examples import generic_prompts, read_examples, split, write_examples
from clawctl.build.distill.lora_gguf import check_architecture, write_lora_gguf
from clawctl.build.distill.proof import THRESHOLD, prove
from clawctl.build.distill.trainer import Checkpoint, config_key, encode, load_base, train
from clawctl.build.jobstream import LineProgress, LineWriter
from clawctl.build.ops import op
from clawctl.build.quantize_gguf import quantize_file
from clawctl.config import load_paths
from clawctl.errors import BadInput, EngineError
from clawctl.fsutil import atomic_write
from clawctl.schemas.distill import (
    DistillTrainJob,
    DistillTrainResult,
    TrainExample,
    TrainReport,
)
from clawctl.schemas.policy import EvalMessage
from clawctl.store.adapters import AdapterStore
from clawctl.store.gguf_meta import read_gguf_info
from clawctl.store.models import ModelStore
from clawctl.store.quant_types import quant_by_name

REPLAY_TOKENS = 96
PROOF_PROMPTS = 4


def replay_answers(
    base_file: Path, count: int, run_dir: Path, progress: LineProgress
) -> list[TrainExample]:
    """The base model's own greedy answers to `count` generic prompts (llama.cpp, as clawd
    would answer them), kept in `<run>/replay.jsonl` so a resumed run reuses them."""
    from llama_cpp import Llama

    cache = run_dir / "replay.jsonl"
    if cache.is_file():
        cached = read_examples(cache)
        if len(cached) == count:
            return cached
    prompts = generic_prompts()
    chosen = [prompts[i % len(prompts)] for i in range(count)]
    if not chosen:
        return []
    progress.start("replaying the base model's answers", len(chosen))
    llm = Llama(str(base_file), n_ctx=1024, n_threads=2, verbose=False)
    examples = []
    try:
        for prompt in chosen:
            turns = [EvalMessage(role="user", content=prompt)]
            answer = llm.create_chat_completion(
                messages=[{"role": "user", "content": prompt}],
                temperature=0.0,
                max_tokens=REPLAY_TOKENS,
            )
            text = (answer["choices"][0]["message"]["content"] or "").strip()  # type: ignore[index]
            if text:
                examples.append(TrainExample(messages=turns, answer=text))
            progress.advance(1)
    finally:
        llm.close()
    write_examples(cache, examples)
    return examples


@op("distill_train", DistillTrainJob)
def distill_train(
    job: DistillTrainJob, progress: LineProgress, writer: LineWriter
) -> DistillTrainResult:
    run_dir, base_file, options = Path(job.run_dir), Path(job.base_file), job.options
    info = read_gguf_info(base_file)
    check_architecture(info.architecture)
    examples_file = run_dir / "examples.jsonl"
    examples = read_examples(examples_file)
    if not examples:
        raise BadInput("no training examples")
    train_set, held_out, dropped = split(examples, options.held_out)
    write_examples(run_dir / "train.jsonl", train_set)
    write_examples(run_dir / "held_out.jsonl", held_out)
    replayed = replay_answers(base_file, round(len(train_set) * options.replay), run_dir, progress)
    key = config_key(options, examples_file, base_file)
    if job.restart:
        Checkpoint(run_dir).drop()
    writer.message(
        f"{len(train_set)} examples to learn, {len(replayed)} replayed, "
        f"{len(held_out)} held out ({dropped} near-duplicates dropped)"
    )
    tokenizer, model = load_base(base_file)
    trained = train(
        tokenizer, model, train_set + replayed, held_out, options, run_dir, key, progress, writer
    )
    from peft import get_peft_model_state_dict

    gguf_out = run_dir / "adapter.gguf"
    config = trained.model.config
    write_lora_gguf(
        get_peft_model_state_dict(trained.model),
        gguf_out,
        architecture=info.architecture,
        alpha=options.alpha,
        n_head=config.num_attention_heads,
        n_kv_head=config.num_key_value_heads,
        name=job.name,
    )
    probes = (held_out + train_set)[:PROOF_PROMPTS]
    prompt_ids = [encode(tokenizer, e, options.max_tokens).ids for e in probes]
    progress.start("proving the GGUF adapter against PEFT", None)
    reference = run_dir / "base-f32.gguf"
    try:
        if info.quant.lower() in ("f32", "all_f32"):
            reference = base_file
        else:  # the weights PEFT trained on, for llama.cpp: dequantized, exactly
            quantize_file(base_file, reference, quant_by_name("f32"), None)
        proof = prove(reference, base_file, gguf_out, trained.model, prompt_ids)
    finally:
        if reference != base_file:
            reference.unlink(missing_ok=True)
    if not proof.passed:
        raise EngineError(
            f"the GGUF adapter does not compute what PEFT computed (logit change correlation "
            f"{proof.correlation:.4f}, at least {THRESHOLD}; size ratio {proof.scale_ratio:.3f}); "
            "nothing was installed"
        )
    store = AdapterStore(ModelStore(load_paths()))
    manifest = store.install(str(gguf_out), base=job.base, name=job.name, label=job.label)
    report = TrainReport(
        examples=len(train_set),
        held_out=len(held_out),
        dropped_near_duplicates=dropped,
        replayed=len(replayed),
        steps=trained.steps,
        resumed_from_step=trained.resumed_from,
        tokens=trained.tokens,
        seconds=round(trained.seconds, 2),
        tokens_per_second=round(trained.tokens / max(trained.seconds, 1e-9), 1),
        first_loss=round(trained.first_loss, 4),
        last_loss=round(trained.last_loss, 4),
        held_out_loss_before=_rounded(trained.held_out_before),
        held_out_loss_after=_rounded(trained.held_out_after),
    )
    result = DistillTrainResult(adapter=manifest, report=report, proof=proof, run_dir=str(run_dir))
    atomic_write(run_dir / "result.json", json.dumps(result.model_dump(mode="json")).encode())
    return result


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
