"""Loading a GGUF model into a llama.cpp context with the profile's settings.

The one loader for the engine and its draft model (both need the profile's KV type, flash
attention and KV layout: a stream per sequence, or one pool they share), so neither imports the
other to get it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import llama_cpp
from llama_cpp import _internals

from clawctl.engines.base import EngineSettings
from clawctl.errors import BadInput, EngineError

KV_TYPES = {
    "f16": llama_cpp.GGML_TYPE_F16,
    "q8_0": llama_cpp.GGML_TYPE_Q8_0,
    "q4_0": llama_cpp.GGML_TYPE_Q4_0,
}


def uses_flash_attn(settings: EngineSettings) -> bool:
    # Quantized V needs it; a shared pool needs it to skip the other sequences' cells.
    return settings.flash_attn or settings.kv_cache_type != "f16" or settings.kv_unified


def load_llama(path: Path, settings: EngineSettings, what: str) -> llama_cpp.Llama:
    """A GGUF model with the profile's context settings, its context holding the KV cells of
    `settings` (a stream per sequence, or one shared pool); `what` names it in errors.
    `Llama` itself is built with one sequence's context (its token buffer is that long)."""
    kv_type = KV_TYPES.get(settings.kv_cache_type)
    if kv_type is None:
        raise BadInput(f"unsupported KV cache type {settings.kv_cache_type!r}")
    try:
        llama = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=settings.n_ctx,
            n_batch=settings.n_batch,
            n_ubatch=settings.n_batch,
            n_threads=settings.n_threads,
            n_threads_batch=settings.n_threads,
            type_k=kv_type,
            type_v=kv_type,
            flash_attn=uses_flash_attn(settings),
            verbose=False,
        )
    except (ValueError, RuntimeError) as exc:
        raise EngineError(f"llama.cpp could not load {what}: {exc}") from None
    if settings.parallel > 1 or settings.kv_unified:
        try:
            widen_context(llama, settings)
        except BaseException:
            llama.close()
            raise
    return llama


def widen_context(llama: llama_cpp.Llama, settings: EngineSettings) -> None:
    """Recreate `llama`'s context with `settings.parallel` sequences over `settings.cells()`
    KV cells, split into equal streams or unified (llama-cpp-python's constructor offers
    neither)."""
    params = llama.context_params
    params.n_ctx = settings.cells()  # llama.cpp splits n_ctx across the streams
    params.n_seq_max = max(1, settings.parallel)
    params.kv_unified = settings.kv_unified
    old = llama._ctx
    llama._ctx = llama._stack.enter_context(
        contextlib.closing(
            _internals.LlamaContext(model=llama._model, params=params, verbose=False)
        )
    )
    old.close()  # type: ignore[no-untyped-call]
