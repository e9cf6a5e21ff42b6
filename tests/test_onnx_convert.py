"""bert_onnx: the hand-built ONNX graph of all-MiniLM-L6-v2 agrees with an independent numpy
forward pass, is not disturbed by padding, keeps every dense layer quantizable, and refuses
directories it cannot convert without writing anything."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from safetensors.numpy import load_file

import clawctl.build.convert.bert_onnx as bert_onnx
from clawctl.build.convert.bert_onnx import (
    BertConfig,
    BertConversion,
    convert_bert,
    reference_embeddings,
)
from clawctl.engines.onnx.embed import load_tokenizer
from clawctl.errors import BadInput, IntegrityError

DIM, LAYERS = 384, 6
MIN_COSINE = 0.9999


@dataclass(frozen=True)
class Converted:
    path: Path
    report: BertConversion


@pytest.fixture(scope="session")
def converted(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Converted:
    out = tmp_path_factory.mktemp("onnx") / "minilm.onnx"
    return Converted(out, convert_bert(minilm_dir, out))


@pytest.fixture(scope="session")
def session(converted: Converted) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(converted.path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def config(minilm_dir: Path) -> BertConfig:
    return BertConfig.from_json(minilm_dir / "config.json")


@pytest.fixture(scope="session")
def weights(minilm_dir: Path) -> dict[str, npt.NDArray[np.float32]]:
    return load_file(str(minilm_dir / "model.safetensors"))


Batch = tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]


@pytest.fixture(scope="session")
def tokenize(minilm_dir: Path) -> Callable[[list[str]], Batch]:
    tokenizer = load_tokenizer(minilm_dir / "tokenizer.json")

    def run(texts: list[str]) -> Batch:
        encodings = tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        return ids, mask

    return run


@pytest.fixture(scope="session")
def embed(
    session: ort.InferenceSession, tokenize: Callable[[list[str]], Batch]
) -> Callable[[list[str]], npt.NDArray[np.float32]]:
    def run(texts: list[str]) -> npt.NDArray[np.float32]:
        ids, mask = tokenize(texts)
        (vectors,) = session.run(["sentence_embedding"], {"input_ids": ids, "attention_mask": mask})
        return np.asarray(vectors, dtype=np.float32)

    return run


def _cosines(a: npt.NDArray[np.floating], b: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return np.asarray(
        (a64 * b64).sum(axis=1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))
    )


def test_config_is_read_from_config_json(config: BertConfig) -> None:
    assert config == BertConfig(
        hidden_size=384,
        num_layers=6,
        num_heads=12,
        intermediate_size=1536,
        layer_norm_eps=1e-12,
        max_position=512,
        vocab_size=30522,
    )
    assert config.head_dim == 32


def test_conversion_report(converted: Converted) -> None:
    report = converted.report
    assert (report.dim, report.layers) == (DIM, LAYERS)
    # 22.7 M in the checkpoint, minus the unused pooler (147,840) and token type row 1 (384).
    assert report.parameters == 22_564_992
    assert report.reference_cosine >= MIN_COSINE
    assert report.onnx_bytes == converted.path.stat().st_size
    assert [p.name for p in converted.path.parent.iterdir()] == ["minilm.onnx"]  # no temp left


def test_graph_keeps_every_dense_layer_quantizable(converted: Converted) -> None:
    """Each dense layer is MatMul(x, 2-D float32 initializer) -> Add(bias): MatMulNBits' input."""
    model = onnx.load(str(converted.path))
    assert model.ir_version <= 9  # readable by onnxruntime 1.17, the oldest the project allows
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 17)}
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in model.graph.output] == ["sentence_embedding", "token_embeddings"]
    inits = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    dense = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert len(dense) == 6 * LAYERS  # q, k, v, attention out, intermediate, output
    for node in dense:
        weight = inits[node.input[1]]
        assert weight.data_type == onnx.TensorProto.FLOAT
        assert len(weight.dims) == 2
        (add,) = consumers[node.output[0]]
        assert add.op_type == "Add"
        bias = inits[next(i for i in add.input if i != node.output[0])]
        assert list(bias.dims) == [weight.dims[1]]
    assert not [n for n in model.graph.node if n.op_type == "Gemm"]


