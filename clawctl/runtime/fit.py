"""What a model needs before it loads: its engine settings under the profile, and its memory.

Kept apart from scheduling (as ollama's `llm/memory.go` is from `server/sched.go`): the manager asks
`MemoryFit` how big a model will be and decides what to evict; the fit knows the formats (GGUF with
an optional draft model, ONNX) and the profile's context, batch, KV type and sequences.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from clawctl.engines.base import EngineSettings, estimate_kv_bytes
from clawctl.errors import BadInput, ClawError, EngineError
from clawctl.profiles import EdgeProfile
from clawctl.schemas.models import ModelManifest

MIB = 1 << 20
# A model trained for at least this many tokens gets the profile's `long_ctx` (OpenClaw refuses
# models whose context is under 16,000 tokens; its requests run 13-15k).
LONG_CONTEXT = 16384


class ManifestLookup(Protocol):
    def get(self, name: str) -> ModelManifest: ...

    def blob_path(self, digest: str) -> Path: ...

    def model_dir(self, manifest: ModelManifest) -> Path: ...


class MemoryFit:
    """Engine settings and memory estimates for models under one profile."""

    def __init__(
        self, store: ManifestLookup, profile: EdgeProfile, drafts: Mapping[str, str]
    ) -> None:
        self.store = store
        self.profile = profile
        self.drafts = drafts

    def settings_for(self, manifest: ModelManifest) -> EngineSettings:
        if manifest.onnx is not None:
            return self._onnx_settings(manifest)
        info = manifest.gguf_info()
        if info.pooling_type:
            raise BadInput(
                f"model {manifest.name!r} is an embedding model: use /v1/embeddings",
                param="model",
            )
        n_ctx, parallel = self.context_for(info.context_length)
        draft = self._draft_for(manifest)
        return EngineSettings(
            model_path=self.store.blob_path(manifest.digest),
            n_ctx=n_ctx,
            n_batch=self.profile.n_batch,
            n_threads=self.profile.effective_threads(),
            kv_cache_type=self.profile.kv_cache_type,
            flash_attn=self.flash_attn_for(n_ctx),
            model_digest=manifest.digest,
            parallel=parallel,
            draft_max=self.profile.draft_max,
            draft_path=None if draft is None else self.store.blob_path(draft.digest),
        )

    def flash_attn_for(self, n_ctx: int) -> bool:
        """The profile's `flash_attn`, and always for a long context (`long_flash_attn`)."""
        profile = self.profile
        return profile.flash_attn or (profile.long_flash_attn and n_ctx > profile.n_ctx)

    def context_for(self, trained: int | None) -> tuple[int, int]:
        """(tokens per sequence, sequences) for a model trained on `trained` tokens: the
        profile's `n_ctx` and `parallel`, or for a long-context model its trained length up to
        `long_ctx`, with as many sequences as the same KV cells hold (at least one)."""
        profile = self.profile
        if not trained:
            return profile.n_ctx, profile.parallel
        if trained < LONG_CONTEXT or profile.long_ctx <= profile.n_ctx:
            return min(profile.n_ctx, trained), profile.parallel
        n_ctx = min(trained, profile.long_ctx)
        cells = profile.n_ctx * profile.parallel
        return n_ctx, max(1, min(profile.parallel, cells // n_ctx))

    def _draft_for(self, manifest: ModelManifest) -> ModelManifest | None:
        """The draft model configured for `manifest` ([drafts] in clawd.toml), if any."""
        name = self.drafts.get(manifest.name)
        if name is None or self.profile.draft_max == 0:
            return None
        try:
            draft = self.store.get(name)
        except ClawError as exc:
            raise EngineError(f"the draft model for {manifest.name!r}: {exc}") from None
        if draft.gguf is None or draft.gguf_info().pooling_type:
            raise EngineError(
                f"the draft model {name!r} for {manifest.name!r} must be a GGUF generation model"
            )
        return draft

    def _onnx_settings(self, manifest: ModelManifest) -> EngineSettings:
        onnx = manifest.onnx
        assert onnx is not None
        if onnx.task != "generation":
            raise BadInput(
                f"model {manifest.name!r} is an embedding model: use /v1/embeddings",
                param="model",
            )
        return EngineSettings(
            model_path=self.store.model_dir(manifest),
            n_ctx=min(self.profile.n_ctx, onnx.context_length or self.profile.n_ctx),
            n_batch=self.profile.n_batch,
            n_threads=self.profile.effective_threads(),
            kv_cache_type="f32",
            model_digest=manifest.digest,
            format="onnx",
        )

    def estimate(self, manifest: ModelManifest, settings: EngineSettings) -> int:
        if manifest.onnx is not None:  # one generation at a time
            onnx = manifest.onnx
            kv_bytes = estimate_kv_bytes(
                onnx.layers or 0, settings.n_ctx, onnx.kv_width or 0, settings.kv_cache_type
            )
            return manifest.size + kv_bytes
        total = 0
        draft = self._draft_for(manifest) if settings.draft_path is not None else None
        for model in (manifest, draft):
            if model is None:
                continue
            info = model.gguf_info()
            width = info.kv_width or info.embedding_length or 0
            kv = estimate_kv_bytes(
                info.block_count or 0, settings.n_ctx, width, settings.kv_cache_type
            ) * max(1, settings.parallel)  # a KV stream per sequence
            total += model.size + kv
        return total
