"""BERT sentence encoders (sentence-transformers layout) from safetensors to one ONNX file.

Edge boxes carry onnxruntime but not torch, and a BERT encoder is small and fixed, so the graph is
written node by node with `onnx.helper` from the safetensors weights. Two choices are deliberate:

* Every dense layer is a plain `MatMul` whose second input is a 2-D float32 initializer (the
  weight transposed to [in, out]) followed by an `Add` of the bias. That is the pattern
  onnxruntime's `MatMulNBitsQuantizer` rewrites to 4/2-bit `MatMulNBits`; a `Gemm`, or a weight
  behind a `Transpose` node, would be skipped without a word.
* The conversion checks itself before anything reaches disk: the graph is run with onnxruntime on
  fixed probe sentences and compared with `reference_embeddings`, an independent numpy forward
  pass (float64, padded keys excluded outright rather than biased). A wiring mistake therefore
  raises `IntegrityError` instead of shipping an encoder that returns plausible-looking vectors.

The output matches sentence-transformers' Transformer -> Pooling(mean) -> Normalize pipeline.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clawctl import __version__
from clawctl.engines.onnx.embed import PAD_TOKEN, load_tokenizer
from clawctl.errors import BadInput, IntegrityError
from clawctl.fsutil import atomic_writer

if TYPE_CHECKING:  # heavy modules are imported where a conversion runs, never at CLI start-up
    import numpy as np
    import numpy.typing as npt
    import onnx
    from tokenizers import Tokenizer

    FloatArray = npt.NDArray[np.float32]

# LayerNormalization first appears in opset 17. Opset 17 needs IR version 8, which every
# onnxruntime since 1.12 reads (1.17, the oldest the project supports, reads up to IR 9); the
# installed onnx would otherwise stamp its own, newer IR version that older runtimes refuse.
OPSET = 17
IR_VERSION = 8
# Additive bias for padded keys. exp(-1e4) is exactly 0 in float32, and unlike finfo(float32).min
# it stays finite if the graph is ever cast to float16 (where (1 - 1) * -inf would give NaN).
MASK_BIAS = -1e4
MIN_COSINE = 0.9999
DEFAULT_MAX_LENGTH = 256
# A single ONNX protobuf cannot exceed 2 GiB; leave headroom for the graph itself.
MAX_WEIGHT_BYTES = 2_000_000_000
# Different lengths on purpose: verified as one padded batch, they also prove padding is masked.
PROBES = (
    "Hello world.",
    "How do I reset my password?",
    "The quick brown fox jumps over the lazy dog near the riverbank at dawn.",
    "Edge devices run small models; ONNX Runtime keeps them fast, portable and dependable "
    "without a Python deep-learning framework installed.",
)
SUPPORTED_MODULES = ("Transformer", "Pooling", "Normalize")


@dataclass(frozen=True)
class BertConfig:
    """The few numbers of a Hugging Face BERT `config.json` that shape the graph."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    layer_norm_eps: float
    max_position: int
    vocab_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_json(cls, path: Path) -> BertConfig:
        """Read and validate `config.json`; anything this converter cannot express is `BadInput`.

        Refusing other activations or position schemes here is what keeps a conversion from
        producing a graph that runs but computes something else.
        """
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BadInput(f"{path}: not found; expected a Hugging Face BERT config.json") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise BadInput(f"{path}: unreadable config ({_one_line(exc)})") from None
        if not isinstance(raw, dict):
            raise BadInput(f"{path}: expected a JSON object")
        if raw.get("model_type") != "bert":
            raise BadInput(f"{path}: model_type {raw.get('model_type')!r} is not 'bert'")
        if raw.get("hidden_act", "gelu") != "gelu":
            raise BadInput(
                f"{path}: hidden_act {raw.get('hidden_act')!r}; only exact 'gelu' is supported"
            )
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise BadInput(f"{path}: only absolute position embeddings are supported")
        eps = raw.get("layer_norm_eps", 1e-12)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise BadInput(f"{path}: layer_norm_eps {eps!r} is not a small positive number")
        config = cls(
            hidden_size=_positive_int(raw, "hidden_size", path),
            num_layers=_positive_int(raw, "num_hidden_layers", path),
            num_heads=_positive_int(raw, "num_attention_heads", path),
            intermediate_size=_positive_int(raw, "intermediate_size", path),
            layer_norm_eps=float(eps),
            max_position=_positive_int(raw, "max_position_embeddings", path),
            vocab_size=_positive_int(raw, "vocab_size", path),
        )
        if config.hidden_size % config.num_heads:
            raise BadInput(
                f"{path}: hidden_size {config.hidden_size} is not a multiple of "
                f"num_attention_heads {config.num_heads}"
            )
        return config


