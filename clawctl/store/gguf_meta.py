"""Read and check a GGUF file's header with the `gguf` package.

`models add` must reject truncated or foreign files before they reach the store, so besides the
metadata we check that every tensor's bytes lie inside the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from clawctl.errors import BadInput
from clawctl.store.quant_types import quant_name_for_ftype

GGUF_MAGIC = b"GGUF"


class GgufInfo(BaseModel):
    """What the store records about a GGUF model."""

    model_config = ConfigDict(frozen=True)

    architecture: str
    general_type: str
    model_name: str
    quant: str
    context_length: int | None
    embedding_length: int | None
    block_count: int | None
    n_tensors: int
    n_params: int
    chat_template: str | None


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
    )
