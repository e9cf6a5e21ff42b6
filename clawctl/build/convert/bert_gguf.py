"""BERT sentence encoders (sentence-transformers layout) from safetensors to a GGUF for llama.cpp.

The file is laid out exactly as llama.cpp's own `convert_hf_to_gguf.py` lays out a `BertModel`:
architecture `bert`, tensor names from gguf-py's tensor map (`token_embd`, `token_types`,
`position_embd`, `token_embd_norm`, `blk.N.attn_q|k|v|output`, `attn_output_norm`, `ffn_up`,
`ffn_down`, `layer_output_norm`; the pooler is dropped), non-causal attention, the pooling type
of the sentence-transformers pipeline (mean), and the WordPiece vocabulary in llama.cpp's
"phantom space" form: a word-initial token gets a U+2581 prefix, a `##` continuation loses its
`##`, and special tokens stay as they are.

Like `bert_onnx`, the conversion checks itself before anything reaches `out`: the GGUF is written
to a temp file beside `out`, loaded with llama-cpp-python in embedding mode, and must (1) tokenize
the probe sentences exactly as the model's `tokenizer.json` does and (2) embed them within
`MIN_COSINE` of `bert_onnx.reference_embeddings`, the independent numpy forward pass. Only then is
the temp file fsynced into place; otherwise it is removed and `IntegrityError` names what
disagreed.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from clawctl.build.convert.bert_onnx import (
    PROBES,
    BertConfig,
    check_modules,
    checked_weights,
    reference_embeddings,
    truncation_length,
)
from clawctl.engines.onnx.embed import PAD_TOKEN, load_tokenizer
from clawctl.errors import BadInput, IntegrityError
from clawctl.fsutil import fsync_dir

if TYPE_CHECKING:  # heavy modules are imported where a conversion runs, never at CLI start-up
    import numpy as np
    import numpy.typing as npt
    from tokenizers import Tokenizer

    FloatArray = npt.NDArray[np.float32]

ARCH = "bert"
WeightType = Literal["f16", "f32"]
# f16 weights plus ggml's tanh-approximated GELU land near 0.99999 for MiniLM; 0.999 still catches
# any wiring mistake (a swapped or transposed matrix drops the cosine far below 0.9).
MIN_COSINE = 0.999
PHANTOM_SPACE = "\u2581"
CONTINUATION = "##"
# Tokenization probes on top of the embedding probes: punctuation, digits, apostrophes, casing
# and a word longer than any vocabulary entry. llama.cpp's WordPiece must split all of them
# exactly as `tokenizers` does.
TOKEN_PROBES = (
    *PROBES,
    "What's the ETA? Ship #4471 left port at 09:30, 2 days early!",
    "SELECT name FROM users WHERE age > 30 ORDER BY name;",
    "Unbelievably, the antidisestablishmentarianism debate continued.",
    "",
)
# Token types of gguf-py's TokenType enum (kept literal: gguf is imported only inside functions).
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4
POOLING_MEAN = 1  # gguf.PoolingType.MEAN
FILE_TYPE = {"f32": 0, "f16": 1}  # gguf.LlamaFileType.ALL_F32 / MOSTLY_F16


@dataclass(frozen=True)
class BertGgufConversion:
    """What `convert_bert_gguf` wrote, and how closely llama.cpp's run of it matched."""

    dim: int
    layers: int
    vocab_size: int
    parameters: int  # weights written (pooler dropped)
    gguf_bytes: int
    weight_type: WeightType  # of the matrices; norms and biases are always f32
    max_tokens: int  # sentence-transformers' truncation length, capped by the position table
    reference_cosine: float  # min over PROBES; >= MIN_COSINE or nothing was written
    token_probes: int  # TOKEN_PROBES whose llama.cpp ids equal tokenizer.json's (all of them)


@dataclass(frozen=True)
class _Vocab:
    tokens: list[str]  # phantom-space form
    types: list[int]
    cls_id: int
    sep_id: int
    unk_id: int
    pad_id: int
    mask_id: int | None


