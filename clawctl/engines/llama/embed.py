"""Sentence embeddings from a GGUF embedding model (BERT, nomic-bert, ...) with llama.cpp.

A GGUF can embed when its metadata carries `<arch>.pooling_type` (MEAN, CLS or LAST): llama.cpp
then pools each sequence's hidden states itself. A generation model (SmolLM2, Qwen, ...) has no
pooling and is refused with `BadInput` before anything is loaded; `supports_embeddings` answers
the same question from the header alone.

Texts are tokenized by the GGUF's own vocabulary (for BERT, llama.cpp's WordPiece with
`[CLS] ... [SEP]`), truncated to `max_tokens` keeping the trailing special token as Hugging Face
tokenizers do, and packed several to a `llama_batch`, one sequence id each. An encoder attends
only within a sequence, so a text's vector does not depend on what it was batched with beyond
float rounding (ggml picks kernels by batch shape: cosine >= 0.9999998 to the text alone for
MiniLM; the same input always gives the same bits).

Concurrency: like `llama.py`, an instance is created, used and closed on one thread.
"""

from __future__ import annotations

import contextlib
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clawctl.engines.onnx.embed import Embeddings
from clawctl.errors import BadInput, EngineError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

# llama.cpp's enum llama_pooling_type (gguf.PoolingType has the same values).
POOLING_NONE, POOLING_MEAN, POOLING_CLS, POOLING_LAST, POOLING_RANK = 0, 1, 2, 3, 4
SENTENCE_POOLING = {POOLING_MEAN: "mean", POOLING_CLS: "cls", POOLING_LAST: "last"}
# Hugging Face WordPiece turns a word longer than this (after normalisation) into one [UNK];
# llama.cpp's WordPiece has no such limit and splits it into pieces. Not stored in the GGUF:
# 100 is the default every BERT tokenizer.json we know of keeps.
MAX_WORD_CHARS = 100
_LONG_RUN = re.compile(rf"\S{{{MAX_WORD_CHARS + 1},}}")


@dataclass(frozen=True)
class GgufEmbeddingHeader:
    """What the GGUF header says about embedding with this file."""

    architecture: str
    pooling_type: int | None  # None: no `<arch>.pooling_type` key
    context_length: int | None
    unk_token_id: int | None = None

    @property
    def embeds(self) -> bool:
        return self.pooling_type in SENTENCE_POOLING


def read_embedding_header(path: Path) -> GgufEmbeddingHeader:
    """Architecture, pooling type and context length from the GGUF header (no model load).

    Only the key/value section is scanned, skipping arrays (the vocabulary) without decoding
    them: milliseconds even for a multi-GB file, where `gguf.GGUFReader` decodes every token
    string and tensor record (~2 s for SmolLM2-135M). BadInput if `path` is not a readable GGUF.
    """
    path = Path(path)
    values = _scalar_metadata(path)
    arch = values.get("general.architecture")
    if not isinstance(arch, str):
        raise BadInput(f"{path} has no general.architecture: not a model GGUF")
    pooling = values.get(f"{arch}.pooling_type")
    context = values.get(f"{arch}.context_length")
    unk = values.get("tokenizer.ggml.unknown_token_id")
    return GgufEmbeddingHeader(
        architecture=arch,
        pooling_type=pooling
        if isinstance(pooling, int) and not isinstance(pooling, bool)
        else None,
        context_length=context if isinstance(context, int) and context > 0 else None,
        unk_token_id=unk if isinstance(unk, int) and unk >= 0 else None,
    )


def _scalar_metadata(path: Path) -> dict[str, object]:
    """Every scalar and string key/value of a little-endian GGUF v2/v3 header."""
    import mmap
    import struct

    from gguf import GGUF_MAGIC, GGUFValueType

    formats = {
        GGUFValueType.UINT8: "<B",
        GGUFValueType.INT8: "<b",
        GGUFValueType.UINT16: "<H",
        GGUFValueType.INT16: "<h",
        GGUFValueType.UINT32: "<I",
        GGUFValueType.INT32: "<i",
        GGUFValueType.FLOAT32: "<f",
        GGUFValueType.BOOL: "<?",
        GGUFValueType.UINT64: "<Q",
        GGUFValueType.INT64: "<q",
        GGUFValueType.FLOAT64: "<d",
    }
    try:
        with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as m:
            magic, version, _, n_kv = struct.unpack_from("<IIQQ", m, 0)
            if magic != GGUF_MAGIC:
                raise BadInput(f"{path} is not a GGUF file (magic {bytes(m[:4])!r})")
            if version not in (2, 3):
                raise BadInput(f"{path}: GGUF version {version} (or big-endian) is not supported")
            offset = 24

            def string() -> str:
                nonlocal offset
                (size,) = struct.unpack_from("<Q", m, offset)
                end = offset + 8 + size
                if end > len(m):
                    raise ValueError("string runs past the end of the file")
                text = m[offset + 8 : end].decode("utf-8", "replace")
                offset = end
                return text

            values: dict[str, object] = {}
            for _ in range(n_kv):
                key = string()
                (kind,) = struct.unpack_from("<I", m, offset)
                offset += 4
                if kind == GGUFValueType.STRING:
                    values[key] = string()
                elif kind == GGUFValueType.ARRAY:
                    item, count = struct.unpack_from("<IQ", m, offset)
                    offset += 12
                    if item == GGUFValueType.STRING:
                        for _ in range(count):
                            (size,) = struct.unpack_from("<Q", m, offset)
                            offset += 8 + size
                    elif item in formats:
                        offset += count * struct.calcsize(formats[GGUFValueType(item)])
                    else:
                        raise ValueError(f"unsupported array item type {item}")
                elif kind in formats:
                    fmt = formats[GGUFValueType(kind)]
                    (values[key],) = struct.unpack_from(fmt, m, offset)
                    offset += struct.calcsize(fmt)
                else:
                    raise ValueError(f"unknown value type {kind} for {key!r}")
                if offset > len(m):
                    raise ValueError("metadata runs past the end of the file")
            return values
    except FileNotFoundError:
        raise BadInput(f"{path}: not found; expected a GGUF model") from None
    except (OSError, ValueError, struct.error) as exc:  # mmap of an empty file is a ValueError
        raise BadInput(f"{path} is not a valid GGUF file: {exc}") from None


