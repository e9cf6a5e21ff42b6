"""Admin routes for the fleet (`/admin/fleet…`): its status, pushing this box's snapshots, and
pulling a named snapshot another box pushed.

Everything here talks to object storage, so it runs in a worker thread; a fleet that is off is a
400 saying how to turn it on, one that is unreachable a 503 with the store's own complaint.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from clawctl.errors import BadInput
from clawctl.fleet.store import FleetStore
from clawctl.fleet.uploader import FleetUploader
from clawctl.schemas.fleet import (
    FleetGcRequest,
    FleetGcResult,
    FleetPullRequest,
    FleetPushRequest,
    FleetPushResult,
    FleetStatus,
    FleetSyncResult,
)
from clawctl.schemas.snapshots import Kind, SnapshotInfo
from clawctl.services import Services
from clawctl.store.snapshots import SnapshotStore, validate_snapshot_name

router = APIRouter(prefix="/admin")
OFF = "the fleet is off: set [fleet] endpoint (and bucket) in clawd.toml; see docs/fleet.md"


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def _fleet(request: Request) -> FleetStore:
    fleet = _services(request).fleet
    if fleet is None:
        raise BadInput(OFF)
    return fleet


@router.get("/fleet")
async def fleet_status(request: Request) -> FleetStatus:
    services = _services(request)
    fleet, uploader, shipper = services.fleet, services.uploader, services.shipper
    status = FleetStatus(enabled=False)
    if fleet is not None:
        status = await asyncio.to_thread(fleet.status)
    update: dict[str, object] = {}
    if uploader is not None:
        update.update(
            queued=uploader.queued,
            upload_errors=uploader.errors,
            last_upload_error=uploader.last_error,
        )
    if shipper is not None:
        update.update(
            ledger=True,
            ledger_shipped=shipper.shipped,
            ledger_position=shipper.position,
            ledger_error=shipper.last_error,
        )
    return status.model_copy(update=update)


def _uploader(request: Request) -> FleetUploader:
    _fleet(request)
    uploader = _services(request).uploader
    if uploader is None:
        raise BadInput("uploads are off here ([fleet] upload = false)")
    return uploader


@router.post("/fleet/push")
async def fleet_push(body: FleetPushRequest, request: Request) -> FleetPushResult:
    """Queue a named snapshot for upload, or (no name) every named snapshot and pool entry."""
    uploader = _uploader(request)
    store = _services(request).snapshots
    if body.name is not None:
        _, path = store.find(validate_snapshot_name(body.name), "named")
        return FleetPushResult(queued=int(uploader.submit("named", path)))
    return FleetPushResult(queued=_push_all(uploader, store))


def _push_all(uploader: FleetUploader, store: SnapshotStore) -> int:
    """Queue every named snapshot and pool entry (one the fleet holds already costs a
    conditional put that the store refuses, nothing more)."""
    queued = 0
    kinds: tuple[Kind, ...] = ("named", "pool")
    for kind in kinds:
        for entry in store.entries(kind):
            _, path = store.find(entry.name, kind)
            queued += uploader.submit(kind, path)
    return queued


@router.post("/fleet/sync")
async def fleet_sync(request: Request) -> FleetSyncResult:
    """Both ways: queue this box's snapshots for upload, and pull the fleet's named snapshots
    this box lacks."""
    fleet, uploader = _fleet(request), _uploader(request)
    store = _services(request).snapshots
    queued = _push_all(uploader, store)
    local = {entry.name for entry in store.entries("named")}
    pulled = []
    for name in await asyncio.to_thread(fleet.named):
        if name not in local:
            await asyncio.to_thread(fleet.pull_named, name)
            pulled.append(name)
    return FleetSyncResult(queued=queued, pulled=pulled)


@router.post("/fleet/gc")
async def fleet_gc(body: FleetGcRequest, request: Request) -> FleetGcResult:
    return await asyncio.to_thread(_fleet(request).gc, body.older_than_seconds, body.dry_run)


@router.post("/fleet/pull")
async def fleet_pull(body: FleetPullRequest, request: Request) -> SnapshotInfo:
    fleet = _fleet(request)
    if body.as_name is not None:
        validate_snapshot_name(body.as_name)
    return await asyncio.to_thread(fleet.pull_named, body.name, body.as_name)
