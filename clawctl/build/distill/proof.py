"""Proof that a converted adapter computes in llama.cpp what it computed in PEFT.

On a few probe prompts (rendered with the GGUF's chat template; the same token ids fed to both),
the change in logits the adapter causes is taken in each engine: llama.cpp with the base and the
GGUF adapter on and off, PEFT with the adapter enabled and disabled. The Pearson correlation of
the two changes, over every position and vocabulary entry, must reach `THRESHOLD`, and since a
correlation does not see a scale, their sizes must agree within `SCALE_RANGE` (a wrong alpha).

The llama.cpp side runs on the base's weights dequantized to F32 (`reference`): exactly the
weights PEFT trained on, so what differs is the conversion alone. There an adapter measured
0.99999, and 0.944 with the Q/K permutation left out. On the quantized base as clawd serves it,
llama.cpp also quantizes the activations (Q8) for its dot products, which blurs a small adapter's
change (0.975 for a weak one here); that figure is reported as `served_correlation`, not judged.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

from clawctl.errors import EngineError
from clawctl.schemas.distill import LoraProof

THRESHOLD = 0.99
SCALE_RANGE = (0.8, 1.25)
PROBE_TOKENS = 96


def _llama_logits(base: Path, adapter: Path | None, prompts: list[list[int]]) -> list[Any]:
    import llama_cpp
    import numpy as np

    longest = max(len(p) for p in prompts)
    llm = llama_cpp.Llama(
        str(base), n_ctx=longest + 8, n_batch=longest + 8, n_threads=2, logits_all=True,
        verbose=False,
    )  # fmt: skip
    pointer = None
    try:
        if adapter is not None:
            pointer = llama_cpp.llama_adapter_lora_init(llm.model, str(adapter).encode())
            if not pointer:
                raise EngineError(f"llama.cpp could not load the adapter {adapter.name}")
            array = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(pointer)
            scales = (ctypes.c_float * 1)(1.0)
            if llama_cpp.llama_set_adapters_lora(llm.ctx, array, 1, scales) != 0:
                raise EngineError("llama.cpp could not apply the adapter")
        found = []
        for ids in prompts:
            llm.n_tokens = 0  # start over (llama-cpp-python drops the cells after it)
            llm.eval(ids)
            found.append(np.array(llm.scores[: len(ids)], dtype=np.float64))
        return found
    finally:
        if pointer:  # before the model: an adapter belongs to the model it was loaded for
            llama_cpp.llama_set_adapters_lora(llm.ctx, None, 0, None)
            llama_cpp.llama_adapter_lora_free(pointer)
        llm.close()


def _peft_logits(model: Any, prompts: list[list[int]]) -> tuple[list[Any], list[Any]]:
    import torch

    on, off = [], []
    with torch.no_grad():
        for ids in prompts:
            tensor = torch.tensor([ids])
            on.append(model(input_ids=tensor).logits[0].double().numpy())
            with model.disable_adapter():
                off.append(model(input_ids=tensor).logits[0].double().numpy())
    return on, off


def _delta(on: list[Any], off: list[Any], vocab: int) -> Any:
    import numpy as np

    return np.concatenate(
        [(a[:, :vocab] - b[:, :vocab]).ravel() for a, b in zip(on, off, strict=True)]
    )


def _correlation(a: Any, b: Any) -> float:
    import numpy as np

    value = float(np.corrcoef(a, b)[0, 1])
    return round(value if np.isfinite(value) else 0.0, 5)


def prove(
    reference: Path, served: Path, adapter: Path, peft_model: Any, prompts: list[list[int]]
) -> LoraProof:
    """Compare the adapter's effect on the logits in both engines (prompts as token ids):
    judged on `reference` (the base dequantized), reported on `served` (the base as served)."""
    import numpy as np

    prompts = [p[-PROBE_TOKENS:] for p in prompts if p]
    peft_on, peft_off = _peft_logits(peft_model, prompts)
    vocab = peft_on[0].shape[1]
    deltas = []
    for base in (reference, served):
        on = _llama_logits(base, adapter, prompts)
        vocab = min(vocab, on[0].shape[1])  # padded embedding tables differ
        deltas.append((on, _llama_logits(base, None, prompts)))
    peft_delta = _delta(peft_on, peft_off, vocab)
    llama_delta = _delta(*deltas[0], vocab)
    correlation = _correlation(llama_delta, peft_delta)
    served_correlation = _correlation(_delta(*deltas[1], vocab), peft_delta)
    llama_rms = float(np.sqrt(np.mean(llama_delta**2)))
    peft_rms = float(np.sqrt(np.mean(peft_delta**2)))
    ratio = llama_rms / peft_rms if peft_rms > 0 else 0.0
    return LoraProof(
        correlation=correlation,
        served_correlation=served_correlation,
        prompts=len(prompts),
        positions=sum(len(p) for p in prompts),
        llama_delta_rms=round(llama_rms, 5),
        peft_delta_rms=round(peft_rms, 5),
        scale_ratio=round(ratio, 4),
        threshold=THRESHOLD,
        passed=correlation >= THRESHOLD and SCALE_RANGE[0] <= ratio <= SCALE_RANGE[1],
    )