def supports_embeddings(path: Path) -> bool:
    """True if the GGUF at `path` is an embedding model (sentence pooling in its metadata).

    Reads the header only. False for generation models and for anything that is not a GGUF.
    """
    try:
        return read_embedding_header(path).embeds
    except BadInput:
        return False


def _refusal(path: Path, header: GgufEmbeddingHeader) -> str:
    if header.pooling_type is None:
        return (
            f"{path.name} is a generation model ({header.architecture}); embeddings need a GGUF "
            "with pooling (an embedding model such as BERT or nomic-bert), or an ONNX embedder "
            "such as minilm-l6"
        )
    kind = {POOLING_NONE: "none (per-token outputs)", POOLING_RANK: "rank (a reranker)"}
    what = kind.get(header.pooling_type, str(header.pooling_type))
    return (
        f"{path.name} has pooling type {what}; sentence embeddings need mean, cls or last pooling"
    )


class GgufEmbedder:
    """A loaded GGUF embedding model; the same interface as `OnnxEmbedder`."""

    def __init__(self, path: Path, threads: int = 1, max_tokens: int = 512) -> None:
        import llama_cpp

        path = Path(path)
        if not path.is_file():
            raise BadInput(f"{path}: not found; expected a GGUF embedding model")
        if max_tokens < 2:
            raise BadInput(f"max_tokens {max_tokens} leaves no room for the special tokens")
        header = read_embedding_header(path)
        if not header.embeds:
            raise BadInput(_refusal(path, header))
        n_ctx = min(max_tokens, header.context_length or max_tokens)
        try:
            # n_ubatch = n_batch: a non-causal encoder must see each sequence in one micro-batch.
            self._llama: Any = llama_cpp.Llama(
                model_path=str(path),
                embedding=True,
                pooling_type=llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED,  # the GGUF's own
                n_ctx=n_ctx,
                n_batch=n_ctx,
                n_ubatch=n_ctx,
                n_threads=max(1, threads),
                n_threads_batch=max(1, threads),
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise EngineError(f"llama.cpp could not load {path.name}: {exc}") from None
        self._ctx = self._llama.ctx
        self.pooling = SENTENCE_POOLING.get(int(self._llama.pooling_type()), "")
        if not self.pooling:  # pragma: no cover - llama.cpp applies the header's pooling
            self.close()
            raise BadInput(_refusal(path, header))
        self.dim = int(self._llama.n_embd())
        self.max_tokens = n_ctx
        self.architecture = header.architecture
        self.file_bytes = path.stat().st_size
        self._n_batch = n_ctx
        self._n_seq_max = max(1, int(llama_cpp.llama_n_seq_max(self._ctx)))
        self._memory = llama_cpp.llama_get_memory(self._ctx)  # None for encoder-only models
        self._batch: Any = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
        # The special tokens tokenization adds: [CLS] ... [SEP] for BERT. Truncation keeps the
        # trailing ones, as Hugging Face tokenizers do.
        vocab = llama_cpp.llama_model_get_vocab(self._llama.model)
        bos = int(llama_cpp.llama_vocab_bos(vocab))
        bare = self._llama.tokenize(b"", add_bos=True, special=False)
        self._unk_text = ""  # WordPiece only: the text of [UNK], to stand in for too-long words
        wordpiece = int(llama_cpp.llama_vocab_type(vocab)) == llama_cpp.LLAMA_VOCAB_TYPE_WPM
        if wordpiece and header.unk_token_id is not None:
            text = llama_cpp.llama_vocab_get_text(vocab, header.unk_token_id)
            self._unk_text = text.decode("utf-8") if text else ""
        self._tail = bare[1:] if bare and bare[0] == bos else bare
        if len(self._tail) >= n_ctx:  # pragma: no cover - n_ctx >= 2 and at most [SEP]
            self.close()
            raise BadInput(f"max_tokens {max_tokens} leaves no room for text")

    def close(self) -> None:
        """Free llama.cpp's batch, context and model; the instance is unusable afterwards."""
        import llama_cpp

        if getattr(self, "_batch", None) is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        llama = getattr(self, "_llama", None)
        if llama is not None:
            llama.close()
            self._llama = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown may have unloaded llama_cpp
            self.close()

    def __enter__(self) -> GgufEmbedder:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def tokenize(self, text: str) -> list[int]:
        """The ids the model sees for `text`: special tokens added, truncated to max_tokens.

        Special-token text in the input (a literal "[SEP]") is parsed as that token, as Hugging
        Face tokenizers parse it.
        """
        if self._llama is None:
            raise EngineError("embedding model is closed")
        if self._unk_text:
            text = _unk_long_words(text, self._unk_text)
        ids: list[int] = self._llama.tokenize(
            text.encode("utf-8", "replace"), add_bos=True, special=True
        )
        if len(ids) <= self.max_tokens:
            return ids
        tail = self._tail if ids[len(ids) - len(self._tail) :] == self._tail else []
        return ids[: self.max_tokens - len(tail)] + tail

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(self.tokenize(text)) for text in texts]

    def embed(self, texts: list[str]) -> Embeddings:
        import numpy as np

        if not texts:
            return Embeddings(np.zeros((0, self.dim), dtype=np.float32), ())
        encoded = [self.tokenize(text) for text in texts]
        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)
        chunk: list[int] = []
        used = 0
        for index, ids in enumerate(encoded):
            if chunk and (used + len(ids) > self._n_batch or len(chunk) >= self._n_seq_max):
                self._run(chunk, encoded, vectors)
                chunk, used = [], 0
            chunk.append(index)
            used += len(ids)
        self._run(chunk, encoded, vectors)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors /= np.maximum(norms, 1e-12)
        return Embeddings(vectors, tuple(len(ids) for ids in encoded))

    def _run(
        self, chunk: list[int], encoded: list[list[int]], out: npt.NDArray[np.float32]
    ) -> None:
        """Decode the texts `chunk` (indexes into `encoded`) as one batch; pooled rows to `out`."""
        import llama_cpp
        import numpy as np

        batch = self._batch
        n = 0
        for seq, index in enumerate(chunk):
            for pos, token in enumerate(encoded[index]):
                batch.token[n] = token
                batch.pos[n] = pos
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq
                batch.logits[n] = True  # embedding mode wants every token as an output
                n += 1
        batch.n_tokens = n
        if self._memory is not None:  # a causal embedder (LAST pooling) keeps a KV cache
            llama_cpp.llama_memory_clear(self._memory, True)
        code = int(llama_cpp.llama_decode(self._ctx, batch))
        if code != 0:
            raise EngineError(f"llama.cpp failed to embed a batch of {len(chunk)} (code {code})")
        for seq, index in enumerate(chunk):
            pointer = llama_cpp.llama_get_embeddings_seq(self._ctx, seq)
            if not pointer:  # pragma: no cover - pooling is checked at load
                raise EngineError("llama.cpp returned no pooled embedding")
            out[index] = np.ctypeslib.as_array(pointer, shape=(self.dim,))


