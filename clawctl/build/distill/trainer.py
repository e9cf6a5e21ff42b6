"""Fine-tuning a LoRA for a GGUF base with PEFT on the CPU, in the build subprocess.

The base is the GGUF's own weights, dequantized by transformers' GGUF reader, so the adapter
learns against the weights llama.cpp will run it on (a Q4 model's rounding included), and the
prompt is rendered with the GGUF's own chat template, as clawd renders it. The loss counts only
the answer's tokens. Replayed base-model answers to generic prompts are mixed in so the adapter
keeps what the model already did well.

Resumable: every `checkpoint_every` optimizer steps the adapter's weights, the optimizer's
moments (safetensors, never pickle) and the step are written to `<run>/checkpoint`, and a rerun
with the same data and options continues from there. The example order is a function of the seed
and the epoch, so a resumed run takes the steps the interrupted one would have taken.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clawctl.build.jobstream import LineProgress, LineWriter
from clawctl.errors import BadInput
from clawctl.fsutil import atomic_write, fsync_dir
from clawctl.schemas.distill import TrainExample, TrainOptions

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    prompt_len: int  # tokens before the answer (not in the loss)


@dataclass
class Trained:
    """The PEFT model after training, with what the report needs."""

    model: Any
    steps: int
    resumed_from: int
    tokens: int
    seconds: float
    first_loss: float
    last_loss: float
    held_out_before: float | None
    held_out_after: float | None


def load_base(base_file: Path) -> tuple[Any, Any]:
    """The GGUF's tokenizer and its weights as a float32 transformers model."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    source, name = str(base_file.parent), base_file.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        source, gguf_file=name, dtype=torch.float32
    )
    if tokenizer.chat_template is None:
        raise BadInput(f"{base_file.name} carries no chat template to render examples with")
    return tokenizer, model


