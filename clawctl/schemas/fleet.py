"""What the fleet stores beside its snapshot objects, and what its admin API answers.

Pointers are the fleet's index: small JSON objects naming a content-addressed snapshot object
(its sha256) and what it holds, so a box finds a prefix another box computed with one listing
and a few small reads, without downloading a snapshot to learn what is in it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from clawctl.schemas.state import StateIdentity

# What the fleet stores: snapshots of the three kinds, and model and adapter blobs (by sha256).
FleetKind = Literal["named", "session", "pool", "model", "adapter"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class PoolPointer(_Frozen):
    """A prefix-pool entry in the fleet: `<prefix>/pool/<identity key>/<chain hash>.json`."""

    chain: str  # the entry's name: the chain hash of the prefix it was frozen for
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    tokens: int = Field(ge=0)
    chains: list[str]  # the block chain hashes of its tokens: every prefix it can serve
    box: str
    created_at: datetime


class NamedPointer(_Frozen):
    """A named snapshot in the fleet: `<prefix>/named/<name>.json`."""

    name: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    tokens: int = Field(ge=0)
    identity: StateIdentity
    box: str
    created_at: datetime


class FleetStatus(_Frozen):
    """`clawctl fleet status`: where the fleet is and what this box exchanged with it."""

    enabled: bool
    endpoint: str = ""
    bucket: str = ""
    prefix: str = ""
    box: str = ""
    reachable: bool | None = None  # None: not asked (the fleet is off)
    problem: str | None = None
    queued: int = 0  # uploads waiting (persisted: they survive a restart)
    uploaded: int = 0
    already_there: int = 0  # uploads another box had made first
    upload_errors: int = 0
    last_upload_error: str | None = None
    fetched: int = 0
    fetched_bytes: int = 0
    fetch_refused: int = 0  # objects that failed their checksum or identity
    bandwidth_mb_s: float | None = None  # measured on fetches
    pool_entries: int = 0  # fleet pool entries known for the identities asked about
    named: list[str] = []
    ledger: bool = False  # rows ship to the fleet ledger (Postgres)
    ledger_shipped: int = 0  # rows this run of clawd sent
    ledger_position: int | None = None  # the last row Postgres holds for this box
    ledger_error: str | None = None


class FleetPushRequest(_Frozen):
    """Queue named snapshots for upload: one by name, or every named and pool snapshot."""

    name: str | None = None


class FleetPushResult(_Frozen):
    queued: int


class FleetPullRequest(_Frozen):
    name: str
    as_name: str | None = None  # store it locally under another name


class FleetGcRequest(_Frozen):
    """Remove objects no box has used for `older_than_seconds` (named snapshots are kept)."""

    older_than_seconds: float = Field(ge=0)
    dry_run: bool = False


class FleetGcResult(_Frozen):
    objects: int  # removed (or, on a dry run, that would be)
    bytes: int
    pointers: int
    kept: int
    dry_run: bool


class FleetSyncResult(_Frozen):
    queued: int  # local snapshots queued for upload
    pulled: list[str]  # named snapshots fetched from the fleet
