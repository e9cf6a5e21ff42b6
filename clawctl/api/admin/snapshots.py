"""Admin routes for the daemon's snapshots (`/admin/snapshots…`).

Listing, showing, removing and pruning read headers and unlink files; verifying decompresses
every file, so it runs in a worker thread (disk and zstd work, never a model call). Export streams
a file verified through the same open handle it is read from. Import streams the request body to
a temp file beside the named snapshots, verifies all of it, and links it into place; a damaged,
foreign or clashing upload is a 400 and leaves nothing behind. Import answers with the same
NDJSON `JobLine`s as the other uploads (here a single `result` line, since every check ran
before the answer starts).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import BinaryIO

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from clawctl.api.admin.streaming import ndjson
from clawctl.errors import BadInput
from clawctl.schemas.jobs import JobLine, ResultLine
from clawctl.schemas.snapshots import (
    Kind,
    PruneRequest,
    PruneResult,
    RemovedSnapshot,
    SnapshotDetail,
    SnapshotInfo,
    SnapshotListing,
    SnapshotVerifyReport,
)
from clawctl.services import Services
from clawctl.store.snapshots import SnapshotStore, validate_snapshot_name

router = APIRouter(prefix="/admin")
CHUNK = 1 << 20


def _store(request: Request) -> SnapshotStore:
    services: Services = request.app.state.services
    return services.snapshots


@router.get("/snapshots")
async def list_snapshots(request: Request) -> SnapshotListing:
    entries = await asyncio.to_thread(_store(request).entries)
    return SnapshotListing(snapshots=entries)


@router.post("/snapshots/prune")
async def prune_snapshots(body: PruneRequest, request: Request) -> PruneResult:
    """Remove least recently used session and pool snapshots (named ones with `named`)."""
    if body.max_bytes is None and body.older_than_seconds is None:
        raise BadInput("give max_bytes and/or older_than_seconds", param="max_bytes")
    kinds: tuple[Kind, ...] = ("named", "session", "pool") if body.named else ("session", "pool")
    removed = await asyncio.to_thread(
        _store(request).prune, body.max_bytes, body.older_than_seconds, kinds
    )
    return PruneResult(removed=[path.stem for path in removed])


@router.post("/snapshots/verify")
async def verify_snapshots(request: Request) -> SnapshotVerifyReport:
    """Check every snapshot's header, payload and checksums."""
    return SnapshotVerifyReport(reports=await asyncio.to_thread(_store(request).verify))


async def _result(info: SnapshotInfo) -> AsyncIterator[JobLine]:
    yield ResultLine(result=info.model_dump(mode="json"))


@router.post("/snapshots/import")
async def import_snapshot(request: Request, name: str | None = None) -> StreamingResponse:
    """Add the snapshot file sent as the request body as a named snapshot (`name`, default: the
    name in its header)."""
    store = _store(request)
    if name is not None:
        validate_snapshot_name(name)  # before reading a byte
    with store.incoming() as (tmp, handle):
        async for chunk in request.stream():
            handle.write(chunk)
        info = await asyncio.to_thread(store.adopt, tmp, handle, name)
    return ndjson(_result(info))


async def _stream(handle: BinaryIO) -> AsyncIterator[bytes]:
    try:
        while chunk := await asyncio.to_thread(handle.read, CHUNK):
            yield chunk
    finally:
        handle.close()


@router.get("/snapshots/{name}/export")
async def export_snapshot(name: str, request: Request) -> StreamingResponse:
    """The snapshot's file, checked completely before the first byte is sent."""
    handle, size = await asyncio.to_thread(_store(request).open_verified, name)
    return StreamingResponse(
        _stream(handle),
        media_type="application/octet-stream",
        headers={"Content-Length": str(size)},
    )


# `:path`: a name with a slash reaches the handler and its validation (a 400, not a bare 404).
@router.get("/snapshots/{name:path}")
async def show_snapshot(name: str, request: Request) -> SnapshotDetail:
    return await asyncio.to_thread(_store(request).detail, name)


@router.delete("/snapshots/{name:path}")
async def remove_snapshot(name: str, request: Request) -> RemovedSnapshot:
    return _store(request).remove(name)
