"""Admin routes for the daemon's adapters (`/admin/adapters…`)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/admin")
