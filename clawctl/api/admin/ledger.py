"""Admin routes for the daemon's ledger (`/admin/ledger…`)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/admin")