@dataclass(frozen=True)
class BertConversion:
    """What `convert_bert` wrote: shape, size, and how closely it matched the numpy reference."""

    dim: int
    layers: int
    parameters: int  # float weights embedded in the graph (pooler and unused token types dropped)
    onnx_bytes: int
    reference_cosine: float  # min over the probe sentences; >= MIN_COSINE or nothing was written


def convert_bert(model_dir: Path, out: Path) -> BertConversion:
    """Convert a sentence-transformers BERT directory to a verified, self-contained ONNX file.

    `out` is replaced atomically and only after the graph agreed with the numpy reference, so a
    failed conversion leaves whatever was at `out` untouched.
    """
    import onnx

    model_dir, out = Path(model_dir), Path(out)
    if not model_dir.is_dir():
        raise BadInput(f"{model_dir}: not a directory; expected a sentence-transformers model")
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (model_dir / name).is_file():
            raise BadInput(f"{model_dir}: no {name}; expected a sentence-transformers BERT model")
    if out.is_dir():
        raise BadInput(f"{out}: is a directory; give the path of the .onnx file to write")
    config = BertConfig.from_json(model_dir / "config.json")
    check_modules(model_dir, config)
    max_length = truncation_length(model_dir, config)
    tokenizer = load_tokenizer(model_dir / "tokenizer.json", max_length)
    weights = _load_weights(model_dir / "model.safetensors", config)

    model, parameters = _build_model(weights, config, max_length)
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise IntegrityError(f"built ONNX graph is invalid: {_one_line(exc)}") from None
    data = model.SerializeToString()
    del model  # only the serialized bytes are needed from here on: lower peak memory

    cosine = _verify(data, weights, config, tokenizer)
    if not cosine >= MIN_COSINE:  # written this way round so that NaN fails too
        raise IntegrityError(
            f"{model_dir}: ONNX output disagrees with the numpy reference "
            f"(min cosine {cosine:.6f} < {MIN_COSINE}); nothing was written"
        )
    with atomic_writer(out) as handle:
        handle.write(data)
    return BertConversion(
        dim=config.hidden_size,
        layers=config.num_layers,
        parameters=parameters,
        onnx_bytes=len(data),
        reference_cosine=cosine,
    )


