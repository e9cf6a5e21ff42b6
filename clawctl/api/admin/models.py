"""Admin routes for the daemon's models (`/admin/models…`).

Reads (list, show) and small changes (rm) are answered here from the store; verifying re-hashes
blobs in a worker thread. Everything heavy (pull, add, quantize, convert) runs as a build
operation in a subprocess (serving/build_runner.py) whose progress lines are relayed as NDJSON.
Names are validated here, before any file or process is touched. An upload is streamed from the
request body into a temp file in the store's own blobs dir, refused after its first bytes if it
is not GGUF, and removed once the `add` operation is over, however it ends.
"""

from __future__ import annotations

import asyncio
import os
import pwd
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from clawctl.api.admin.streaming import ndjson
from clawctl.errors import BadInput
from clawctl.schemas.jobs import JobLine, ResultLine
from clawctl.schemas.models import (
    AddRequest,
    ConvertRequest,
    ModelListing,
    ModelManifest,
    PullRequest,
    PullResult,
    QuantizeRequest,
    VerifyReport,
    VerifyRequest,
)
from clawctl.services import Services
from clawctl.serving.build_runner import run_build
from clawctl.store.gguf_meta import GGUF_MAGIC
from clawctl.store.names import name_from_filename, validate_model_name

router = APIRouter(prefix="/admin")
WRITE_CHUNK = 1 << 20  # bytes gathered before one write in a worker thread


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


@router.get("/models")
async def list_models(request: Request) -> ModelListing:
    return ModelListing(models=_services(request).store.installed())


@router.get("/models/{name:path}")
async def show_model(request: Request, name: str) -> ModelManifest:
    return _services(request).store.get(validate_model_name(name))


@router.delete("/models/{name:path}")
async def remove_model(request: Request, name: str) -> ModelManifest:
    """Remove a model's manifest, and its blobs once no other model uses them."""
    return _services(request).store.remove(validate_model_name(name))


@router.post("/models/verify")
async def verify_models(request: Request, body: VerifyRequest) -> VerifyReport:
    """Re-hash the named models' blobs (all models when `names` is empty)."""
    names = [validate_model_name(n) for n in body.names]
    store = _services(request).store
    return VerifyReport(results=await asyncio.to_thread(store.verify, names or None))


@router.post("/models/pull")
async def pull_model(request: Request, body: PullRequest) -> StreamingResponse:
    """NDJSON: progress, then a `PullResult`. With a fleet, a catalog model comes from the
    fleet's copy when it has one, and one fetched from its source is shared afterwards."""
    services = _services(request)
    mirror = None
    if not body.ref.startswith(("http://", "https://")):
        validate_model_name(body.ref)
        entry = services.store.catalog.models.get(body.ref)
        if services.fleet is not None and entry is not None and entry.convert is None:
            mirror = await asyncio.to_thread(services.fleet.blob_url, entry.sha256)
    lines = run_build("pull", body.model_copy(update={"mirror": mirror}).model_dump(mode="json"))
    return ndjson(_share_pulled(services, lines))


async def _share_pulled(
    services: Services, lines: AsyncIterator[JobLine]
) -> AsyncIterator[JobLine]:
    """Relay the pull's lines; a model it fetched from its source goes to the fleet."""
    async for line in lines:
        if isinstance(line, ResultLine) and services.uploader is not None:
            result = PullResult.model_validate(line.result)
            if result.fetched and not result.from_fleet:
                for digest in result.manifest.blob_digests():
                    services.uploader.submit("model", services.store.blob_path(digest))
        yield line


@router.post("/models/add")
async def add_model(body: AddRequest) -> StreamingResponse:
    """NDJSON: import a GGUF file from a path clawd's user can read; then a `ModelManifest`."""
    if body.name is not None:
        validate_model_name(body.name)
    path = Path(body.path)
    if not path.is_absolute():
        raise BadInput(f"{body.path!r} is not an absolute path", param="path")
    _readable(path, "model")
    return ndjson(run_build("add", body.model_dump(mode="json")))


