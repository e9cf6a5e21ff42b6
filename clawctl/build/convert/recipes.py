"""Converted models in the store: pulled by conversion from their published weights (MiniLM as
ONNX or as a GGUF embedding model), ONNX models quantized to 8, 4 or 2 bits with the quality loss
measured and recorded, and GGUF language models rebuilt for onnxruntime-genai.

Everything is built in a scratch directory inside the blobs dir and adopted only when it
verifies, so an interrupted pull or quantization leaves the store as it was.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from clawctl.errors import BadInput, IntegrityError, ModelNotFound
from clawctl.schemas.models import ModelManifest, OnnxInfo
from clawctl.store.catalog import CatalogEntry
from clawctl.store.models import ONNX_MAIN_FILE, ModelStore
from clawctl.store.names import validate_model_name
from clawctl.store.sources import NullProgress, ProgressSink

TOKENIZER_FILE = "tokenizer.json"
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for MiniLM
# Texts the quantized model's embeddings are compared on: questions, statements, code, numbers.
PROBES = (
    "How do I reset my password?",
    "What is the capital of France?",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b): return a + b",
    "Invoice 4471 is due on 2026-03-01 for 1,250 EUR.",
    "Summarise the following meeting notes in three bullet points.",
    "Is it going to rain in Lisbon tomorrow afternoon?",
    "SELECT name FROM users WHERE age > 30 ORDER BY name;",
    "The patient reports mild headaches after taking the medication.",
    "Translate 'good morning' into German.",
    "What is 17 times 23?",
    "Our edge box has two cores and eight gigabytes of memory.",
)
DRIFT_COSINE = 0.99  # below this a semantic cache threshold near 0.998 rarely matches
COLLAPSE_COSINE = 0.8  # below this the vectors no longer order texts by meaning


@dataclass(frozen=True)
class QuantizedOnnx:
    manifest: ModelManifest
    mean_cosine: float
    min_cosine: float
    seconds: float


def pull_model(
    store: ModelStore, ref: str, *, sha256: str | None = None, progress: ProgressSink | None = None
) -> tuple[ModelManifest, bool]:
    """`clawctl models pull`: a catalog model that needs converting is built here; every
    other reference is fetched as is by the store."""
    entry = store.catalog.models.get(ref)
    if entry is not None and entry.convert is not None:
        return pull_converted(store, entry, progress or NullProgress())
    return store.pull(ref, sha256=sha256, progress=progress)


def pull_converted(
    store: ModelStore, entry: CatalogEntry, progress: ProgressSink
) -> tuple[ModelManifest, bool]:
    from clawctl.build.convert.bert_onnx import convert_bert

    try:
        existing = store.get(entry.name)
    except (ModelNotFound, IntegrityError):
        existing = None
    if (
        existing is not None
        and existing.source == entry.source_label()
        and all(store.blob_path(d).is_file() for d in existing.blob_digests())
    ):
        return existing, False
    with store.temp_dir() as work:
        sources = work / "source"
        sources.mkdir()
        store.fetch(
            entry.name,
            list(entry.parts),
            entry.sha256,
            sources / "model.safetensors",
            progress,
            entry.size,
        )
        for extra in entry.inputs:
            store.fetch(
                f"{entry.name} {extra.name}",
                [extra.part],
                extra.sha256,
                sources / extra.name,
                progress,
            )
        built = work / "built"
        built.mkdir()
        if entry.convert == "bert-gguf":
            from clawctl.build.convert.bert_gguf import convert_bert_gguf

            convert_bert_gguf(sources, built / "model.gguf", name=entry.name)
            manifest = store.import_built(
                entry.name, built / "model.gguf", entry.source_label(), parent=None
            )
            return manifest, True
        converted = convert_bert(sources, built / ONNX_MAIN_FILE)
        shutil.copyfile(sources / TOKENIZER_FILE, built / TOKENIZER_FILE)
        info = OnnxInfo(
            task="embedding",
            architecture="bert",
            parameters=converted.parameters,
            dim=converted.dim,
            max_tokens=MAX_TOKENS,
            quality=round(converted.reference_cosine, 6),
        )
        files = {ONNX_MAIN_FILE: built / ONNX_MAIN_FILE, TOKENIZER_FILE: built / TOKENIZER_FILE}
        return store.import_onnx(entry.name, files, info, entry.source_label()), True


def compare_embeddings(reference: Path, candidate: Path, max_tokens: int) -> tuple[float, float]:
    """Mean and min cosine between two embedding models' vectors for the probe texts."""
    import numpy as np

    from clawctl.engines.onnx.embed import OnnxEmbedder

    base = OnnxEmbedder(reference, threads=2, max_tokens=max_tokens).embed(list(PROBES)).vectors
    other = OnnxEmbedder(candidate, threads=2, max_tokens=max_tokens).embed(list(PROBES)).vectors
    cosines = np.sum(base * other, axis=1) / (
        np.linalg.norm(base, axis=1) * np.linalg.norm(other, axis=1) + 1e-12
    )
    return float(cosines.mean()), float(cosines.min())


