"""Training data for a LoRA: the held-out split and the generic prompts replayed against
forgetting.

The split is by time (the newest `held_out` share is evaluated on, as it would be in production:
the adapter is judged on requests that came after the ones it learned from), and a held-out
example whose prompt nearly repeats a training prompt (word trigram Jaccard >= 0.8) is dropped,
so the evaluation does not reward memorising a template.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from clawctl.errors import BadInput
from clawctl.resources import bundled_dir
from clawctl.schemas.distill import TrainExample

NEAR_DUPLICATE = 0.8
GENERIC_FILE = "distill_generic.jsonl"  # prompts whose base answers are replayed
_WORD = re.compile(r"\w+")


def read_examples(path: Path) -> list[TrainExample]:
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                examples.append(TrainExample.model_validate_json(line))
            except ValueError:
                raise BadInput(f"{path.name}:{number}: not a training example") from None
    return examples


def write_examples(path: Path, examples: list[TrainExample]) -> None:
    from clawctl.fsutil import atomic_write

    atomic_write(path, "".join(e.model_dump_json() + "\n" for e in examples).encode())


def _shingles(example: TrainExample) -> frozenset[tuple[str, ...]]:
    words = _WORD.findall(" ".join(m.content for m in example.messages).casefold())
    return frozenset(zip(words, words[1:], words[2:], strict=False)) or frozenset({tuple(words)})


def _similar(a: frozenset[tuple[str, ...]], b: frozenset[tuple[str, ...]]) -> bool:
    return len(a & b) / max(1, len(a | b)) >= NEAR_DUPLICATE


def split(
    examples: list[TrainExample], held_out: float
) -> tuple[list[TrainExample], list[TrainExample], int]:
    """(train, held out, near-duplicates dropped from the held-out side). Examples without a
    time keep their order; at least one example always trains."""
    ordered = sorted(enumerate(examples), key=lambda p: (p[1].ts is None, p[1].ts or 0.0, p[0]))
    items = [e for _, e in ordered]
    count = min(len(items) - 1, round(len(items) * held_out))
    train, test = items[: len(items) - count], items[len(items) - count :]
    seen = [_shingles(e) for e in train]
    kept = [e for e in test if not any(_similar(_shingles(e), s) for s in seen)]
    return train, kept, len(test) - len(kept)


def bundled_jsonl(name: str) -> list[dict[str, object]]:
    text = (bundled_dir("models") / name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def generic_prompts() -> list[str]:
    return [str(row["prompt"]) for row in bundled_jsonl(GENERIC_FILE)]
