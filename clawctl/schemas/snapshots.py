"""The snapshot store's types as they cross the admin API: listings, details, prune and verify.

They live here, below the store and the file format, because the CLI renders them and must not
import either; `store/snapshots.py` builds them and the admin routes send them as they are. None
of them carries the daemon's file paths: a client may run as another user on another box.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from clawctl.schemas.state import StateIdentity

Kind = Literal["named", "session", "pool"]
Filter = Literal["none", "shuffle2"]


class ChunkInfo(BaseModel):
    """One independently compressed piece of a snapshot's payload."""

    model_config = ConfigDict(frozen=True)

    raw_size: int
    stored_size: int
    xxh3_128: str


class SnapshotInfo(BaseModel):
    """One snapshot file as `clawctl snapshot list` shows it."""

    model_config = ConfigDict(frozen=True)

    kind: Kind
    name: str
    tokens: int
    raw_size: int
    stored_size: int  # bytes on disk
    model_sha256: str
    kv_type: str
    created_at: float
    last_used: float


class SnapshotListing(BaseModel):
    """`GET /admin/snapshots`: named snapshots, then sessions, then prefix-pool entries."""

    snapshots: list[SnapshotInfo]


class SnapshotDetail(BaseModel):
    """`GET /admin/snapshots/{name}`: one snapshot's header (without its token ids)."""

    model_config = ConfigDict(frozen=True)

    kind: Kind
    name: str
    n_tokens: int
    raw_size: int
    stored_size: int  # bytes on disk, the whole file
    created_at: datetime
    last_used: float
    identity: StateIdentity
    filter: Filter
    level: int
    chunks: list[ChunkInfo]


class RemovedSnapshot(BaseModel):
    """`DELETE /admin/snapshots/{name}`: what was removed."""

    kind: Kind
    name: str


class PruneRequest(BaseModel):
    """`POST /admin/snapshots/prune`: drop snapshots unused for `older_than_seconds`, then least
    recently used ones until the rest fit in `max_bytes` (sessions and pool; `named` too)."""

    max_bytes: int | None = Field(None, ge=0)
    older_than_seconds: float | None = Field(None, ge=0)
    named: bool = False


class PruneResult(BaseModel):
    removed: list[str]  # names of the removed snapshots


class SnapshotCheck(BaseModel):
    """One snapshot file's verification: header, payload and every checksum."""

    model_config = ConfigDict(frozen=True)

    kind: Kind
    name: str
    ok: bool
    problem: str | None = None


class SnapshotVerifyReport(BaseModel):
    """`POST /admin/snapshots/verify`."""

    reports: list[SnapshotCheck]
