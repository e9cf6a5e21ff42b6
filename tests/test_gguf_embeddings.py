"""GGUF embeddings: all-MiniLM-L6-v2 converted to a llama.cpp `bert` GGUF (verified inside the
conversion), served by GgufEmbedder with the same vectors as the numpy reference forward pass,
the same tokens as the model's tokenizer.json, batch-independent results, and a clear refusal
for a generation GGUF."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import numpy.typing as npt
import pytest
from safetensors.numpy import load_file

import clawctl.build.convert.bert_gguf as bert_gguf
from clawctl.build.convert.bert_gguf import TOKEN_PROBES, BertGgufConversion, convert_bert_gguf
from clawctl.build.convert.bert_onnx import BertConfig, reference_embeddings
from clawctl.engines.llama.embed import GgufEmbedder, read_embedding_header, supports_embeddings
from clawctl.engines.onnx.embed import load_tokenizer
from clawctl.errors import BadInput, IntegrityError

DIM, LAYERS, MAX_TOKENS = 384, 6, 256
MIN_COSINE = 0.999
BATCH_COSINE = 0.99999  # a text batched with others vs alone: float noise only
SENTENCES = (
    "How do I reset my password?",
    "What is the capital of France?",
    "def add(a, b): return a + b",
    "Invoice 4471 is due on 2026-03-01 for 1,250 EUR.",
    "Is it going to rain in Lisbon tomorrow afternoon?",
    "SELECT name FROM users WHERE age > 30 ORDER BY name;",
    "The patient reports mild headaches after taking the medication.",
    "Our edge box has two cores and eight gigabytes of memory.",
)
# Where Hugging Face's BertNormalizer/BertPreTokenizer/WordPiece and llama.cpp's WordPiece could
# part ways: accents, CJK, emoji, invisible and control characters, literal special tokens,
# words over WordPiece's 100-character limit (one [UNK] in HF; GgufEmbedder reproduces that).
TRICKY = (
    "Café crème brûlée, naïve résumé, Ångström, Straße, İstanbul, ÀÉÎÕÜ, a\u0301 combining",
    "我想在apple工作1314151天 日本語のテキスト Ελληνικά κείμενο مرحبا بالعالم ကာန်",
    "🚀 rocket 😶\u200d🌫️ ✅ \uff46\uff55\uff4c\uff4c\uff57\uff49\uff44\uff54\uff48 ŉ ǅ ß ﬁ",
    "tab\tand\nnewline  double  space, zero\u200bwidth, nbsp\u00a0here, soft\u00adhyphen",
    "literal [SEP] and [MASK] and [CLS], [unused0] token",
    "control\x07char\x00nul \ufffd replacement",
    "don't won't y'all https://example.com/a?b=c&d=e e-mail: foo@bar.baz C++ C# 3.14 1,000 -42",
    "x" * 100,
    "x" * 101,
    "(" + "é" * 101 + ")",
    "a" * 50 + "\x07" + "a" * 50,
    "hash " + "0123456789abcdef" * 8 + " end",
    "a" * 101 + "我" + "b" * 3,
    "supercalifragilisticexpialidocious" * 4,
    "",
    "   ",
)


@dataclass(frozen=True)
class Converted:
    path: Path
    report: BertGgufConversion


@pytest.fixture(scope="session")
def minilm_gguf(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Converted:
    """MiniLM as an f16 GGUF; convert_bert_gguf has already checked it against the reference."""
    out = tmp_path_factory.mktemp("gguf") / "minilm-f16.gguf"
    return Converted(out, convert_bert_gguf(minilm_dir, out, name="all-MiniLM-L6-v2"))


@pytest.fixture(scope="session")
def embedder(minilm_gguf: Converted) -> GgufEmbedder:
    return GgufEmbedder(minilm_gguf.path, threads=1, max_tokens=MAX_TOKENS)


def reference(minilm_dir: Path, texts: list[str]) -> npt.NDArray[np.float64]:
    """The numpy forward pass (float64, float32 weights) on tokenizer.json's ids."""
    tokenizer = load_tokenizer(minilm_dir / "tokenizer.json", MAX_TOKENS)
    encodings = tokenizer.encode_batch(texts)
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    weights = load_file(str(minilm_dir / "model.safetensors"))
    return reference_embeddings(
        weights, BertConfig.from_json(minilm_dir / "config.json"), ids, mask
    )


