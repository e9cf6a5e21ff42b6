"""`clawctl models quantize`: llama.cpp's quantizer, run in-process through llama-cpp-python.

The result is written to a temp file inside the blob store and adopted only when llama.cpp
succeeds and the file parses as GGUF, so a failed or interrupted quantization leaves the store
as it was. Types whose quality depends on an importance matrix (the IQ2/IQ1 family, Q2_K_S) refuse
to run without one; the matrix is read from llama-imatrix's GGUF output with the `gguf` package.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from clawctl.build.quant_quality import greedy_agreement
from clawctl.errors import BadInput, EngineError
from clawctl.schemas.models import ModelManifest
from clawctl.store.gguf_meta import read_gguf_info
from clawctl.store.models import ModelStore
from clawctl.store.names import validate_model_name
from clawctl.store.quant_types import QuantType, quant_by_name

IN_SUM2, COUNTS = ".in_sum2", ".counts"


def load_imatrix(path: Path) -> dict[str, list[float]]:
    """Per-tensor importance (mean squared activation) from a GGUF imatrix file."""
    import numpy as np
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as exc:
        raise BadInput(
            f"{path} is not a GGUF imatrix file ({exc}); legacy .dat is unsupported"
        ) from None
    tensors = {t.name: np.asarray(t.data, dtype=np.float32).reshape(-1) for t in reader.tensors}
    result: dict[str, list[float]] = {}
    for name, sums in tensors.items():
        if not name.endswith(IN_SUM2):
            continue
        base = name[: -len(IN_SUM2)]
        counts = tensors.get(base + COUNTS)
        if counts is None or not counts.size:
            raise BadInput(f"{path}: tensor {base} has sums but no counts")
        per_matrix = sums.reshape(counts.size, -1) / np.maximum(counts, 1.0)[:, None]
        result[base] = per_matrix.reshape(-1).tolist()
    if not result:
        raise BadInput(f"{path} holds no importance data ('*.in_sum2' tensors)")
    return result


def _imatrix_array(
    data: dict[str, list[float]],
) -> tuple[Any, list[object]]:
    """A NULL-terminated C array of llama_model_imatrix_data, plus the buffers it points into."""
    import llama_cpp

    keep: list[object] = []
    entries = (llama_cpp.llama_model_imatrix_data * (len(data) + 1))()
    for i, (name, values) in enumerate(data.items()):
        floats = (ctypes.c_float * len(values))(*values)
        encoded = name.encode()
        keep.extend([floats, encoded])
        entries[i].name = encoded
        entries[i].data = ctypes.cast(floats, ctypes.POINTER(ctypes.c_float))
        entries[i].size = len(values)
    return entries, keep


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence C-level writes to stderr (file descriptor 2) for the duration."""
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def quantize_file(source: Path, target: Path, qtype: QuantType, imatrix: Path | None) -> None:
    import llama_cpp

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's per-tensor log

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = qtype.ftype
    params.nthread = os.cpu_count() or 1
    params.allow_requantize = True  # catalog models ship already quantized
    keep: list[object] = []
    if imatrix is not None:
        entries, keep = _imatrix_array(load_imatrix(imatrix))
        params.imatrix = ctypes.cast(entries, type(params.imatrix))
        keep.append(entries)
    with _quiet_stderr():  # llama.cpp prints per-tensor fallbacks with printf
        code = llama_cpp.llama_model_quantize(
            str(source).encode(), str(target).encode(), ctypes.byref(params)
        )
    if code != 0:
        raise EngineError(
            f"llama.cpp could not quantize {source.name} to {qtype.name} (code {code})"
        )


def quantize_model(
    store: ModelStore,
    name: str,
    to: str,
    *,
    new_name: str | None = None,
    imatrix: Path | None = None,
) -> ModelManifest:
    qtype = quant_by_name(to)
    if qtype.needs_imatrix and imatrix is None:
        raise BadInput(
            f"{qtype.name} needs an importance matrix: pass --imatrix FILE (llama-imatrix output), "
            "or choose q2_0/q2_k for 2-bit without one",
            param="imatrix",
        )
    if imatrix is not None and not imatrix.is_file():
        raise BadInput(f"no such imatrix file: {imatrix}", param="imatrix")
    store.get(name).gguf_info()  # an ONNX model quantizes to int8/int4/int2 instead
    source = store.model_file(name)
    target_name = validate_model_name(new_name or f"{name}-{qtype.name}")
    if any(m.name == target_name for m in store.installed()):
        raise BadInput(f"model {target_name!r} already exists; pass --name or rm it first")
    with store.temp_blob() as (tmp, fd):
        os.close(fd)
        quantize_file(source, tmp, qtype, imatrix)
        read_gguf_info(tmp)  # a file llama.cpp could not load is refused before it is measured
        quality = greedy_agreement(source, tmp, imatrix)
        label = f"quantize:{name}:{qtype.name}"
        return store.import_built(target_name, tmp, label, name, quality)
