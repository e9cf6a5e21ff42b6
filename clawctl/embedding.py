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

from clawctl.engines.onnx_embed import Embeddings, OnnxEmbedder
from clawctl.errors import BadInput
from clawctl.store.models import ModelManifest, ModelStore


@dataclass
class _Loaded:
    digest: str
    executor: ThreadPoolExecutor
    embedder: OnnxEmbedder | None = None


class EmbeddingService:
    def __init__(self, store: ModelStore, threads: int = 1) -> None:
        self.store = store
        self.threads = threads
        self._loaded: dict[str, _Loaded] = {}

    def manifest(self, model: str) -> ModelManifest:
        """The installed embedding model `model`; a clear 400 for a model that cannot embed."""
        manifest = self.store.get(model)
        if manifest.onnx is None or manifest.onnx.task != "embedding":
            kind = "a GGUF generation model" if manifest.gguf else "not an embedding model"
            raise BadInput(
                f"model {model!r} is {kind}; embeddings need an embedding model such as "
                "minilm-l6 ('clawctl models pull minilm-l6')",
                param="model",
            )
        return manifest

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
            assert manifest.onnx is not None
            slot.embedder = OnnxEmbedder(
                self.store.model_dir(manifest), self.threads, manifest.onnx.max_tokens
            )
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
            slot.executor.shutdown(wait=True, cancel_futures=True)
        self._loaded.clear()