def cosines(a: npt.NDArray[np.floating], b: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_conversion_is_verified_and_atomic(minilm_gguf: Converted) -> None:
    report = minilm_gguf.report
    assert (report.dim, report.layers, report.vocab_size) == (DIM, LAYERS, 30522)
    assert report.weight_type == "f16"
    assert report.max_tokens == MAX_TOKENS  # no sentence_bert_config.json: the 256 default
    assert report.reference_cosine >= MIN_COSINE
    assert report.token_probes == len(TOKEN_PROBES)
    assert report.gguf_bytes == minilm_gguf.path.stat().st_size < 50_000_000  # f16: ~46 MB
    assert [p.name for p in minilm_gguf.path.parent.iterdir()] == [minilm_gguf.path.name]


def test_gguf_is_laid_out_as_llama_cpp_converts_bert(
    minilm_gguf: Converted, minilm_dir: Path
) -> None:
    reader = gguf.GGUFReader(minilm_gguf.path)

    def field(key: str) -> object:
        return reader.fields[key].contents()

    assert field("general.architecture") == "bert"
    assert field("general.name") == "all-MiniLM-L6-v2"
    assert field("bert.pooling_type") == gguf.PoolingType.MEAN
    assert field("bert.attention.causal") is False
    assert field("bert.context_length") == 512
    assert field("bert.embedding_length") == DIM
    assert field("bert.feed_forward_length") == 1536
    assert field("bert.block_count") == LAYERS
    assert field("bert.attention.head_count") == 12
    assert field("tokenizer.ggml.model") == "bert"
    assert field("tokenizer.ggml.token_type_count") == 2
    ids = {
        key: field(f"tokenizer.ggml.{key}_token_id")
        for key in ("bos", "eos", "seperator", "unknown", "padding", "mask")
    }
    assert ids == {
        "bos": 101,  # [CLS]: llama.cpp's bert vocab has no CLS key
        "eos": 102,
        "seperator": 102,
        "unknown": 100,
        "padding": 0,
        "mask": 103,
    }
    tokens = field("tokenizer.ggml.tokens")
    assert isinstance(tokens, list)
    types = field("tokenizer.ggml.token_type")
    assert isinstance(types, list)
    raw = json.loads((minilm_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = raw["model"]["vocab"]
    assert tokens[101] == "[CLS]"
    assert types[101] == gguf.TokenType.CONTROL
    assert tokens[vocab["hello"]] == "\u2581hello"
    assert types[vocab["hello"]] == gguf.TokenType.NORMAL
    assert tokens[vocab["##ing"]] == "ing"

    tensors = {t.name: t for t in reader.tensors}
    expected = {
        "token_embd.weight",
        "token_types.weight",
        "position_embd.weight",
        "token_embd_norm.weight",
        "token_embd_norm.bias",
    }
    for i in range(LAYERS):
        for name in (
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "attn_output_norm",
            "ffn_up",
            "ffn_down",
            "layer_output_norm",
        ):
            expected |= {f"blk.{i}.{name}.weight", f"blk.{i}.{name}.bias"}
    assert set(tensors) == expected  # the pooler is dropped, nothing else is
    f16, f32 = gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32
    assert tensors["token_embd.weight"].tensor_type == f16
    assert tensors["blk.0.ffn_up.weight"].tensor_type == f16
    assert tensors["position_embd.weight"].tensor_type == f32
    assert tensors["token_types.weight"].tensor_type == f32
    assert tensors["blk.0.attn_output_norm.weight"].tensor_type == f32
    assert tensors["blk.0.attn_q.bias"].tensor_type == f32


def test_embeddings_match_the_reference(embedder: GgufEmbedder, minilm_dir: Path) -> None:
    texts = list(SENTENCES)
    got = embedder.embed(texts)
    assert embedder.dim == DIM
    assert got.vectors.shape == (len(texts), DIM)
    assert got.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got.vectors, axis=1), 1.0, atol=1e-5)
    per_text = cosines(got.vectors, reference(minilm_dir, texts))
    assert per_text.min() >= MIN_COSINE, per_text
    tokenizer = load_tokenizer(minilm_dir / "tokenizer.json", MAX_TOKENS)
    tokenizer.no_padding()
    assert got.tokens == tuple(len(tokenizer.encode(t).ids) for t in texts)
    assert embedder.count_tokens(texts) == list(got.tokens)


def test_a_batch_gives_the_vectors_each_text_gets_alone(embedder: GgufEmbedder) -> None:
    texts = list(SENTENCES)
    batched = embedder.embed(texts).vectors
    alone = np.stack([embedder.embed([text]).vectors[0] for text in texts])
    reordered = embedder.embed(texts[::-1]).vectors[::-1]
    assert cosines(batched, alone).min() >= BATCH_COSINE
    assert cosines(reordered, alone).min() >= BATCH_COSINE
    assert np.abs(batched - alone).max() < 1e-3
    assert np.array_equal(embedder.embed([texts[0]]).vectors, alone[:1])  # same input: same bits


def test_more_texts_than_one_llama_batch(minilm_gguf: Converted) -> None:
    """max_tokens 16 makes llama.cpp's batch 16 tokens: texts are packed into many decodes,
    and a text longer than max_tokens is cut to max_tokens keeping its final [SEP]."""
    with GgufEmbedder(minilm_gguf.path, threads=1, max_tokens=16) as small:
        long_text = "the quick brown fox jumps over the lazy dog " * 10
        texts = [*SENTENCES, long_text]
        batched = small.embed(texts)
        alone = np.stack([small.embed([text]).vectors[0] for text in texts])
        assert cosines(batched.vectors, alone).min() >= BATCH_COSINE
        ids = small.tokenize(long_text)
        assert len(ids) == 16
        assert (ids[0], ids[-1]) == (101, 102)
        assert batched.tokens[-1] == 16
        assert small.embed([]).vectors.shape == (0, DIM)


def test_tokenization_agrees_with_tokenizer_json(embedder: GgufEmbedder, minilm_dir: Path) -> None:
    tokenizer = load_tokenizer(minilm_dir / "tokenizer.json", MAX_TOKENS)
    tokenizer.no_padding()
    texts = [*TOKEN_PROBES, *TRICKY, "word " * 600]  # the last is truncated by both
    mismatches = {
        text[:40]: (ours, theirs)
        for text in texts
        if (ours := embedder.tokenize(text)) != (theirs := tokenizer.encode(text).ids)
    }
    assert not mismatches


def test_generation_gguf_is_refused(smollm2_gguf: Path) -> None:
    assert supports_embeddings(smollm2_gguf) is False
    header = read_embedding_header(smollm2_gguf)
    assert (header.architecture, header.pooling_type) == ("llama", None)
    with pytest.raises(BadInput, match="is a generation model") as caught:
        GgufEmbedder(smollm2_gguf)
    assert "\n" not in caught.value.message
    assert "pooling" in caught.value.message


def test_supports_embeddings_reads_only_headers(minilm_gguf: Converted, tmp_path: Path) -> None:
    assert supports_embeddings(minilm_gguf.path) is True
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"ONNX" + bytes(64))
    assert supports_embeddings(not_gguf) is False
    assert supports_embeddings(tmp_path / "missing.gguf") is False
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(minilm_gguf.path.read_bytes()[:4096])  # ends inside the vocabulary
    assert supports_embeddings(truncated) is False
    with pytest.raises(BadInput, match="not a valid GGUF"):
        GgufEmbedder(truncated)
    with pytest.raises(BadInput, match="not found"):
        GgufEmbedder(tmp_path / "missing.gguf")


def test_failed_verification_writes_nothing(
    minilm_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "model.gguf"
    out.write_bytes(b"previous")
    monkeypatch.setattr(bert_gguf, "MIN_COSINE", 1.5)  # unreachable: verification must fail
    with pytest.raises(IntegrityError, match="disagree with the numpy reference"):
        convert_bert_gguf(minilm_dir, out, weight_type="f32")
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_cased_or_foreign_tokenizers_are_refused(minilm_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "src"
    shutil.copytree(minilm_dir, source)
    raw = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    raw["normalizer"]["lowercase"] = False
    (source / "tokenizer.json").write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(BadInput, match="always lowercases"):
        convert_bert_gguf(source, tmp_path / "out.gguf")
    raw["normalizer"]["lowercase"] = True
    raw["model"]["type"] = "BPE"
    (source / "tokenizer.json").write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(BadInput, match="only WordPiece"):
        convert_bert_gguf(source, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()