def quality_warning(bits: int, mean_cosine: float) -> str | None:
    if mean_cosine < COLLAPSE_COSINE:
        return (
            f"int{bits} collapses the embeddings (cosine {mean_cosine:.2f} vs float): "
            "not usable for search or the semantic cache"
        )
    if mean_cosine < DRIFT_COSINE:
        return (
            f"int{bits} embeddings drift from float (cosine {mean_cosine:.3f}): cache thresholds "
            "near 0.998 will rarely match; int8 keeps >= 0.9995"
        )
    return None


def quantize_onnx_model(
    store: ModelStore,
    name: str,
    bits: int,
    *,
    block_size: int | None = None,
    accuracy_level: int | None = None,
    new_name: str | None = None,
) -> QuantizedOnnx:
    """Quantize an installed ONNX model's MatMul weights and record how far it moved."""
    import time

    from clawctl.build.quantize_onnx import OnnxQuantOptions, quantize_onnx

    source = store.get(name)
    if source.onnx is None:
        raise BadInput(f"{name} is a GGUF model; use a llama.cpp type such as q4_0", param="to")
    if source.onnx.bits is not None:
        raise BadInput(f"{name} is already quantized; quantize its float parent {source.parent}")
    target_name = validate_model_name(new_name or f"{name}-int{bits}")
    if any(m.name == target_name for m in store.installed()):
        raise BadInput(f"model {target_name!r} already exists; pass --name or rm it first")
    options = OnnxQuantOptions.create(bits, block_size, accuracy_level)
    source_dir = store.model_dir(source)
    started = time.perf_counter()
    with store.temp_dir() as work:
        report = quantize_onnx(source_dir / ONNX_MAIN_FILE, work / ONNX_MAIN_FILE, options)
        shutil.copyfile(source_dir / TOKENIZER_FILE, work / TOKENIZER_FILE)
        mean, low = (
            compare_embeddings(source_dir, work, source.onnx.max_tokens)
            if source.onnx.task == "embedding"
            else (float("nan"), float("nan"))
        )
        warnings = [*report.warnings]
        drift = quality_warning(bits, mean) if source.onnx.task == "embedding" else None
        if drift:
            warnings.append(drift)
        info = source.onnx.model_copy(
            update={
                "bits": report.bits,
                "block_size": report.block_size,
                "accuracy_level": report.accuracy_level,
                "quality": round(mean, 6) if source.onnx.task == "embedding" else None,
                "warning": "; ".join(warnings) or None,
            }
        )
        files = {ONNX_MAIN_FILE: work / ONNX_MAIN_FILE, TOKENIZER_FILE: work / TOKENIZER_FILE}
        manifest = store.import_onnx(
            target_name, files, info, f"quantize:{name}:int{bits}", parent=name
        )
    return QuantizedOnnx(manifest, mean, low, time.perf_counter() - started)


def convert_model(
    store: ModelStore, name: str, target: str, *, new_name: str | None = None
) -> ModelManifest:
    """`clawctl models convert NAME --to onnx-int4`: an installed GGUF language model rebuilt
    as an onnxruntime-genai model (see `gguf_onnx`), adopted into the store as a directory.

    onnx-int2 is experimental: the builder has no 2-bit dense layers, so the model is built in
    float32 and its MatMuls quantized to 2 bits here (block 32, accuracy level 4, the fast
    kernel); SmolLM2-135M then answers gibberish, which the manifest's warning says."""
    from clawctl.build.convert.gguf_onnx import convert_gguf_to_genai
    from clawctl.build.quantize_onnx import OnnxQuantOptions, quantize_onnx

    formats = {"onnx-int4": 4, "onnx-int2": 2}
    if target not in formats:
        raise BadInput(f"unknown target {target!r}; choose one of {', '.join(formats)}", param="to")
    bits = formats[target]
    source = store.get(name)
    source.gguf_info()  # ONNX in, ONNX out is not a conversion
    target_name = validate_model_name(new_name or f"{name}-{target}")
    if any(m.name == target_name for m in store.installed()):
        raise BadInput(f"model {target_name!r} already exists; pass --name or rm it first")
    with store.temp_dir() as work:
        built = work / ("float" if bits == 2 else "model")
        done = convert_gguf_to_genai(
            store.model_file(name), built, work / "build", bits=32 if bits == 2 else bits
        )
        files = {f: built / f for f in done.files}
        extra: dict[str, object] = {}
        if bits == 2:
            options = OnnxQuantOptions(bits=2)
            report = quantize_onnx(built / ONNX_MAIN_FILE, work / ONNX_MAIN_FILE, options)
            files = {f: p for f, p in files.items() if not f.startswith(ONNX_MAIN_FILE)}
            files[ONNX_MAIN_FILE] = work / ONNX_MAIN_FILE  # one file: the weights are inline
            extra = {
                "block_size": report.block_size,
                "accuracy_level": report.accuracy_level,
                "warning": "experimental: 2-bit weights leave this model unusable "
                "(SmolLM2-135M answers gibberish); use onnx-int4",
            }
        info = OnnxInfo(
            task="generation",
            architecture=source.architecture,
            parameters=done.parameters,
            bits=bits,
            context_length=done.context_length,
            layers=done.layers,
            kv_width=done.kv_width,
            exact_weights=done.exact_weights,
            **extra,
        )
        return store.import_onnx(target_name, files, info, f"convert:{name}:{target}", name)
