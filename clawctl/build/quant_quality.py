"""How much of its source model a quantized GGUF keeps: greedy-token agreement on a probe text.

Both models read the same shipped probe text (prose, instructions, arithmetic, code, a tool
call: models/quality_probe.txt) and, at every position, pick their most likely next token; the
share of positions where the quantized model picks what its source picks is the agreement. It
measures what a cascade cares about (does the cheap tier say what the good one says) in one
forward pass each, with no labelled data; a perplexity would weigh rare tokens the models never
pick. Run by `clawctl models quantize` in its build subprocess (the models are loaded here, not
in the daemon).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from clawctl.resources import bundled_dir
from clawctl.schemas.models import QuantQuality

PROBE_FILE = "quality_probe.txt"
PROBE_TOKENS = 384


def probe_text() -> str:
    return (bundled_dir("models") / PROBE_FILE).read_text(encoding="utf-8")


def _greedy(model: Path, tokens: list[int] | None, text: str) -> tuple[list[int], list[int]]:
    """The probe's tokens (from this model's vocabulary unless given) and the model's argmax
    after each of them."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(str(model), n_ctx=PROBE_TOKENS + 8, n_batch=PROBE_TOKENS + 8, n_threads=2,
                logits_all=True, verbose=False)  # fmt: skip
    try:
        ids = tokens if tokens is not None else llm.tokenize(text.encode())[:PROBE_TOKENS]
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids)])
        return ids, [int(i) for i in logits.argmax(axis=1)]
    finally:
        llm.close()


def greedy_agreement(source: Path, quantized: Path, imatrix: Path | None = None) -> QuantQuality:
    text = probe_text()
    ids, expected = _greedy(source, None, text)
    _, got = _greedy(quantized, ids, text)
    same = sum(1 for a, b in zip(expected, got, strict=True) if a == b)
    return QuantQuality(
        metric="greedy_agreement",
        value=round(same / len(ids), 4),
        tokens=len(ids),
        probe_sha256=hashlib.sha256(text.encode()).hexdigest(),
        imatrix_sha256=_sha256(imatrix) if imatrix is not None else None,
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