def reference_embeddings(
    weights: dict[str, np.ndarray[Any, Any]],
    config: BertConfig,
    input_ids: npt.ArrayLike,
    attention_mask: npt.ArrayLike,
) -> npt.NDArray[np.float64]:
    """Sentence embeddings [batch, hidden] by a plain numpy forward pass, in float64.

    This is the yardstick the ONNX graph is checked against, so it shares none of the graph's
    wiring and takes the textbook route wherever the graph takes a shortcut: padded keys are
    excluded with -inf instead of a finite bias, GELU uses `math.erf` directly, and everything is
    computed in float64. `weights` may carry the `bert.` prefix of BertFor* checkpoints.
    """
    import numpy as np

    checked = checked_weights(weights, config)
    ids = np.asarray(input_ids, dtype=np.int64)
    mask = np.asarray(attention_mask) != 0
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise BadInput(f"input_ids {ids.shape} and attention_mask {mask.shape} must be equal 2-D")
    batch, seq = ids.shape
    if seq > config.max_position:
        raise BadInput(f"sequence length {seq} exceeds max_position_embeddings")
    if not mask.any(axis=1).all():
        raise BadInput("every row of attention_mask needs at least one token")
    if ids.size and (ids.min() < 0 or ids.max() >= config.vocab_size):
        raise BadInput(f"input_ids outside the vocabulary of {config.vocab_size}")

    def w(name: str) -> npt.NDArray[np.float64]:
        return checked[name].astype(np.float64)  # cast on use: no float64 copy of the whole model

    def layer_norm(x: npt.NDArray[np.float64], prefix: str) -> npt.NDArray[np.float64]:
        mean = x.mean(axis=-1, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
        normed: npt.NDArray[np.float64] = (x - mean) / np.sqrt(var + config.layer_norm_eps)
        return normed * w(prefix + ".weight") + w(prefix + ".bias")

    def linear(x: npt.NDArray[np.float64], prefix: str) -> npt.NDArray[np.float64]:
        return x @ w(prefix + ".weight").T + w(prefix + ".bias")  # torch layout: [out, in]

    def heads(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return x.reshape(batch, seq, config.num_heads, config.head_dim).transpose(0, 2, 1, 3)

    erf = np.vectorize(math.erf, otypes=[np.float64])

    x = checked["embeddings.word_embeddings.weight"][ids].astype(np.float64)
    x = x + w("embeddings.position_embeddings.weight")[:seq]
    x = x + w("embeddings.token_type_embeddings.weight")[0]
    x = layer_norm(x, "embeddings.LayerNorm")
    for i in range(config.num_layers):
        p = f"encoder.layer.{i}"
        q = heads(linear(x, f"{p}.attention.self.query"))
        k = heads(linear(x, f"{p}.attention.self.key"))
        v = heads(linear(x, f"{p}.attention.self.value"))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(config.head_dim)
        scores = np.where(mask[:, None, None, :], scores, -np.inf)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = scores / scores.sum(axis=-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, config.hidden_size)
        x = layer_norm(
            x + linear(context, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm"
        )
        h = linear(x, f"{p}.intermediate.dense")
        h = 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))
        x = layer_norm(x + linear(h, f"{p}.output.dense"), f"{p}.output.LayerNorm")

    keep = mask[:, :, None].astype(np.float64)
    pooled = (x * keep).sum(axis=1) / np.maximum(keep.sum(axis=1), 1e-9)
    norm = np.linalg.norm(pooled, axis=1, keepdims=True)
    result: npt.NDArray[np.float64] = pooled / np.maximum(norm, 1e-12)
    return result


# --- validation helpers ----------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] or type(exc).__name__


def _positive_int(raw: dict[str, Any], key: str, path: Path) -> int:
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise BadInput(f"{path}: {key} {value!r} is not a positive integer")
    return value


def check_modules(model_dir: Path, config: BertConfig) -> None:
    """Refuse sentence-transformers pipelines this graph would not reproduce (Dense, CLS pooling).

    A directory without modules.json is taken as a plain BERT with mean pooling.
    """
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        return
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
        kinds = {str(m["type"]).rsplit(".", 1)[-1]: str(m.get("path", "")) for m in modules}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise BadInput(f"{modules_file}: unreadable ({_one_line(exc)})") from None
    unsupported = sorted(set(kinds) - set(SUPPORTED_MODULES))
    if unsupported:
        raise BadInput(f"{modules_file}: unsupported modules {', '.join(unsupported)}")
    if "Pooling" not in kinds:
        return
    pooling_file = model_dir / kinds["Pooling"] / "config.json"
    try:
        pooling = json.loads(pooling_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BadInput(f"{pooling_file}: unreadable ({_one_line(exc)})") from None
    if not isinstance(pooling, dict):
        raise BadInput(f"{pooling_file}: expected a JSON object")
    modes = sorted(k for k, v in pooling.items() if k.startswith("pooling_mode_") and v is True)
    if modes != ["pooling_mode_mean_tokens"]:
        raise BadInput(f"{pooling_file}: pooling {modes or 'none'}; only mean pooling is supported")
    dim = pooling.get("word_embedding_dimension", config.hidden_size)
    if dim != config.hidden_size:
        raise BadInput(f"{pooling_file}: word_embedding_dimension {dim} != {config.hidden_size}")


def truncation_length(model_dir: Path, config: BertConfig) -> int:
    """The truncation length sentence-transformers uses, capped by the position table."""
    st_file = model_dir / "sentence_bert_config.json"
    if not st_file.is_file():
        return min(DEFAULT_MAX_LENGTH, config.max_position)
    try:
        value = json.loads(st_file.read_text(encoding="utf-8")).get("max_seq_length")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:
        raise BadInput(f"{st_file}: unreadable ({_one_line(exc)})") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise BadInput(f"{st_file}: max_seq_length {value!r} is not an integer >= 2")
    return min(value, config.max_position)


def _expected_shapes(config: BertConfig) -> dict[str, tuple[int, ...]]:
    h, f = config.hidden_size, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (config.vocab_size, h),
        "embeddings.position_embeddings.weight": (config.max_position, h),
        "embeddings.LayerNorm.weight": (h,),
        "embeddings.LayerNorm.bias": (h,),
    }
    for i in range(config.num_layers):
        p = f"encoder.layer.{i}"
        for name in ("self.query", "self.key", "self.value", "output.dense"):
            shapes[f"{p}.attention.{name}.weight"] = (h, h)
            shapes[f"{p}.attention.{name}.bias"] = (h,)
        shapes[f"{p}.intermediate.dense.weight"] = (f, h)
        shapes[f"{p}.intermediate.dense.bias"] = (f,)
        shapes[f"{p}.output.dense.weight"] = (h, f)
        shapes[f"{p}.output.dense.bias"] = (h,)
        for norm in (f"{p}.attention.output.LayerNorm", f"{p}.output.LayerNorm"):
            shapes[f"{norm}.weight"] = (h,)
            shapes[f"{norm}.bias"] = (h,)
    return shapes


def checked_weights(
    weights: dict[str, np.ndarray[Any, Any]], config: BertConfig
) -> dict[str, FloatArray]:
    """The tensors the encoder uses, as float32, under BertModel names (no `bert.` prefix).

    BertModel checkpoints (this one) name tensors `embeddings.*`/`encoder.*`; BertFor* ones add
    `bert.`. The token type table may have any number of rows; only row 0 is ever used.
    """
    import numpy as np

    prefix = "bert." if any(k.startswith("bert.embeddings.") for k in weights) else ""
    shapes = _expected_shapes(config)
    shapes["embeddings.token_type_embeddings.weight"] = (-1, config.hidden_size)
    checked: dict[str, FloatArray] = {}
    for name, shape in shapes.items():
        tensor = weights.get(prefix + name)
        if tensor is None:
            raise BadInput(f"weights lack {prefix + name} (and maybe more); not a BERT checkpoint?")
        if tensor.dtype.kind != "f":
            raise BadInput(f"{prefix + name}: dtype {tensor.dtype} is not floating point")
        if len(tensor.shape) != len(shape) or any(
            want not in (-1, got) for want, got in zip(shape, tensor.shape, strict=True)
        ):
            raise BadInput(f"{prefix + name}: shape {tuple(tensor.shape)}, config implies {shape}")
        checked[name] = np.ascontiguousarray(tensor, dtype=np.float32)
    if checked["embeddings.token_type_embeddings.weight"].shape[0] < 1:
        raise BadInput("embeddings.token_type_embeddings.weight has no rows")
    return checked


def _load_weights(path: Path, config: BertConfig) -> dict[str, FloatArray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        raw = load_file(str(path))
    except (OSError, SafetensorError, ValueError, TypeError) as exc:
        raise BadInput(f"{path}: unreadable safetensors ({_one_line(exc)})") from None
    checked = checked_weights(raw, config)
    if sum(t.nbytes for t in checked.values()) > MAX_WEIGHT_BYTES:
        raise BadInput(f"{path}: weights exceed the 2 GiB limit of a single-file ONNX model")
    return checked


# --- graph building --------------------------------------------------------------------------


class _Graph:
    """Nodes and initializers in the order they are wired, with readable, unique tensor names.

    Each node's single output is named after the node, so a tensor seen in a profiler or in
    onnxruntime's error messages points straight back to the line that built it.
    """

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.parameters = 0

    def weight(self, name: str, array: np.ndarray[Any, Any]) -> str:
        """A learned tensor: counted in `parameters`."""
        self.parameters += int(array.size)
        return self.const(name, array)

    def const(self, name: str, array: np.ndarray[Any, Any]) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, name: str, *inputs: str, **attrs: Any) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op_type, list(inputs), [name], name=name, **attrs))
        return name

    def dense(self, x: str, weights: dict[str, FloatArray], prefix: str) -> str:
        """`x @ W^T + b` as MatMul(x, 2-D initializer [in, out]) then Add: the quantizable form."""
        import numpy as np

        w_t = self.weight(f"{prefix}.weight_t", np.ascontiguousarray(weights[f"{prefix}.weight"].T))
        bias = self.weight(f"{prefix}.bias", weights[f"{prefix}.bias"])
        return self.op("Add", f"{prefix}.out", self.op("MatMul", f"{prefix}.matmul", x, w_t), bias)

    def layer_norm(self, x: str, weights: dict[str, FloatArray], prefix: str, eps: float) -> str:
        scale = self.weight(f"{prefix}.weight", weights[f"{prefix}.weight"])
        bias = self.weight(f"{prefix}.bias", weights[f"{prefix}.bias"])
        return self.op("LayerNormalization", f"{prefix}.out", x, scale, bias, axis=-1, epsilon=eps)