def encode(tokenizer: Any, example: TrainExample, max_tokens: int) -> Encoded:
    """The example as the model will see it in clawd: the chat template's rendering of the
    prompt with the generation prompt, then the answer and the template's end of turn. A prompt
    longer than `max_tokens` loses its oldest tokens; the answer is kept whole up to half."""
    turns = [{"role": m.role, "content": m.content} for m in example.messages]
    prompt = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        [*turns, {"role": "assistant", "content": example.answer}], tokenize=False
    )
    if not full.startswith(prompt):  # a template that rewrites earlier turns: answer + eos
        full = prompt + example.answer + (tokenizer.eos_token or "")
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    answer_ids = tokenizer(full[len(prompt) :], add_special_tokens=False).input_ids
    answer_ids = answer_ids[: max_tokens // 2]
    prompt_ids = prompt_ids[max(0, len(prompt_ids) - (max_tokens - len(answer_ids))) :]
    return Encoded(prompt_ids + answer_ids, len(prompt_ids))


def config_key(options: TrainOptions, examples_file: Path, base_file: Path) -> str:
    """What a checkpoint must match to be resumed: the options, the data and the base."""
    digest = hashlib.sha256(options.model_dump_json().encode())
    digest.update(examples_file.read_bytes())
    stat = base_file.stat()
    digest.update(f"{base_file.name}:{stat.st_size}".encode())
    return digest.hexdigest()


def _answer_loss(model: Any, encoded: Encoded) -> Any:
    import torch

    ids = torch.tensor([encoded.ids])
    labels = ids.clone()
    labels[0, : encoded.prompt_len] = IGNORE
    return model(input_ids=ids, labels=labels).loss


def mean_loss(model: Any, data: list[Encoded]) -> float | None:
    import torch

    if not data:
        return None
    with torch.no_grad():
        return sum(float(_answer_loss(model, e)) for e in data) / len(data)


class Checkpoint:
    """`<run>/checkpoint`: adapter weights and optimizer moments (safetensors), step (JSON),
    replaced as a whole directory so a kill mid-write leaves the previous one."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir / "checkpoint"

    def load(self, key: str, model: Any, optimizer: Any) -> dict[str, Any] | None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        state_file = self.dir / "state.json"
        if not state_file.is_file():
            return None
        state: dict[str, Any] = json.loads(state_file.read_text())
        if state.get("key") != key:
            return None
        set_peft_model_state_dict(model, load_file(str(self.dir / "adapter.safetensors")))
        moments = load_file(str(self.dir / "optimizer.safetensors"))
        saved = {"param_groups": state["param_groups"], "state": {}}
        for name, tensor in moments.items():
            index, field = name.split(".", 1)
            saved["state"].setdefault(int(index), {})[field] = tensor
        optimizer.load_state_dict(saved)
        return state

    def save(self, key: str, model: Any, optimizer: Any, progress: dict[str, Any]) -> None:
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        scratch = self.dir.with_name("checkpoint.tmp")
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        weights = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}
        save_file(weights, str(scratch / "adapter.safetensors"))
        saved = optimizer.state_dict()
        moments = {
            f"{index}.{field}": value.detach().contiguous()
            for index, fields in saved["state"].items()
            for field, value in fields.items()
        }
        save_file(moments, str(scratch / "optimizer.safetensors"))
        state = {"key": key, "param_groups": saved["param_groups"], **progress}
        atomic_write(scratch / "state.json", json.dumps(state).encode())
        fsync_dir(scratch)
        old = self.dir.with_name("checkpoint.old")
        shutil.rmtree(old, ignore_errors=True)
        if self.dir.exists():
            self.dir.rename(old)
        scratch.rename(self.dir)
        fsync_dir(self.dir.parent)
        shutil.rmtree(old, ignore_errors=True)

    def drop(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _order(count: int, seed: int, epoch: int) -> list[int]:
    order = list(range(count))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


def train(
    tokenizer: Any,
    model: Any,
    train_set: list[TrainExample],
    held_out: list[TrainExample],
    options: TrainOptions,
    run_dir: Path,
    key: str,
    progress: LineProgress,
    writer: LineWriter,
) -> Trained:
    """Fine-tune a LoRA on `train_set` (already holding the replayed examples)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(options.seed)
    data = [encode(tokenizer, e, options.max_tokens) for e in train_set]
    data = [e for e in data if len(e.ids) > e.prompt_len]
    test = [encode(tokenizer, e, options.max_tokens) for e in held_out]
    if not data:
        raise BadInput("no example has an answer left to train on")
    before = mean_loss(model, test)
    config = LoraConfig(
        r=options.rank,
        lora_alpha=options.alpha,
        target_modules=list(options.targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW(
        [p for p in peft_model.parameters() if p.requires_grad], lr=options.learning_rate
    )
    per_epoch = math.ceil(len(data) / options.accumulate)
    total = per_epoch * options.epochs
    checkpoint = Checkpoint(run_dir)
    state = checkpoint.load(key, peft_model, optimizer) or {}
    step = int(state.get("step", 0))
    tokens, seconds = int(state.get("tokens", 0)), float(state.get("seconds", 0.0))
    first = state.get("first_loss")
    last = float(state.get("last_loss", 0.0))
    if step:
        writer.message(f"resuming at step {step} of {total} from the checkpoint")
    resumed_from = step
    progress.start("training", total)
    if step:
        progress.advance(step)
    peft_model.train()
    while step < total:
        epoch, batch = divmod(step, per_epoch)
        order = _order(len(data), options.seed, epoch)
        chosen = order[batch * options.accumulate : (batch + 1) * options.accumulate]
        started = time.monotonic()
        loss_sum = 0.0
        for index in chosen:
            loss = _answer_loss(peft_model, data[index]) / len(chosen)
            loss.backward()
            loss_sum += float(loss)
            tokens += len(data[index].ids)
        optimizer.step()
        optimizer.zero_grad()
        seconds += time.monotonic() - started
        step += 1
        first = loss_sum if first is None else first
        last = loss_sum
        progress.status(f"loss {loss_sum:.3f} · {tokens / max(seconds, 1e-9):.0f} tok/s")
        progress.advance(1)
        if step % options.checkpoint_every == 0 or step == total:
            checkpoint.save(
                key,
                peft_model,
                optimizer,
                {"step": step, "tokens": tokens, "seconds": seconds,
                 "first_loss": first, "last_loss": last},
            )  # fmt: skip
    peft_model.eval()
    after = mean_loss(peft_model, test)
    return Trained(
        peft_model, step, resumed_from, tokens, seconds,
        float(first or 0.0), last, before, after,
    )  # fmt: skip