@router.post("/models/upload")
async def upload_model(
    request: Request, name: str | None = None, filename: str | None = None
) -> StreamingResponse:
    """The request body is a GGUF file (raw bytes). NDJSON: the import's progress, then a
    `ModelManifest`. `name` defaults to one derived from `filename`."""
    if name is not None:
        model_name = validate_model_name(name)
    elif filename:
        model_name = name_from_filename(filename)
    else:
        raise BadInput("pass ?name=NAME (or ?filename=FILE to name the model after it)")
    tmp = _services(request).store.upload_file()
    try:
        await _receive_gguf(request, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    job = AddRequest(path=str(tmp), name=model_name, source=f"upload:{filename or model_name}")

    async def lines() -> AsyncIterator[JobLine]:
        try:
            async for line in run_build("add", job.model_dump(mode="json")):
                yield line
        finally:
            tmp.unlink(missing_ok=True)

    response = ndjson(lines())
    # The stream's own `finally` covers a client that leaves mid-stream; this covers a stream
    # that never started. An abandoned file would still be swept with the store's temps.
    response.background = BackgroundTask(tmp.unlink, missing_ok=True)
    return response


@router.post("/models/quantize")
async def quantize_model(body: QuantizeRequest) -> StreamingResponse:
    """NDJSON: progress, then a `QuantizeResult`."""
    validate_model_name(body.name)
    if body.new_name is not None:
        validate_model_name(body.new_name)
    if body.imatrix is not None:
        imatrix = Path(body.imatrix)
        if not imatrix.is_absolute():
            raise BadInput(f"imatrix {body.imatrix!r} is not an absolute path", param="imatrix")
        _readable(imatrix, "imatrix")
    return ndjson(run_build("quantize", body.model_dump(mode="json")))


@router.post("/models/convert")
async def convert_model(body: ConvertRequest) -> StreamingResponse:
    """NDJSON: progress, then the converted model's `ModelManifest`."""
    validate_model_name(body.name)
    if body.new_name is not None:
        validate_model_name(body.new_name)
    return ndjson(run_build("convert", body.model_dump(mode="json")))


def _readable(path: Path, what: str) -> None:
    """A file clawd reads by path must be readable by clawd's user, not only by the caller."""
    if path.is_file() and os.access(path, os.R_OK):
        return
    user = pwd.getpwuid(os.geteuid()).pw_name
    problem = "cannot read" if path.is_file() else "finds no file at"
    raise BadInput(
        f"clawd (running as user {user!r}) {problem} {path}; the {what} file must be readable "
        "by the daemon's user (e.g. chmod o+r it, or copy it to a shared directory)",
        param=what,
    )


async def _receive_gguf(request: Request, target: Path) -> None:
    """Stream the body into `target`, refusing it as soon as its first bytes are not GGUF's."""
    head = b""
    buffer = bytearray()
    with target.open("wb") as sink:
        async for chunk in request.stream():
            if len(head) < len(GGUF_MAGIC):
                head += chunk[: len(GGUF_MAGIC) - len(head)]
                if len(head) == len(GGUF_MAGIC) and head != GGUF_MAGIC:
                    raise _not_gguf(head)
            buffer += chunk
            if len(buffer) >= WRITE_CHUNK:
                await _write(sink, buffer)
                buffer = bytearray()
        if head != GGUF_MAGIC:
            raise _not_gguf(head)
        await _write(sink, buffer)


async def _write(sink: IO[bytes], data: bytearray) -> None:
    if data:
        await asyncio.to_thread(sink.write, data)


def _not_gguf(head: bytes) -> BadInput:
    return BadInput(
        f"the upload is not a GGUF file (it starts with {head!r}, not {GGUF_MAGIC!r})",
        param="body",
    )
