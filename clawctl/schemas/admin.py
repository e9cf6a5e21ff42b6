"""clawd-native admin bodies: health, loaded models."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class LoadedModel(BaseModel):
    name: str
    digest: str
    size: int
    memory_bytes: int  # weights and the whole KV cache, as allocated
    n_ctx: int  # tokens one request may hold
    sequences: int = 1  # requests decoded together
    kv_cells: int = 0  # KV cells allocated, in all
    kv_cells_used: int = 0  # KV cells holding tokens now (counting shared ones once per holder)
    kv_layout: Literal["streams", "pool"] = "streams"  # a stream per sequence, or one pool
    loaded_at: float
    last_used: float
    expires_in: float | None
    active_requests: int
    queued_requests: int
    draft: str | None = None  # the draft model loaded with it for speculative decoding
    # Prompt tokens computed while idle, ahead of the calls expected to start with them
    # (runtime/anticipation.py), since the model loaded.
    anticipated_tokens: int = 0


class CacheStatus(BaseModel):
    """The answer cache at a glance (counts since clawd started)."""

    entries: int
    bytes: int
    exact_hits: int
    semantic_hits: int
    misses: int
    near_misses: int  # similar enough, but the numbers differed
    semantic_model: str | None  # None: exact matching only (the model is not installed)
    embedding_models: list[str] = []  # loaded


class Health(BaseModel):
    status: str
    version: str
    pid: int
    uptime_seconds: float
    profile: str
    socket: str
    default_model: str
    memory_budget_bytes: int
    loaded: list[LoadedModel]
    cache: CacheStatus | None = None