def convert_bert_gguf(
    model_dir: Path, out: Path, weight_type: WeightType = "f16", name: str | None = None
) -> BertGgufConversion:
    """Convert a sentence-transformers BERT directory to a verified GGUF embedding model.

    `model_dir` needs `config.json`, `model.safetensors` and `tokenizer.json` (plus, optionally,
    `modules.json` and the pooling config, which must say mean pooling). `out` is replaced
    atomically and only after llama.cpp's output agreed with the numpy reference, so a failed
    conversion leaves whatever was at `out` untouched.
    """
    model_dir, out = Path(model_dir), Path(out)
    if weight_type not in FILE_TYPE:
        raise BadInput(f"weight type {weight_type!r}; expected one of {', '.join(FILE_TYPE)}")
    if not model_dir.is_dir():
        raise BadInput(f"{model_dir}: not a directory; expected a sentence-transformers model")
    for file in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (model_dir / file).is_file():
            raise BadInput(f"{model_dir}: no {file}; expected a sentence-transformers BERT model")
    if out.is_dir():
        raise BadInput(f"{out}: is a directory; give the path of the .gguf file to write")
    config = BertConfig.from_json(model_dir / "config.json")
    check_modules(model_dir, config)  # mean pooling (or no modules.json), no Dense layers
    max_length = truncation_length(model_dir, config)
    vocab = _read_vocab(model_dir / "tokenizer.json", config)
    tokenizer = load_tokenizer(model_dir / "tokenizer.json", max_length)
    weights = _load_weights(model_dir / "model.safetensors", config)
    type_vocab_size = int(weights["embeddings.token_type_embeddings.weight"].shape[0])

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        parameters = _write_gguf(
            tmp,
            weights,
            config,
            vocab,
            type_vocab_size,
            weight_type,
            name or model_dir.name,
        )
        with tmp.open("rb+") as handle:
            os.fsync(handle.fileno())
        cosine, token_probes = _verify(tmp, weights, config, tokenizer, max_length)
        os.chmod(tmp, 0o644)
        size = tmp.stat().st_size
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return BertGgufConversion(
        dim=config.hidden_size,
        layers=config.num_layers,
        vocab_size=config.vocab_size,
        parameters=parameters,
        gguf_bytes=size,
        weight_type=weight_type,
        max_tokens=max_length,
        reference_cosine=cosine,
        token_probes=token_probes,
    )


# --- reading the source ----------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] or type(exc).__name__


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BadInput(f"{path}: unreadable ({_one_line(exc)})") from None
    if not isinstance(raw, dict):
        raise BadInput(f"{path}: expected a JSON object")
    return raw


def _read_vocab(path: Path, config: BertConfig) -> _Vocab:
    """The WordPiece vocabulary of `tokenizer.json` as llama.cpp's `bert` tokenizer wants it.

    Refuses what llama.cpp's WordPiece cannot reproduce: another model type or continuation
    prefix, and a cased vocabulary (llama.cpp lowercases every input).
    """
    raw = _read_json(path)
    model = raw.get("model")
    if not isinstance(model, dict) or model.get("type") != "WordPiece":
        kind = model.get("type") if isinstance(model, dict) else None
        raise BadInput(f"{path}: tokenizer model {kind!r}; only WordPiece (BERT) is supported")
    if model.get("continuing_subword_prefix", CONTINUATION) != CONTINUATION:
        raise BadInput(f"{path}: continuing_subword_prefix must be {CONTINUATION!r}")
    normalizer = raw.get("normalizer")
    if not isinstance(normalizer, dict) or normalizer.get("type") != "BertNormalizer":
        raise BadInput(f"{path}: normalizer is not BertNormalizer; llama.cpp would diverge")
    if normalizer.get("lowercase") is not True:
        raise BadInput(f"{path}: a cased vocabulary; llama.cpp's WordPiece always lowercases")
    table = model.get("vocab")
    if not isinstance(table, dict) or not table:
        raise BadInput(f"{path}: WordPiece model has no vocab")
    by_id: dict[int, str] = {}
    for token, index in table.items():
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise BadInput(f"{path}: vocab id {index!r} of {token!r} is not an integer >= 0")
        by_id[index] = token
    if sorted(by_id) != list(range(config.vocab_size)):
        raise BadInput(
            f"{path}: vocab ids are not exactly 0..{config.vocab_size - 1} "
            f"(config vocab_size {config.vocab_size}, {len(by_id)} distinct ids)"
        )
    special: set[int] = set()
    user: set[int] = set()
    for added in raw.get("added_tokens") or ():
        if not isinstance(added, dict) or by_id.get(added.get("id", -1)) != added.get("content"):
            raise BadInput(f"{path}: added token {added!r} is not in the WordPiece vocab")
        (special if added.get("special") else user).add(int(added["id"]))

    tokens: list[str] = []
    types: list[int] = []
    for index in range(config.vocab_size):
        token = by_id[index]
        kind = (
            TOKEN_CONTROL
            if index in special
            else TOKEN_USER_DEFINED
            if index in user
            else TOKEN_NORMAL
        )
        tokens.append(_phantom(token, kind))
        types.append(kind)

    def special_id(role: str, content: object) -> int:
        if not isinstance(content, str) or content not in table:
            raise BadInput(f"{path}: no {role} token {content!r} in the vocab")
        return int(table[content])

    cls_token, sep_token = _template_specials(path, raw.get("post_processor"))
    padding = raw.get("padding")
    pad_token = padding.get("pad_token") if isinstance(padding, dict) else None
    return _Vocab(
        tokens=tokens,
        types=types,
        cls_id=special_id("CLS", cls_token),
        sep_id=special_id("SEP", sep_token),
        unk_id=special_id("unknown", model.get("unk_token", "[UNK]")),
        pad_id=special_id("padding", pad_token or PAD_TOKEN),
        mask_id=int(table["[MASK]"]) if "[MASK]" in table else None,
    )


