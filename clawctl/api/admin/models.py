"""Admin routes for the daemon's models (`/admin/models…`)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/admin")
