"""Admin routes for the daemon's snapshots (`/admin/snapshots…`)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/admin")
