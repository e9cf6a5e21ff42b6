"""clawd-native admin bodies: health, loaded models."""

from __future__ import annotations

from pydantic import BaseModel


class LoadedModel(BaseModel):
    name: str
    digest: str
    size: int
    memory_bytes: int
    n_ctx: int
    loaded_at: float
    last_used: float
    expires_in: float | None
    active_requests: int
    queued_requests: int


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