def _phantom(token: str, kind: int) -> str:
    """convert_hf_to_gguf's BertModel.set_vocab: `##piece` -> `piece`, `word` -> `\u2581word`."""
    if kind == TOKEN_CONTROL:
        return token
    if token.startswith(CONTINUATION):
        return token[len(CONTINUATION) :]
    return PHANTOM_SPACE + token


def _template_specials(path: Path, processor: object) -> tuple[str, str]:
    """The tokens of a `[CLS] $A [SEP]` template, the only shape llama.cpp's `bert` vocab emits."""
    single = processor.get("single") if isinstance(processor, dict) else None
    if (
        not isinstance(processor, dict)
        or processor.get("type") != "TemplateProcessing"
        or not isinstance(single, list)
        or len(single) != 3
        or not all(isinstance(part, dict) for part in single)
        or set(single[0]) != {"SpecialToken"}
        or set(single[1]) != {"Sequence"}
        or set(single[2]) != {"SpecialToken"}
    ):
        raise BadInput(f"{path}: post_processor is not a [CLS] $A [SEP] TemplateProcessing")
    return str(single[0]["SpecialToken"].get("id")), str(single[2]["SpecialToken"].get("id"))


def _load_weights(path: Path, config: BertConfig) -> dict[str, FloatArray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        raw = load_file(str(path))
    except (OSError, SafetensorError, ValueError, TypeError) as exc:
        raise BadInput(f"{path}: unreadable safetensors ({_one_line(exc)})") from None
    return checked_weights(raw, config)


# --- writing ---------------------------------------------------------------------------------


def _tensor_plan(config: BertConfig) -> list[tuple[str, str]]:
    """(checkpoint name, GGUF name) in llama.cpp's order, names from gguf-py's tensor map."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, config.num_layers)
    sources = [
        "embeddings.word_embeddings.weight",
        "embeddings.token_type_embeddings.weight",
        "embeddings.position_embeddings.weight",
        "embeddings.LayerNorm.weight",
        "embeddings.LayerNorm.bias",
    ]
    for i in range(config.num_layers):
        p = f"encoder.layer.{i}"
        for module in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "attention.output.LayerNorm",
            "intermediate.dense",
            "output.dense",
            "output.LayerNorm",
        ):
            sources += [f"{p}.{module}.weight", f"{p}.{module}.bias"]
    plan = []
    for source in sources:
        target = names.get_name(source, try_suffixes=(".weight", ".bias"))
        if target is None:  # pragma: no cover - gguf-py's BERT map covers every name above
            raise IntegrityError(f"gguf-py has no BERT tensor name for {source}")
        plan.append((source, target))
    return plan


def _write_gguf(
    path: Path,
    weights: dict[str, FloatArray],
    config: BertConfig,
    vocab: _Vocab,
    type_vocab_size: int,
    weight_type: WeightType,
    name: str,
) -> int:
    """Write the GGUF to `path`; the number of parameters written."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), ARCH)
    # general.* as convert_hf_to_gguf writes them
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(FILE_TYPE[weight_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # TextModel.set_gguf_parameters + BertModel.set_gguf_parameters
    writer.add_context_length(config.max_position)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_layers)
    writer.add_head_count(config.num_heads)
    writer.add_layer_norm_eps(config.layer_norm_eps)
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType(POOLING_MEAN))
    # BertModel.set_vocab. `tokenizer.ggml.pre` only selects a pre-tokenizer for BPE vocabs;
    # llama.cpp uses its fixed BERT pre-tokenizer for `bert` (convert_hf_to_gguf would write the
    # name its hash table happens to give, "jina-v2-en" for the bert-base-uncased vocab).
    writer.add_token_type_count(type_vocab_size)
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    # [CLS] ... [SEP]: llama.cpp's `bert` vocab has no CLS key; its BOS is the [CLS] token.
    writer.add_bos_token_id(vocab.cls_id)
    writer.add_eos_token_id(vocab.sep_id)
    writer.add_sep_token_id(vocab.sep_id)
    writer.add_unk_token_id(vocab.unk_id)
    writer.add_pad_token_id(vocab.pad_id)
    if vocab.mask_id is not None:
        writer.add_mask_token_id(vocab.mask_id)
    # The flags gguf-py's SpecialVocab derives from the `[CLS] $A [SEP]` template, as written by
    # convert_hf_to_gguf; llama.cpp's WordPiece then emits [CLS] ... [SEP] (verified below).
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(True)
    writer.add_add_sep_token(False)

    f32_always = {"token_types.weight", "position_embd.weight"}  # as convert_hf_to_gguf keeps them
    parameters = 0
    for source, target in _tensor_plan(config):
        tensor = weights[source]
        if weight_type == "f16" and tensor.ndim == 2 and target not in f32_always:
            data = tensor.astype(np.float16)
        else:
            data = np.ascontiguousarray(tensor, dtype=np.float32)
        writer.add_tensor(target, data)
        parameters += int(tensor.size)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return parameters


# --- verification ----------------------------------------------------------------------------


def _verify(
    path: Path,
    weights: dict[str, FloatArray],
    config: BertConfig,
    tokenizer: Tokenizer,
    max_length: int,
) -> tuple[float, int]:
    """(min cosine vs the numpy reference over PROBES, TOKEN_PROBES tokenized identically).

    Raises IntegrityError on any tokenization difference or a cosine below MIN_COSINE (NaN
    included): llama.cpp must read the file as the model's own tokenizer and weights mean it.
    """
    import numpy as np

    from clawctl.engines.llama.embed import GgufEmbedder

    embedder = GgufEmbedder(path, threads=1, max_tokens=max_length)
    try:
        mismatches = []
        for text in TOKEN_PROBES:
            ours, theirs = embedder.tokenize(text), tokenizer.encode(text).ids
            if ours != theirs:
                mismatches.append(
                    f"{text[:40]!r}: llama.cpp {ours[:12]} vs tokenizer {theirs[:12]}"
                )
        if mismatches:
            raise IntegrityError(
                f"llama.cpp tokenizes {len(mismatches)} of {len(TOKEN_PROBES)} probes differently "
                f"from tokenizer.json ({mismatches[0]}); nothing was written"
            )
        got = embedder.embed(list(PROBES)).vectors.astype(np.float64)
    finally:
        embedder.close()

    encodings = tokenizer.encode_batch(list(PROBES))
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    want = reference_embeddings(weights, config, ids, mask)
    if got.shape != want.shape or not np.isfinite(got).all():
        raise IntegrityError(
            f"llama.cpp returned embeddings of shape {got.shape} (finite: "
            f"{bool(np.isfinite(got).all())}); expected {want.shape}; nothing was written"
        )
    cosines = np.sum(got * want, axis=1) / (
        np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1) + 1e-12
    )
    cosine = float(cosines.min())
    if not cosine >= MIN_COSINE:  # written this way round so that NaN fails too
        raise IntegrityError(
            f"llama.cpp's embeddings disagree with the numpy reference "
            f"(min cosine {cosine:.6f} < {MIN_COSINE}); nothing was written"
        )
    return cosine, len(TOKEN_PROBES)