def test_matches_numpy_reference_on_a_padded_batch(
    session: ort.InferenceSession,
    tokenize: Callable[[list[str]], Batch],
    weights: dict[str, npt.NDArray[np.float32]],
    config: BertConfig,
) -> None:
    texts = [
        "Hi.",
        "A cat sat on the mat.",
        "Sentence embeddings turn text into vectors whose cosine similarity tracks meaning, "
        "which is what semantic search, clustering and routing need.",
    ]
    ids, mask = tokenize(texts)
    assert (mask == 0).any()  # really padded
    got, tokens = session.run(None, {"input_ids": ids, "attention_mask": mask})
    assert tokens.shape == (*ids.shape, DIM)
    want = reference_embeddings(weights, config, ids, mask)
    assert _cosines(got, want).min() >= MIN_COSINE
    assert np.abs(got - want).max() < 1e-4


def test_padding_does_not_change_a_sentence(
    embed: Callable[[list[str]], npt.NDArray[np.float32]],
) -> None:
    short = "Where is the train station?"
    long = "Could you tell me how to get to the central train station from the airport by bus?"
    alone = embed([short])
    padded = embed([short, long])[:1]
    assert _cosines(alone, padded).min() >= MIN_COSINE
    assert np.abs(alone - padded).max() < 1e-5


def test_embeddings_are_unit_norm(embed: Callable[[list[str]], npt.NDArray[np.float32]]) -> None:
    vectors = embed(["one", "two words", "a slightly longer third sentence"])
    assert vectors.shape == (3, DIM)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_paraphrases_are_closer_than_unrelated_text(
    embed: Callable[[list[str]], npt.NDArray[np.float32]],
) -> None:
    question, paraphrase, unrelated = embed(
        [
            "How do I reset my password?",
            "What are the steps to reset my password?",
            "The weather in Paris is sunny",
        ]
    )
    assert float(question @ paraphrase) > 0.8
    assert float(question @ unrelated) < 0.3


def test_tokenizer_ignores_the_files_padding_and_truncation(minilm_dir: Path) -> None:
    """tokenizer.json ships fixed padding to 128 and truncation at 128; both are overridden."""
    tokenizer = load_tokenizer(minilm_dir)
    short = tokenizer.encode_batch(["hi", "hello there"])
    assert len(short[0].ids) == len(short[1].ids) < 10
    long = tokenizer.encode("word " * 400)
    assert len(long.ids) == 256
    assert long.tokens[-1] == "[SEP]"


def _copy_small_files(source: Path, target: Path) -> None:
    target.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copyfile(source / name, target / name)


def _missing_dir(source: Path, target: Path) -> None:
    """Leave `target` absent."""


def _empty_dir(source: Path, target: Path) -> None:
    target.mkdir()


def _not_bert(source: Path, target: Path) -> None:
    _copy_small_files(source, target)
    (target / "model.safetensors").symlink_to(source / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))


def _corrupt_weights(source: Path, target: Path) -> None:
    _copy_small_files(source, target)
    (target / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")


def _cls_pooling(source: Path, target: Path) -> None:
    _copy_small_files(source, target)
    (target / "model.safetensors").symlink_to(source / "model.safetensors")
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]  # sentence-transformers' modules.json, here with CLS pooling
    (target / "modules.json").write_text(json.dumps(modules))
    (target / "1_Pooling").mkdir()
    (target / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": DIM, "pooling_mode_cls_token": True})
    )


@pytest.mark.parametrize(
    "make",
    [_missing_dir, _empty_dir, _not_bert, _corrupt_weights, _cls_pooling],
    ids=["missing", "empty", "not-bert", "corrupt-weights", "cls-pooling"],
)
def test_bad_model_dir_is_bad_input(
    make: Callable[[Path, Path], None], minilm_dir: Path, tmp_path: Path
) -> None:
    model_dir, out = tmp_path / "model", tmp_path / "out" / "model.onnx"
    make(minilm_dir, model_dir)
    with pytest.raises(BadInput) as caught:
        convert_bert(model_dir, out)
    assert "\n" not in caught.value.message
    assert not out.exists()


def test_failed_verification_writes_nothing(
    minilm_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A graph that lets padding into attention must be caught by the reference check."""
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous")
    monkeypatch.setattr(bert_onnx, "MASK_BIAS", 0.0)
    with pytest.raises(IntegrityError, match="min cosine"):
        convert_bert(minilm_dir, out)
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
