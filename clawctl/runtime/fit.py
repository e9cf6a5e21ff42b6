"""What a model needs before it loads: its engine settings under the profile, and its memory.

Kept apart from scheduling (as ollama's `llm/memory.go` is from `server/sched.go`): the manager asks
`MemoryFit` how big a model will be and decides what to evict; the fit knows the formats (GGUF with
an optional draft model, ONNX) and the profile's context, batch, KV type and sequences.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from clawctl.engines.base import EngineSettings, estimate_kv_bytes
from clawctl.errors import BadInput, ClawError, EngineError
from clawctl.profiles import EdgeProfile
from clawctl.schemas.models import GgufInfo, ModelManifest

MIB = 1 << 20
# A model trained for at least this many tokens gets the profile's `long_ctx` (OpenClaw refuses
# models whose context is under 16,000 tokens; its requests run 13-15k).
LONG_CONTEXT = 16384
# llama.cpp pads a context to this many cells; a shared pool is sized in whole steps of it.
CELL_STEP = 256


@dataclass(frozen=True)
class ContextPlan:
    """How a model's KV cells are laid out: `parallel` sequences of up to `n_ctx` tokens each,
    in one stream per sequence (`cells == n_ctx * parallel`) or, when the profile's KV budget
    cannot give every sequence a whole context, in one `unified` pool of `cells` they share."""

    n_ctx: int
    parallel: int
    cells: int
    unified: bool


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
        plan = self.context_for(info)
        draft = self._draft_for(manifest)
        return EngineSettings(
            model_path=self.store.blob_path(manifest.digest),
            n_ctx=plan.n_ctx,
            n_batch=self.profile.n_batch,
            n_threads=self.profile.effective_threads(),
            kv_cache_type=self.profile.kv_cache_type,
            flash_attn=self.flash_attn_for(plan),
            model_digest=manifest.digest,
            parallel=plan.parallel,
            kv_cells=plan.cells,
            kv_unified=plan.unified,
            draft_max=self.profile.draft_max,
            draft_path=None if draft is None else self.store.blob_path(draft.digest),
        )

    def flash_attn_for(self, plan: ContextPlan) -> bool:
        """The profile's `flash_attn`; always for a long context (`long_flash_attn`), and for
        a shared pool, where it is what keeps a sequence from paying for the cells of the
        others (its kernel skips masked cells; without it every sequence's attention spans
        the whole pool, and its scratch buffer grows with the pool)."""
        profile = self.profile
        long = profile.long_flash_attn and plan.n_ctx > profile.n_ctx
        return profile.flash_attn or long or plan.unified

    def context_for(self, info: GgufInfo) -> ContextPlan:
        """The KV layout of a model under the profile. Tokens per sequence: the profile's
        `n_ctx` (at most the trained length), or for a model trained on long contexts its
        trained length up to `long_ctx`. Cells: a stream per sequence when the profile's
        `kv_budget_mb` holds `parallel` whole contexts (the fastest layout: 205 vs 192 tok/s
        for 8 short SmolLM2 streams against a shared pool, both with flash attention, in
        bench/kv_layout.py); otherwise one pool
        of what the budget holds (at least one whole context), which one long agent context
        and several short requests share (llama.cpp's unified KV cache)."""
        profile = self.profile
        trained = info.context_length
        if not trained:
            n_ctx = profile.n_ctx
        elif trained < LONG_CONTEXT or profile.long_ctx <= profile.n_ctx:
            n_ctx = min(profile.n_ctx, trained)
        else:
            n_ctx = min(trained, profile.long_ctx)
        width = info.kv_width or info.embedding_length or 0
        per_cell = estimate_kv_bytes(info.block_count or 0, 1, width, profile.kv_cache_type)
        streams = n_ctx * profile.parallel
        budget = profile.kv_budget_mb * MIB
        if per_cell == 0 or streams * per_cell <= budget:
            return ContextPlan(n_ctx, profile.parallel, streams, unified=False)
        pool = max(n_ctx, budget // per_cell // CELL_STEP * CELL_STEP)
        return ContextPlan(n_ctx, profile.parallel, pool, unified=True)

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
                info.block_count or 0, settings.cells(), width, settings.kv_cache_type
            )
            total += model.size + kv
        return total
