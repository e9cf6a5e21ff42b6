"""Build operations on models: pull, add, quantize, convert (registered in build/ops.py).

These are the heavy halves of `/admin/models…`: downloads and hashing, GGUF parsing, llama.cpp's
and onnxruntime's quantizers, the genai builder. clawd validates names before it starts one, and
runs it as `python -m clawctl.build OP ARGS_JSON` with its own environment, so the store opened
here is the daemon's. Progress goes out as `start`/`advance` lines, warnings as `message` lines.
"""

from __future__ import annotations

import math
from pathlib import Path

from clawctl.build.jobstream import LineProgress, LineWriter
from clawctl.build.ops import op
from clawctl.config import load_paths
from clawctl.errors import BadInput, ClawError
from clawctl.schemas.models import (
    AddRequest,
    ConvertRequest,
    ModelManifest,
    PullRequest,
    PullResult,
    QuantizeRequest,
    QuantizeResult,
)
from clawctl.store.models import ModelStore

ONNX_TARGETS = {"int8": 8, "int4": 4, "int2": 2}


def _store() -> ModelStore:
    return ModelStore(load_paths())


@op("pull", PullRequest)
def pull(request: PullRequest, progress: LineProgress, writer: LineWriter) -> PullResult:
    """A catalog model (converted here when the catalog says so) or a GGUF URL; instant when
    the same bytes are already installed."""
    from clawctl.build.convert.recipes import pull_model

    store = _store()
    if request.mirror is not None:
        try:
            manifest, fetched = store.pull(request.ref, progress=progress, mirror=request.mirror)
            return PullResult(manifest=manifest, fetched=fetched, from_fleet=fetched)
        except ClawError as exc:  # unreachable, or other bytes: the catalog's source then
            writer.message(f"the fleet's copy was not used ({exc.message})", "warning")
    manifest, fetched = pull_model(store, request.ref, sha256=request.sha256, progress=progress)
    return PullResult(manifest=manifest, fetched=fetched)


@op("add", AddRequest)
def add(request: AddRequest, progress: LineProgress, writer: LineWriter) -> ModelManifest:
    """A GGUF file the daemon's user can read (an upload's temp file, or a path on this box):
    checked, hashed and adopted."""
    return _store().add(
        Path(request.path), name=request.name, progress=progress, source=request.source
    )


@op("quantize", QuantizeRequest)
def quantize(
    request: QuantizeRequest, progress: LineProgress, writer: LineWriter
) -> QuantizeResult:
    """GGUF through llama.cpp's quantizer (`to` a llama.cpp type), ONNX through onnxruntime's
    MatMulNBits quantizer (`to` int8/int4/int2, with the embeddings' cosine against float)."""
    store = _store()
    bits = ONNX_TARGETS.get(request.to.lower())
    if bits is not None:
        from clawctl.build.convert.recipes import quantize_onnx_model

        progress.start(f"quantizing {request.name} to {request.to.lower()}", None)
        done = quantize_onnx_model(
            store,
            request.name,
            bits,
            block_size=request.block_size,
            accuracy_level=request.accuracy_level,
            new_name=request.new_name,
        )
        _warn(done.manifest, writer)
        return QuantizeResult(
            manifest=done.manifest,
            mean_cosine=None if math.isnan(done.mean_cosine) else done.mean_cosine,
            min_cosine=None if math.isnan(done.min_cosine) else done.min_cosine,
        )
    if request.block_size is not None or request.accuracy_level is not None:
        raise BadInput("--block-size and --accuracy-level apply to ONNX int8/int4/int2 only")
    from clawctl.build.quantize_gguf import quantize_model

    progress.start(f"quantizing {request.name} to {request.to}", None)
    manifest = quantize_model(
        store,
        request.name,
        request.to,
        new_name=request.new_name,
        imatrix=Path(request.imatrix) if request.imatrix else None,
    )
    return QuantizeResult(manifest=manifest)


@op("convert", ConvertRequest)
def convert(request: ConvertRequest, progress: LineProgress, writer: LineWriter) -> ModelManifest:
    """An installed GGUF language model rebuilt as an onnxruntime-genai model."""
    from clawctl.build.convert.recipes import convert_model

    progress.start(
        f"converting {request.name} to {request.to} (dequantize, build, carry weights over)", None
    )
    manifest = convert_model(_store(), request.name, request.to, new_name=request.new_name)
    _warn(manifest, writer)
    return manifest


def _warn(manifest: ModelManifest, writer: LineWriter) -> None:
    if manifest.onnx is not None and manifest.onnx.warning:
        writer.message(manifest.onnx.warning, "warning")
