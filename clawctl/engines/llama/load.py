"""Loading a GGUF model into a llama.cpp context with the profile's settings.

The one loader for the engine and its draft model (both need the profile's KV type, flash
attention and one KV stream per sequence), so neither imports the other to get it.
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
    return settings.flash_attn or settings.kv_cache_type != "f16"  # quantized V needs it


def load_llama(path: Path, settings: EngineSettings, what: str) -> llama_cpp.Llama:
    """A GGUF model with the profile's context settings, its context holding a KV stream per
    sequence of `settings.parallel`; `what` names it in errors."""
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
    if settings.parallel > 1:
        try:
            widen_context(llama, settings.parallel)
        except BaseException:
            llama.close()
            raise
    return llama


def widen_context(llama: llama_cpp.Llama, n_seq_max: int) -> None:
    """Recreate `llama`'s context with `n_seq_max` sequences, each with a KV stream as long as
    the context was (llama-cpp-python's constructor offers no such option)."""
    params = llama.context_params
    params.n_ctx = llama.n_ctx() * n_seq_max  # llama.cpp splits n_ctx across the streams
    params.n_seq_max = n_seq_max
    params.kv_unified = False
    old = llama._ctx
    llama._ctx = llama._stack.enter_context(
        contextlib.closing(
            _internals.LlamaContext(model=llama._model, params=params, verbose=False)
        )
    )
    old.close()  # type: ignore[no-untyped-call]
