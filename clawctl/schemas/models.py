"""The model store's types on the wire: installed-model manifests (with the GGUF or ONNX header
facts they hold), verification results, and the admin requests and answers of `/admin/models…`.

They live here, below the store, the daemon and the CLI alike: the store writes manifests as
these models, the daemon sends them, and the CLI renders them without importing the store.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from clawctl.errors import BadInput


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
    pooling_type: int | None = None  # set by embedding models (BERT...): they can embed
    # Width of one layer's K (or V) per token: the embedding width shrunk by grouped-query
    # attention (KV heads / heads). None in manifests written before it was recorded.
    kv_width: int | None = None


class OnnxInfo(BaseModel):
    """What the store records about an ONNX model (written by whoever built it)."""

    model_config = ConfigDict(frozen=True)

    task: Literal["embedding", "generation"]
    architecture: str
    parameters: int
    dim: int | None = None  # embedding width
    max_tokens: int = 256  # longest input the model is run on (embeddings truncate there)
    bits: int | None = None  # weight bits of the quantized MatMuls; None: float32
    block_size: int | None = None
    accuracy_level: int | None = None
    quality: float | None = None  # embeddings: mean cosine vs the float model on probe texts
    warning: str | None = None  # e.g. "int2 collapses embeddings", shown by `models show`
    # generation models: what the scheduler sizes the KV cache by
    context_length: int | None = None
    layers: int | None = None
    kv_width: int | None = None  # key/value heads x head size
    exact_weights: bool | None = None  # the GGUF's own quantized weights, not re-quantized


class QuantQuality(BaseModel):
    """What a quantized model kept of its source (`clawctl models quantize`): the share of a
    shipped probe text's positions where both pick the same next token."""

    model_config = ConfigDict(frozen=True)

    metric: Literal["greedy_agreement"] = "greedy_agreement"
    value: float  # 0..1
    tokens: int  # positions compared
    probe_sha256: str  # the probe text it was measured on
    imatrix_sha256: str | None = None  # the importance matrix the quantizer used, if any


class ModelManifest(BaseModel):
    """One installed model: its name, its blob and what its header says.

    A GGUF model is one blob. An ONNX model is a directory of blobs (`files`: file name to
    digest; `digest` is its `model.onnx`), which `ModelStore.model_dir` lays out for runtimes
    that load a directory.
    """

    model_config = ConfigDict(frozen=True)

    name: str
    digest: str
    size: int
    format: Literal["gguf", "onnx"] = "gguf"
    source: str
    created_at: datetime
    gguf: GgufInfo | None = None
    onnx: OnnxInfo | None = None
    files: dict[str, str] = {}
    parent: str | None = None
    quality: QuantQuality | None = None  # a quantized model's, measured against `parent`

    def gguf_info(self) -> GgufInfo:
        """The GGUF header of a model that llama.cpp runs; a clear error for other formats."""
        if self.gguf is None:
            raise BadInput(
                f"model {self.name!r} is an ONNX {self.onnx.task if self.onnx else ''} model;"
                " this needs a GGUF model",
                param="model",
            )
        return self.gguf

    @property
    def architecture(self) -> str:
        return self.gguf.architecture if self.gguf else self.onnx.architecture if self.onnx else ""

    @property
    def embeds(self) -> bool:
        """An embedding model: a GGUF with pooled output, or an ONNX embedding export."""
        if self.gguf is not None:
            return bool(self.gguf.pooling_type)
        return self.onnx is not None and self.onnx.task == "embedding"

    @property
    def quant(self) -> str:
        if self.gguf is not None:
            return self.gguf.quant
        bits = self.onnx.bits if self.onnx else None
        return "F32" if bits is None else f"INT{bits}"

    def blob_digests(self) -> set[str]:
        return {self.digest, *self.files.values()}


class VerifyResult(BaseModel):
    """One model re-hashed: `ok` when every blob still hashes to its recorded digest."""

    model_config = ConfigDict(frozen=True)

    name: str
    digest: str
    ok: bool
    actual: str | None = None


# --- admin requests and answers (`/admin/models…`, build operations) ---------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelListing(BaseModel):
    """`GET /admin/models`: every installed model, by name."""

    models: list[ModelManifest]


class VerifyRequest(_Request):
    """`POST /admin/models/verify`: the models to re-hash (none: all)."""

    names: list[str] = []


class VerifyReport(BaseModel):
    results: list[VerifyResult]


class PullRequest(_Request):
    """`POST /admin/models/pull`: a catalog name or an http(s) URL of a GGUF file."""

    ref: str = Field(min_length=1)
    sha256: str | None = None  # expected sha256 of a URL's file
    # Set by clawd, not the client: the fleet store's copy of a catalog model's bytes, tried
    # before the catalog's own source (docs/fleet.md).
    mirror: str | None = None


class PullResult(BaseModel):
    manifest: ModelManifest
    fetched: bool  # False: it was already installed, nothing was downloaded
    from_fleet: bool = False  # fetched from the fleet store rather than the model's source


class AddRequest(_Request):
    """The `add` build operation: import a GGUF file the daemon's user can read."""

    path: str = Field(min_length=1)
    name: str | None = None  # default: derived from the file name
    source: str | None = None  # what the manifest records (default: file:<path>)


class QuantizeRequest(_Request):
    """`POST /admin/models/quantize`: GGUF with llama.cpp's quantizer (`to` a llama.cpp type such
    as q4_0), ONNX with onnxruntime's MatMulNBits (`to` int8, int4 or int2)."""

    name: str
    to: str = Field(min_length=1)
    new_name: str | None = None
    imatrix: str | None = None  # absolute path of an importance matrix the daemon can read
    block_size: int | None = None  # ONNX only
    accuracy_level: int | None = None  # ONNX only


class QuantizeResult(BaseModel):
    manifest: ModelManifest
    # ONNX embedding models: the quantized vectors' cosine vs the float model's; else None
    mean_cosine: float | None = None
    min_cosine: float | None = None


class ConvertRequest(_Request):
    """`POST /admin/models/convert`: an installed GGUF language model rebuilt for
    onnxruntime-genai (`to`: onnx-int4, or onnx-int2, experimental)."""

    name: str
    to: str = Field(min_length=1)
    new_name: str | None = None
