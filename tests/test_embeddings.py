"""Embeddings end to end: MiniLM pulled by conversion, quantized to 8/4/2 bits by the CLI with
its quality recorded, and served on `/v1/embeddings` to the real openai client."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from clawctl.engines.onnx.embed import OnnxEmbedder
from clawctl.paths import Paths
from clawctl.store.models import ModelStore
from tests.conftest import DOWNLOAD_CACHE, Daemon, copy_home, run_cli, serve

pytestmark = pytest.mark.integration
TEXTS = ["How do I reset my password?", "The weather in Paris is sunny.", "def f(x): return x"]


@pytest.fixture(scope="module")
def quant_home(embed_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """embed_home plus MiniLM quantized by the CLI to int8, int4 and int2."""
    home = copy_home(embed_home, tmp_path_factory.mktemp("quant-home"))
    env = {**os.environ, "CLAW_HOME": str(home), "CLAW_DOWNLOAD_CACHE": str(DOWNLOAD_CACHE)}
    for bits in ("int8", "int4", "int2"):
        done = run_cli("models", "quantize", "minilm-l6", "--to", bits, env=env)
        assert done.returncode == 0, done.stderr
        assert "cosine vs float" in done.stderr
    pulled = run_cli("models", "pull", "minilm-l6-gguf", env=env)  # llama.cpp's BERT
    assert pulled.returncode == 0, pulled.stderr
    return home


@pytest.fixture(scope="module")
def embed_daemon(quant_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with serve(quant_home, tmp_path_factory.mktemp("log")) as daemon:
        yield daemon


def _store(home: Path) -> ModelStore:
    return ModelStore(Paths.build(home, DOWNLOAD_CACHE))


def test_openai_client_gets_the_models_own_vectors(embed_daemon: Daemon) -> None:
    with embed_daemon.openai() as client:
        response = client.embeddings.create(model="minilm-l6", input=TEXTS)
    vectors = np.array([d.embedding for d in response.data], dtype=np.float32)
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert response.usage.prompt_tokens == response.usage.total_tokens > len(TEXTS)
    store = _store(embed_daemon.home)
    local = OnnxEmbedder(store.model_dir(store.get("minilm-l6"))).embed(TEXTS).vectors
    assert np.allclose(vectors, local, atol=1e-5)
    assert float(vectors[0] @ vectors[1]) < 0.5  # unrelated texts are far apart


def test_base64_and_default_model(embed_daemon: Daemon) -> None:
    with embed_daemon.client() as client:
        plain = client.post("/v1/embeddings", json={"input": TEXTS[0]}).json()
        packed = client.post(
            "/v1/embeddings", json={"input": [TEXTS[0]], "encoding_format": "base64"}
        ).json()
    assert plain["model"] == "minilm-l6"
    decoded = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, np.array(plain["data"][0]["embedding"], dtype=np.float32))


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"model": "smollm2-135m", "input": "hi"}, 400, "embedding model"),
        ({"model": "minilm-l6", "input": ""}, 400, "must not be empty"),
        ({"model": "minilm-l6", "input": []}, 400, "input"),
        ({"model": "minilm-l6", "input": "hi", "dimensions": 128}, 400, "384 dimensions"),
        ({"model": "no-such-model", "input": "hi"}, 404, "not installed"),
    ],
)
def test_bad_requests_get_one_line_errors(
    embed_daemon: Daemon, body: dict[str, object], status: int, fragment: str
) -> None:
    with embed_daemon.client() as client:
        response = client.post("/v1/embeddings", json=body)
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    assert fragment in message
    assert "\n" not in message


@pytest.mark.parametrize("model", ["minilm-l6", "minilm-l6-gguf"])
def test_embedding_models_do_not_chat(embed_daemon: Daemon, model: str) -> None:
    with embed_daemon.client() as client:
        response = client.post(
            "/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
        )
    assert response.status_code == 400, response.text
    assert "use /v1/embeddings" in response.json()["error"]["message"]


def test_quantized_models_record_their_quality(quant_home: Path) -> None:
    store = _store(quant_home)
    quality = {}
    for bits in (8, 4, 2):
        manifest = store.get(f"minilm-l6-int{bits}")
        assert manifest.format == "onnx"
        assert manifest.onnx is not None
        assert manifest.onnx.bits == bits
        assert manifest.parent == "minilm-l6"
        assert manifest.onnx.quality is not None
        quality[bits] = manifest.onnx.quality
    assert quality[8] >= 0.9995
    assert quality[8] > quality[4] > quality[2]
    assert store.get("minilm-l6-int2").onnx.warning  # type: ignore[union-attr]
    float_size = store.get("minilm-l6").size
    assert store.get("minilm-l6-int8").size < float_size
    shown = run_cli(
        "models", "show", "minilm-l6-int2", env={**os.environ, "CLAW_HOME": str(quant_home)}
    )
    assert shown.returncode == 0
    assert "warning" in shown.stdout


def test_quantized_model_serves_and_stays_close(embed_daemon: Daemon) -> None:
    with embed_daemon.client() as client:
        exact = client.post("/v1/embeddings", json={"model": "minilm-l6", "input": TEXTS}).json()
        small = client.post(
            "/v1/embeddings", json={"model": "minilm-l6-int8", "input": TEXTS}
        ).json()
    a = np.array([d["embedding"] for d in exact["data"]])
    b = np.array([d["embedding"] for d in small["data"]])
    assert np.min(np.sum(a * b, axis=1)) >= 0.99


def test_wrong_kind_of_quantization_is_a_usage_error(quant_home: Path) -> None:
    env = {**os.environ, "CLAW_HOME": str(quant_home)}
    gguf_as_onnx = run_cli("models", "quantize", "smollm2-135m", "--to", "int4", env=env)
    onnx_as_gguf = run_cli("models", "quantize", "minilm-l6", "--to", "q4_0", env=env)
    twice = run_cli("models", "quantize", "minilm-l6-int8", "--to", "int4", env=env)
    bad_block = run_cli(
        "models", "quantize", "minilm-l6", "--to", "int4", "--block-size", "7", env=env
    )
    for done in (gguf_as_onnx, onnx_as_gguf, twice, bad_block):
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr


def test_verify_and_remove_keep_shared_files(quant_home: Path, tmp_path: Path) -> None:
    home = copy_home(quant_home, tmp_path / "home")
    env = {**os.environ, "CLAW_HOME": str(home)}
    verified = run_cli("models", "verify", "--json", env=env)
    assert verified.returncode == 0
    assert all(r["ok"] for r in json.loads(verified.stdout))
    assert run_cli("models", "rm", "minilm-l6-int4", env=env).returncode == 0
    store = _store(home)
    parent = store.get("minilm-l6")
    assert all(store.blob_path(d).is_file() for d in parent.blob_digests())  # shared tokenizer
    OnnxEmbedder(store.model_dir(parent)).embed(["still loads"])
    blob = store.blob_path(parent.digest)
    damaged_bytes = bytearray(blob.read_bytes())
    damaged_bytes[1000:1004] = b"\0\0\0\0"
    blob.unlink()  # a hard link shared with other homes: replace it, never write through it
    blob.write_bytes(bytes(damaged_bytes))
    damaged = run_cli("models", "verify", "minilm-l6", env=env)
    assert damaged.returncode != 0
    assert "damaged" in damaged.stderr


def test_gguf_embedding_model_is_served_by_llama_cpp(embed_daemon: Daemon) -> None:
    """The same MiniLM as a GGUF embedding model (pooling metadata) goes through llama.cpp and
    gives the ONNX model's vectors."""
    with embed_daemon.openai() as client:
        onnx = client.embeddings.create(model="minilm-l6", input=TEXTS)
        gguf = client.embeddings.create(model="minilm-l6-gguf", input=TEXTS)
    a = np.array([d.embedding for d in onnx.data])
    b = np.array([d.embedding for d in gguf.data])
    assert b.shape == a.shape
    assert np.min(np.sum(a * b, axis=1)) >= 0.999
    assert gguf.usage.prompt_tokens == onnx.usage.prompt_tokens


def test_many_texts_come_back_in_order(embed_daemon: Daemon) -> None:
    """More texts than one batch: embedded in length-sorted batches, returned in input order,
    each as it is alone, and usage counts each text's own tokens (no padding)."""
    texts = [f"Ticket {i}: " + "the router drops the line " * (i % 7 + 1) for i in range(40)]
    with embed_daemon.openai() as client:
        many = client.embeddings.create(model="minilm-l6", input=texts)
        alone = [client.embeddings.create(model="minilm-l6", input=text) for text in texts]
    vectors = np.array([d.embedding for d in many.data])
    assert [d.index for d in many.data] == list(range(40))
    singles = np.array([one.data[0].embedding for one in alone])
    assert np.min(np.sum(vectors * singles, axis=1)) > 0.99999
    assert many.usage.prompt_tokens == sum(one.usage.prompt_tokens for one in alone)
