"""Sentence embeddings from an ONNX encoder (MiniLM and other BERT-style models) with
onnxruntime, tokenized by `tokenizers`.

The model directory holds `model.onnx` (inputs `input_ids`, `attention_mask`; output
`sentence_embedding`, pooled and L2-normalised inside the graph) and `tokenizer.json`. Padding is
set explicitly: a tokenizer.json may carry no padding, and a batch must be rectangular. Texts are
embedded in batches of similar length so short texts do not pay for a long one's padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clawctl.errors import BadInput

if TYPE_CHECKING:
    import numpy as np
    from tokenizers import Tokenizer

MODEL_FILE, TOKENIZER_FILE = "model.onnx", "tokenizer.json"
PAD_TOKEN = "[PAD]"
BATCH = 32


def load_tokenizer(path: Path, max_length: int = 256) -> Tokenizer:
    """A `tokenizers.Tokenizer` from `tokenizer.json` (or a directory holding one).

    Truncation and padding are always set here rather than trusted from the file: the file
    stores whatever the exporter last used (all-MiniLM-L6-v2 ships truncation at 128 and fixed
    padding to 128), while sentence-transformers truncates at `max_seq_length` and pads a batch
    only to its longest member.
    """
    from tokenizers import Tokenizer

    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if max_length < 2:
        raise BadInput(f"max_length {max_length} leaves no room for [CLS] and [SEP]")
    if not path.is_file():
        raise BadInput(f"{path}: not found; expected a Hugging Face tokenizer.json")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust binding raises a bare Exception for every parse error
        raise BadInput(f"{path}: not a valid tokenizer.json ({_one_line(exc)})") from None
    pad_id = tokenizer.token_to_id(PAD_TOKEN)
    if pad_id is None:
        raise BadInput(f"{path}: vocabulary has no {PAD_TOKEN} token")
    tokenizer.enable_truncation(
        max_length=max_length, stride=0, strategy="longest_first", direction="right"
    )
    tokenizer.enable_padding(
        direction="right", pad_id=pad_id, pad_type_id=0, pad_token=PAD_TOKEN, length=None
    )
    return tokenizer


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] or type(exc).__name__


@dataclass(frozen=True)
class Embeddings:
    """Unit-length vectors, one row per input, and the tokens each input used."""

    vectors: np.ndarray
    tokens: tuple[int, ...]

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens)


class OnnxEmbedder:
    """A loaded embedding model. Thread-compatible: the daemon calls it from one thread."""

    def __init__(self, model_dir: Path, threads: int = 1, max_tokens: int = 256) -> None:
        import onnxruntime as ort

        model, tokenizer = model_dir / MODEL_FILE, model_dir / TOKENIZER_FILE
        if not model.is_file() or not tokenizer.is_file():
            raise BadInput(f"{model_dir} holds no {MODEL_FILE} and {TOKENIZER_FILE}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self._session: Any = ort.InferenceSession(
            str(model), options, providers=["CPUExecutionProvider"]
        )
        self._tokenizer = load_tokenizer(tokenizer, max_tokens)
        outputs = {o.name: o for o in self._session.get_outputs()}
        if "sentence_embedding" not in outputs:
            raise BadInput(f"{model} has no 'sentence_embedding' output; not an embedding model")
        self.dim = int(outputs["sentence_embedding"].shape[-1])
        self.file_bytes = model.stat().st_size

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens each text uses (padding, which a batch adds, is not counted)."""
        return [sum(e.attention_mask) for e in self._tokenizer.encode_batch(texts)]

    def embed(self, texts: list[str]) -> Embeddings:
        import numpy as np

        if not texts:
            return Embeddings(np.zeros((0, self.dim), dtype=np.float32), ())
        if len(texts) <= BATCH:  # one batch: tokenized once (the cache's lookups are this case)
            vectors, lengths = self._run(texts)
            return Embeddings(vectors, tuple(lengths))
        lengths = self.count_tokens(texts)
        order = sorted(range(len(texts)), key=lambda i: lengths[i])
        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(order), BATCH):
            chunk = order[start : start + BATCH]
            vectors[chunk] = self._run([texts[i] for i in chunk])[0]
        return Embeddings(vectors, tuple(lengths))

    def _run(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        """One padded batch through the session: its vectors and each text's token count."""
        import numpy as np

        encoded = self._tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encoded], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
        (out,) = self._session.run(
            ["sentence_embedding"], {"input_ids": ids, "attention_mask": mask}
        )
        return out, [int(n) for n in mask.sum(axis=1)]

    def close(self) -> None:
        self._session = None  # onnxruntime frees the session with its last reference
