"""Embedding models in the daemon: loaded on first use, each run on its own thread.

`/v1/embeddings` and the answer cache's semantic lookup both come here. An embedding model is
small (15-90 MB) next to the generation models and is kept loaded while the daemon runs; each has
one dedicated thread, as every model in clawd has, so onnxruntime's own threads are the only
parallelism and two callers never contend inside one session.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from clawctl.engines.onnx.embed import Embeddings, OnnxEmbedder
from clawctl.errors import BadInput
from clawctl.schemas.models import ModelManifest
from clawctl.store.models import ModelStore

GGUF_MAX_TOKENS = 512


class Embedder(Protocol):
    dim: int

    def embed(self, texts: list[str]) -> Embeddings: ...

    def close(self) -> None: ...


def load_embedder(store: ModelStore, manifest: ModelManifest, threads: int) -> Embedder:
    """An ONNX encoder with onnxruntime, or a GGUF embedding model with llama.cpp."""
    if manifest.onnx is not None:
        return OnnxEmbedder(store.model_dir(manifest), threads, manifest.onnx.max_tokens)
    from clawctl.engines.llama.embed import GgufEmbedder

    info = manifest.gguf_info()
    limit = min(info.context_length or GGUF_MAX_TOKENS, GGUF_MAX_TOKENS)
    return GgufEmbedder(store.model_file(manifest.name), threads, limit)


@dataclass
class _Loaded:
    digest: str
    executor: ThreadPoolExecutor
    embedder: Embedder | None = None


class EmbeddingService:
    def __init__(self, store: ModelStore, threads: int = 1) -> None:
        self.store = store
        self.threads = threads
        self._loaded: dict[str, _Loaded] = {}

    def manifest(self, model: str) -> ModelManifest:
        """The installed embedding model `model`; a clear 400 for a model that cannot embed."""
        manifest = self.store.get(model)
        if not manifest.embeds:
            kind = "a GGUF generation model" if manifest.gguf else "not an embedding model"
            raise BadInput(
                f"model {model!r} is {kind}; embeddings need an embedding model such as "
                "minilm-l6 or minilm-l6-gguf ('clawctl models pull minilm-l6')",
                param="model",
            )
        return manifest  # GGUF (pooled output): llama.cpp embeds; ONNX: onnxruntime does

    def _slot(self, manifest: ModelManifest) -> _Loaded:
        slot = self._loaded.get(manifest.name)
        if slot is None or slot.digest != manifest.digest:  # replaced under the same name
            if slot is not None:
                slot.executor.shutdown(wait=False)
            executor = ThreadPoolExecutor(1, thread_name_prefix=f"embed-{manifest.name}")
            slot = self._loaded[manifest.name] = _Loaded(manifest.digest, executor)
        return slot

    def _run(self, manifest: ModelManifest, slot: _Loaded, texts: list[str]) -> Embeddings:
        if slot.embedder is None:
            slot.embedder = load_embedder(self.store, manifest, self.threads)
        return slot.embedder.embed(texts)

    async def embed(self, model: str, texts: list[str]) -> Embeddings:
        manifest = self.manifest(model)
        slot = self._slot(manifest)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(slot.executor, self._run, manifest, slot, texts)

    def loaded(self) -> list[str]:
        return [name for name, slot in self._loaded.items() if slot.embedder is not None]

    def close(self) -> None:
        for slot in self._loaded.values():
            if slot.embedder is not None:  # freed on the thread that used it (llama.cpp)
                slot.executor.submit(slot.embedder.close)
            slot.executor.shutdown(wait=True, cancel_futures=False)
        self._loaded.clear()