def _build_model(
    weights: dict[str, FloatArray], config: BertConfig, max_length: int
) -> tuple[onnx.ModelProto, int]:
    """The encoder graph and the number of learned parameters embedded in it."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    g = _Graph()
    h, heads, head_dim = config.hidden_size, config.num_heads, config.head_dim

    def f32(value: float) -> FloatArray:
        return np.array(value, dtype=np.float32)

    def i64(*values: int) -> npt.NDArray[np.int64]:
        return np.array(values, dtype=np.int64)

    one = g.const("const.one", f32(1.0))
    half = g.const("const.half", f32(0.5))
    sqrt2 = g.const("const.sqrt2", f32(math.sqrt(2.0)))
    scale = g.const("const.attention_scale", f32(1.0 / math.sqrt(head_dim)))
    mask_bias = g.const("const.mask_bias", f32(MASK_BIAS))
    count_eps = g.const("const.count_eps", f32(1e-9))  # sentence-transformers' clamp
    norm_eps = g.const("const.norm_eps", f32(1e-12))  # torch.nn.functional.normalize's eps
    zero_1d = g.const("const.zero_1d", i64(0))
    axis_1 = g.const("const.axis_1", i64(1))
    axis_2 = g.const("const.axis_2", i64(2))
    axes_1_2 = g.const("const.axes_1_2", i64(1, 2))
    split_heads = g.const("const.split_heads_shape", i64(0, 0, heads, head_dim))
    merge_heads = g.const("const.merge_heads_shape", i64(0, 0, h))

    # Embeddings: word + position[:seq] + token type 0 (single sentences only), then LayerNorm.
    word = g.op(
        "Gather",
        "embeddings.word",
        g.weight("embeddings.word_embeddings.weight", weights["embeddings.word_embeddings.weight"]),
        "input_ids",
        axis=0,
    )
    seq_len = g.op("Shape", "embeddings.seq_len", "input_ids", start=1, end=2)
    positions = g.op(
        "Slice",
        "embeddings.position",
        g.weight(
            "embeddings.position_embeddings.weight",
            weights["embeddings.position_embeddings.weight"],
        ),
        zero_1d,
        seq_len,
        zero_1d,
    )
    token_type = g.weight(
        "embeddings.token_type_embeddings.row0",
        weights["embeddings.token_type_embeddings.weight"][0],
    )
    x = g.op("Add", "embeddings.word_position", word, positions)
    x = g.op("Add", "embeddings.sum", x, token_type)
    x = g.layer_norm(x, weights, "embeddings.LayerNorm", config.layer_norm_eps)

    # Padded keys get MASK_BIAS added to their scores: (1 - mask) * MASK_BIAS as [batch,1,1,seq].
    mask = g.op("Cast", "mask.float", "attention_mask", to=TensorProto.FLOAT)
    keys_mask = g.op("Unsqueeze", "mask.keys", mask, axes_1_2)
    padded = g.op("Sub", "mask.padded", one, keys_mask)
    score_bias = g.op("Mul", "mask.score_bias", padded, mask_bias)

    for i in range(config.num_layers):
        p = f"encoder.layer.{i}"

        def split(t: str, perm: tuple[int, ...], name: str) -> str:
            return g.op(
                "Transpose",
                f"{name}.heads",
                g.op("Reshape", f"{name}.split", t, split_heads),
                perm=list(perm),
            )

        q = split(g.dense(x, weights, f"{p}.attention.self.query"), (0, 2, 1, 3), f"{p}.q")
        k_t = split(g.dense(x, weights, f"{p}.attention.self.key"), (0, 2, 3, 1), f"{p}.k")
        v = split(g.dense(x, weights, f"{p}.attention.self.value"), (0, 2, 1, 3), f"{p}.v")
        scores = g.op("MatMul", f"{p}.scores", q, k_t)
        scores = g.op("Mul", f"{p}.scores_scaled", scores, scale)
        scores = g.op("Add", f"{p}.scores_masked", scores, score_bias)
        probs = g.op("Softmax", f"{p}.probs", scores, axis=-1)
        context = g.op("MatMul", f"{p}.context", probs, v)
        context = g.op("Transpose", f"{p}.context_t", context, perm=[0, 2, 1, 3])
        context = g.op("Reshape", f"{p}.context_merged", context, merge_heads)
        attn = g.dense(context, weights, f"{p}.attention.output.dense")
        x = g.op("Add", f"{p}.attention.residual", x, attn)
        x = g.layer_norm(x, weights, f"{p}.attention.output.LayerNorm", config.layer_norm_eps)

        inner = g.dense(x, weights, f"{p}.intermediate.dense")
        gelu = g.op("Erf", f"{p}.gelu.erf", g.op("Div", f"{p}.gelu.scaled", inner, sqrt2))
        gelu = g.op("Add", f"{p}.gelu.one_plus", gelu, one)
        gelu = g.op("Mul", f"{p}.gelu.times_x", inner, gelu)
        gelu = g.op("Mul", f"{p}.gelu.out", gelu, half)
        ffn = g.dense(gelu, weights, f"{p}.output.dense")
        x = g.op("Add", f"{p}.output.residual", x, ffn)
        x = g.layer_norm(x, weights, f"{p}.output.LayerNorm", config.layer_norm_eps)

    tokens = g.op("Identity", "token_embeddings", x)
    # Mean over real tokens, then L2 normalisation, as sentence-transformers' Pooling + Normalize.
    token_mask = g.op("Unsqueeze", "pool.token_mask", mask, axis_2)
    summed = g.op(
        "ReduceSum", "pool.sum", g.op("Mul", "pool.masked", tokens, token_mask), axis_1, keepdims=0
    )
    count = g.op("ReduceSum", "pool.count", token_mask, axis_1, keepdims=0)
    count = g.op("Max", "pool.count_clamped", count, count_eps)
    mean = g.op("Div", "pool.mean", summed, count)
    # sqrt(sum(x^2)) rather than ReduceL2, whose axes moved from attribute to input in opset 18:
    # this form reads the same in every opset a quantizer may upgrade the model to.
    squares = g.op("Mul", "pool.squares", mean, mean)
    norm = g.op("Sqrt", "pool.norm", g.op("ReduceSum", "pool.sum_sq", squares, axis_1, keepdims=1))
    norm = g.op("Max", "pool.norm_clamped", norm, norm_eps)
    g.op("Div", "sentence_embedding", mean, norm)

    graph = helper.make_graph(
        g.nodes,
        "bert_sentence_encoder",
        inputs=[
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info(
                "attention_mask", TensorProto.INT64, ["batch", "sequence"]
            ),
        ],
        outputs=[
            helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", h]),
            helper.make_tensor_value_info(
                "token_embeddings", TensorProto.FLOAT, ["batch", "sequence", h]
            ),
        ],
        initializer=g.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="clawctl",
        producer_version=__version__,
        doc_string="BERT sentence encoder: mean pooling over attention_mask, L2-normalised.",
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(
        model,
        {
            "clawctl.pooling": "mean",
            "clawctl.normalize": "l2",
            "clawctl.max_length": str(max_length),
            "clawctl.pad_token": PAD_TOKEN,
        },
    )
    assert isinstance(model, onnx.ModelProto)
    return model, g.parameters


def _verify(
    model_bytes: bytes, weights: dict[str, FloatArray], config: BertConfig, tokenizer: Tokenizer
) -> float:
    """Min cosine between onnxruntime's and the numpy reference's embeddings of `PROBES`.

    The probes run as one padded batch, so a graph that lets padding leak into attention or
    pooling fails here too. Non-finite output yields NaN, which the caller treats as failure.
    """
    import numpy as np
    import onnxruntime as ort

    encodings = tokenizer.encode_batch(list(PROBES))
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    got, tokens = session.run(
        ["sentence_embedding", "token_embeddings"], {"input_ids": ids, "attention_mask": mask}
    )
    if got.shape != (len(PROBES), config.hidden_size) or tokens.shape != (
        *ids.shape,
        config.hidden_size,
    ):
        raise IntegrityError(f"ONNX output shapes {got.shape}, {tokens.shape} are wrong")
    want = reference_embeddings(weights, config, ids, mask)
    got64 = got.astype(np.float64)
    cosines = (got64 * want).sum(axis=1) / (
        np.linalg.norm(got64, axis=1) * np.linalg.norm(want, axis=1)
    )
    if not np.isfinite(cosines).all():
        return float("nan")
    return float(cosines.min())
