"""Admin routes for the daemon's policies (`/admin/policies…`)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/admin")
