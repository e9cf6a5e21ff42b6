"""Read and check a GGUF file's header with the `gguf` package.

`models add` must reject truncated or foreign files before they reach the store, so besides the
metadata we check that every tensor's bytes lie inside the file.
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any

from clawctl.errors import BadInput
from clawctl.schemas.models import GgufInfo
from clawctl.store.quant_types import quant_name_for_ftype

GGUF_MAGIC = b"GGUF"
# ggml tensor types newer than the `gguf` package: value -> (name, block size, bytes per block),
# the constants of ggml's type traits (llama.cpp as vendored by llama-cpp-python 0.3.36).
NEWER_GGML_TYPES = {41: ("Q1_0", 128, 18), 42: ("Q2_0", 64, 18)}


def _teach_gguf_newer_types() -> None:
    """Let gguf's reader size tensors of types it predates (our own Q2_0 quants use type 42).

    Unknown enum values become pseudo-members instead of raising, and their block sizes are added
    to gguf's size table. Types gguf already knows are left untouched.
    """
    from gguf import constants

    enum = constants.GGMLQuantizationType
    if getattr(enum, "_claw_extended", False):
        return

    def _missing_(cls: type[Any], value: object) -> Any:
        if not isinstance(value, numbers.Integral) or int(value) not in NEWER_GGML_TYPES:
            return None  # numpy integers are Integral but not int
        member = int.__new__(cls, int(value))
        member._name_ = NEWER_GGML_TYPES[int(value)][0]
        member._value_ = int(value)
        return member

    enum._missing_ = classmethod(_missing_)  # type: ignore[method-assign, assignment]
    for value, (_, block, size) in NEWER_GGML_TYPES.items():
        known = {int(k) for k in constants.GGML_QUANT_SIZES}
        if value not in known:
            constants.GGML_QUANT_SIZES[enum(value)] = (block, size)
    enum._claw_extended = True  # type: ignore[attr-defined]


def _field(reader: Any, key: str) -> object:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _optional_int(value: object) -> int | None:
    return int(value) if isinstance(value, int | float) else None


def read_gguf_info(path: Path) -> GgufInfo:
    """Parse and structurally validate a GGUF file; BadInput if it is not a usable one."""
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise BadInput(f"{path} is not a GGUF file (magic {magic!r})")
    from gguf import GGUFReader

    _teach_gguf_newer_types()
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # the reader raises assorted errors on damaged files
        raise BadInput(f"{path} is not a valid GGUF file: {exc}") from None
    size = path.stat().st_size
    end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size or not reader.tensors:
        raise BadInput(f"{path} is truncated: tensor data ends at byte {end}, file has {size}")
    arch = _field(reader, "general.architecture")
    if not isinstance(arch, str):
        raise BadInput(f"{path} has no general.architecture: not a model GGUF")
    general_type = _field(reader, "general.type")
    name = _field(reader, "general.name")
    template = _field(reader, "tokenizer.chat_template")
    n_params = 0
    for tensor in reader.tensors:
        count = 1
        for dim in tensor.shape:
            count *= int(dim)
        n_params += count
    return GgufInfo(
        architecture=arch,
        general_type=general_type if isinstance(general_type, str) else "model",
        model_name=name if isinstance(name, str) else path.stem,
        quant=quant_name_for_ftype(_optional_int(_field(reader, "general.file_type"))),
        context_length=_optional_int(_field(reader, f"{arch}.context_length")),
        embedding_length=_optional_int(_field(reader, f"{arch}.embedding_length")),
        block_count=_optional_int(_field(reader, f"{arch}.block_count")),
        n_tensors=len(reader.tensors),
        n_params=n_params,
        chat_template=template if isinstance(template, str) else None,
        pooling_type=_optional_int(_field(reader, f"{arch}.pooling_type")),
        kv_width=_kv_width(reader, arch),
    )


def _kv_width(reader: Any, arch: str) -> int | None:
    width = _optional_int(_field(reader, f"{arch}.embedding_length"))
    heads = _optional_int(_field(reader, f"{arch}.attention.head_count"))
    kv_heads = _optional_int(_field(reader, f"{arch}.attention.head_count_kv")) or heads
    if width is None or not heads or not kv_heads:
        return width
    return width * kv_heads // heads
