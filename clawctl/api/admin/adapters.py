"""Admin routes for the daemon's adapters (`/admin/adapters…`).

Reads, removal and verification run in clawd against its own store. Installs run as the
`adapter_install` build operation in a subprocess (it parses GGUF files and hashes them) and
answer NDJSON `JobLine`s: from a URL, or from a file the client uploads as the request body,
which is streamed to a temp file in the daemon's data dir and removed whatever happens. clawd
reads manifests per request, so an install or removal takes effect without a restart; a removed
adapter that a running generation uses stays loaded until that model's worker is idle.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from clawctl.api.admin.streaming import ndjson
from clawctl.schemas.adapters import (
    AdapterInstallJob,
    AdapterInstallRequest,
    AdapterListing,
    AdapterManifest,
    AdapterVerifyReport,
)
from clawctl.schemas.jobs import ErrorLine, JobLine, MessageLine, ResultLine
from clawctl.services import Services
from clawctl.serving.build_runner import run_build
from clawctl.store.names import name_from_filename, validate_model_name

router = APIRouter(prefix="/admin")
INSTALL_OP = "adapter_install"


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def _install_job(
    services: Services,
    base: str,
    name: str | None,
    file_name: str,
    source: str,
    label: str,
    sha256: str | None,
) -> AdapterInstallJob:
    """Check what can be checked before any byte moves: the names, and that the base exists.
    The name defaults to one made from the file's name."""
    services.store.get(validate_model_name(base))
    resolved = validate_model_name(name) if name else name_from_filename(file_name)
    return AdapterInstallJob(base=base, name=resolved, source=source, label=label, sha256=sha256)


@router.get("/adapters")
async def list_adapters(request: Request, base: str | None = None) -> AdapterListing:
    return AdapterListing(adapters=_services(request).adapters.installed(base))


@router.post("/adapters/install")
async def install_adapter(body: AdapterInstallRequest, request: Request) -> StreamingResponse:
    """Fetch, verify and install an adapter from an http(s) URL (NDJSON progress)."""
    file_name = body.url.split("?")[0].rsplit("/", 1)[-1]
    services = _services(request)
    job = _install_job(services, body.base, body.name, file_name, body.url, body.url, body.sha256)
    mirror = None
    if services.fleet is not None and body.sha256 is not None:
        mirror = await asyncio.to_thread(services.fleet.blob_url, body.sha256)
    return ndjson(_install_via_fleet(services, job, mirror))


async def _install_via_fleet(
    services: Services, job: AdapterInstallJob, mirror: str | None
) -> AsyncIterator[JobLine]:
    """Install from the fleet's copy when it has one (same pinned sha256), else from the URL,
    or from the URL after the fleet's copy failed; one fetched from its URL is shared."""
    if mirror is not None:
        via_fleet = job.model_copy(update={"source": mirror}).model_dump(mode="json")
        async for line in run_build(INSTALL_OP, via_fleet):
            if isinstance(line, ErrorLine):  # progress so far stays shown; the URL is next
                text = f"the fleet's copy was not used ({line.message})"
                yield MessageLine(text=text, level="warning")
                break
            yield line
        else:
            return
    async for line in run_build(INSTALL_OP, job.model_dump(mode="json")):
        if isinstance(line, ResultLine) and services.uploader is not None:
            manifest = AdapterManifest.model_validate(line.result)
            services.uploader.submit("adapter", services.store.blob_path(manifest.digest))
        yield line


async def _install_upload(job: AdapterInstallJob, upload: Path) -> AsyncIterator[JobLine]:
    try:
        async for line in run_build(INSTALL_OP, job.model_dump(mode="json")):
            yield line
    finally:
        upload.unlink(missing_ok=True)


@router.post("/adapters/upload")
async def upload_adapter(
    request: Request,
    base: str,
    name: str | None = None,
    sha256: str | None = None,
    filename: str | None = None,
) -> StreamingResponse:
    """Install the adapter file sent as the request body (NDJSON progress)."""
    services = _services(request)
    file_name = (filename or "adapter.gguf").rsplit("/", 1)[-1]
    upload = services.store.upload_file()
    try:
        job = _install_job(
            services, base, name, file_name, str(upload), f"upload:{file_name}", sha256
        )
        with upload.open("wb") as handle:
            async for chunk in request.stream():
                handle.write(chunk)
    except BaseException:
        upload.unlink(missing_ok=True)
        raise
    return ndjson(_install_upload(job, upload))


# `:path`: names with a slash reach the handler and its validation (a 400, not a bare 404).
@router.get("/adapters/{base}/{name:path}")
async def show_adapter(base: str, name: str, request: Request) -> AdapterManifest:
    return _services(request).adapters.get(base, name)


@router.delete("/adapters/{base}/{name:path}")
async def remove_adapter(base: str, name: str, request: Request) -> AdapterManifest:
    """Remove an adapter; a generation using it right now finishes with it."""
    return _services(request).adapters.remove(base, name)


@router.post("/adapters/verify")
async def verify_adapters(request: Request) -> AdapterVerifyReport:
    """Re-hash every adapter's bytes."""
    results = await asyncio.to_thread(_services(request).adapters.verify)
    return AdapterVerifyReport(results=results)