# --- WordPiece's word-length limit -----------------------------------------------------------


def _unk_long_words(text: str, unk: str) -> str:
    """`text` with every BERT word longer than MAX_WORD_CHARS replaced by the [UNK] token text.

    Words are split as BertPreTokenizer splits them (whitespace, punctuation, CJK ideographs)
    and measured after BertNormalizer (control characters dropped, accents stripped). Texts
    without a run of more than MAX_WORD_CHARS non-space characters return unchanged at the cost
    of one regex search.
    """
    if not _LONG_RUN.search(text):
        return text
    out: list[str] = []
    word: list[str] = []

    def flush() -> None:
        if word:
            piece = "".join(word)
            out.append(f" {unk} " if _normalized_len(piece) > MAX_WORD_CHARS else piece)
            word.clear()

    for char in text:
        if _splits_words(char):
            flush()
            out.append(char)
        else:
            word.append(char)
    flush()
    return "".join(out)


def _splits_words(char: str) -> bool:
    """Whitespace, punctuation or a CJK ideograph: BERT pre-tokenization's word boundaries."""
    code = ord(char)
    if char.isspace() or unicodedata.category(char).startswith("P"):
        return True
    if code < 128:
        return not char.isalnum() and 33 <= code <= 126  # ASCII symbols count as punctuation
    return (
        0x4E00 <= code <= 0x9FFF
        or 0x3400 <= code <= 0x4DBF
        or 0x20000 <= code <= 0x2A6DF
        or 0x2A700 <= code <= 0x2B81F
        or 0x2B820 <= code <= 0x2CEAF
        or 0xF900 <= code <= 0xFAFF
        or 0x2F800 <= code <= 0x2FA1F
    )


def _normalized_len(word: str) -> int:
    """Length after BertNormalizer: control characters removed, NFD accents stripped."""
    decomposed = unicodedata.normalize("NFD", word)
    return sum(
        1
        for char in decomposed
        if unicodedata.category(char) not in ("Mn", "Cc", "Cf") and char != "\ufffd"
    )
