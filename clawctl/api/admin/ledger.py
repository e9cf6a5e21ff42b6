"""Admin routes for the daemon's ledger (`/admin/ledger…`): thin, schema in, service call, schema out."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/admin")
