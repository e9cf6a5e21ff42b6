"""Weight-only quantization of ONNX models to 8, 4 or 2 bits, as `com.microsoft::MatMulNBits`.

Every MatMul whose weight B is a 2-D float32/float16 initializer is rewritten by onnxruntime's own
quantizer (`MatMulNBitsQuantizer` with `DefaultWeightOnlyQuantConfig`: round-to-nearest, one scale
and zero point per block of `block_size` weights along K). Using onnxruntime's quantizer rather
than our own packing means the file is laid out exactly as the kernel that runs it expects.

All three widths are MatMulNBits: onnxruntime 1.32's quantizer (`quantize_matmul_{2,4,8}bits`) and
its CPU kernel both take bits 2, 4 and 8, so int8 is *not* done with `quantize_dynamic` (that would
also quantize activations at run time through different operators, and store weights per tensor
rather than per block).

Speed depends on `accuracy_level` more than on the bit width. Level 4 lets the kernel quantize
activations to int8 per block (in float32: scale max|a|/127, q = round-half-even(a * 127/max|a|))
and use integer dot products. Measured with onnxruntime 1.32 on x86-64 (AVX-512 VNNI), one thread,
per [M,384] x [384,1536] MatMul, M=1 / M=32: float32 29 / 273 us; 8-bit 9 / 142 us at level 4 but
0.5 / 0.9 ms at level 0; 4-bit 9 / 192 us at level 4, 29 / 325 us at level 0; 2-bit 8-14 /
184-365 us at level 4 with block_size 128-32, but 1.5-2 ms at any other level or block size (16,
256). The slow cases are where onnxruntime has no fused kernel and falls back to a plain fp32 path
(its output then equals float activations exactly); `OnnxQuantOptions.slow_path_warnings` names
them. 2-bit buys size, not speed: at M=32 with 32-weight blocks it is slower than float32.

MatMulNBits layout (the contrib op spec, checked against the quantizer and kernel output):
- B: uint8 [N, k_blocks, blob_size], k_blocks = ceil(K / block_size), blob_size =
  block_size * bits / 8. Row n holds column n of the logical [K, N] weight; K is zero-padded to
  k_blocks * block_size. Weight i of a block is in byte i // (8 / bits), at bit offset
  bits * (i % (8 / bits)), lowest bits first.
- scales: [N, k_blocks], in A's float type. Symmetric quantization makes them signed: the weight
  of largest magnitude maps to -2^(bits-1).
- zero_points (optional): uint8 [N, ceil(k_blocks * bits / 8)], packed like B along the blocks;
  or unpacked [N, k_blocks] in A's float type; when absent, 2^(bits-1).
- W[k, n] = (q - zero_point) * scale.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clawctl.errors import BadInput, ClawError
from clawctl.fsutil import atomic_write

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    from onnx import GraphProto, ModelProto, NodeProto, TensorProto

BITS = (8, 4, 2)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
FAST_ACCURACY_LEVEL = 4
# Defaults: 32-weight blocks, like llama.cpp's Q4_0/Q8_0 (and the smallest 2-bit block with a fast
# kernel). For 8 bits, 128-weight blocks would save ~2% of MiniLM's file but lower its embeddings'
# cosine vs float from 0.9997 to 0.9992 (min 0.9995 to 0.9987): not worth it for a cache key.
DEFAULT_BLOCK_SIZE = {8: 32, 4: 32, 2: 32}
FAST_2BIT_BLOCK_SIZES = (32, 64, 128)
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 16, 256
# A single-file ONNX model is one protobuf message, and protobuf refuses messages of 2 GiB or more.
MAX_SINGLE_FILE_BYTES = 2**31 - 1
# Float weight types we quantize; bfloat16 is left alone (its MatMulNBits CPU path is untested).
_FLOAT32, _FLOAT16 = 1, 10
_DEFAULT_DOMAINS = ("", "ai.onnx")
_QUANTIZER_MODULE = "onnxruntime.quantization.matmul_nbits_quantizer"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OnnxQuantOptions:
    """How to quantize: bit width, block size along K, the kernel's accuracy level, symmetry.

    `block_size` None picks `DEFAULT_BLOCK_SIZE[bits]`. `accuracy_level` None picks 4 (int8
    activations), the only level with a fast kernel for 2 and 8 bits and ~3x faster than level 0
    for 4 bits; 0 keeps activations in float (exact products, slower). After construction both
    fields hold the resolved values. `symmetric` drops the zero points (a smaller file); it lowers
    the weight error at 2 bits and raises it at 4 and 8 bits (Gaussian and t3 weights).
    """

    bits: int = 4
    block_size: int | None = None
    accuracy_level: int | None = None
    symmetric: bool = False
    # Also quantize constant lookup tables (Gather: a text encoder's word embeddings, often the
    # largest tensor) to 4 bits, the only width onnxruntime's GatherBlockQuantized takes. None:
    # for 4 and 2 bits, where size is the point; int8 keeps them float to stay >= 0.999 cosine.
    tables: bool | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.bits) or self.bits not in BITS:
            raise BadInput(f"bits must be 8, 4 or 2, not {self.bits!r}", param="bits")
        block = DEFAULT_BLOCK_SIZE[self.bits] if self.block_size is None else self.block_size
        if (
            not _is_int(block)
            or not MIN_BLOCK_SIZE <= block <= MAX_BLOCK_SIZE
            or block & (block - 1)
        ):
            raise BadInput(
                f"block_size must be a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE},"
                f" not {block!r}",
                param="block_size",
            )
        level = FAST_ACCURACY_LEVEL if self.accuracy_level is None else self.accuracy_level
        if not _is_int(level) or level not in ACCURACY_LEVELS:
            raise BadInput(
                f"accuracy_level must be 0, 1, 2, 3 or 4, not {level!r}", param="accuracy_level"
            )
        if not isinstance(self.symmetric, bool):
            raise BadInput(f"symmetric must be true or false, not {self.symmetric!r}")
        object.__setattr__(self, "block_size", block)
        object.__setattr__(self, "accuracy_level", level)
        if self.tables is None:
            object.__setattr__(self, "tables", self.bits <= 4)

    @classmethod
    def create(
        cls,
        bits: int,
        block_size: int | None = None,
        accuracy_level: int | None = None,
        symmetric: bool = False,
    ) -> OnnxQuantOptions:
        """Positional form for callers passing CLI flags through (None: the default for `bits`)."""
        return cls(
            bits=bits, block_size=block_size, accuracy_level=accuracy_level, symmetric=symmetric
        )

    @property
    def resolved(self) -> tuple[int, int]:
        """(block_size, accuracy_level), typed as set by `__post_init__`."""
        assert self.block_size is not None
        assert self.accuracy_level is not None
        return self.block_size, self.accuracy_level

    def slow_path_warnings(self) -> tuple[str, ...]:
        """Combinations that work but run 60-150x slower (see the module docstring); allowed,
        because a caller may want them for accuracy or to reproduce a result."""
        block, level = self.resolved
        found: list[str] = []
        if self.bits == 2 and level != FAST_ACCURACY_LEVEL:
            found.append(
                f"2-bit with accuracy_level {level} runs ~100x slower than with accuracy_level 4"
                " (onnxruntime has no fused 2-bit kernel for float activations)"
            )
        if self.bits == 2 and block not in FAST_2BIT_BLOCK_SIZES:
            found.append(
                f"2-bit with block_size {block} runs ~100x slower: onnxruntime's fast 2-bit"
                " kernel needs block_size 32, 64 or 128"
            )
        if self.bits == 8 and level != FAST_ACCURACY_LEVEL:
            found.append(
                f"8-bit with accuracy_level {level} runs ~60x slower than with accuracy_level 4"
                " (onnxruntime has no fused 8-bit kernel for float activations)"
            )
        return tuple(found)


@dataclass(frozen=True)
class OnnxQuantReport:
    """What `quantize_onnx` did; `skipped` counts the MatMuls left in float (their weight is not
    a 2-D float32/float16 initializer)."""

    bits: int
    block_size: int
    accuracy_level: int
    symmetric: bool
    quantized_matmuls: int
    skipped: int
    quantized_tables: int
    src_bytes: int
    dst_bytes: int
    warnings: tuple[str, ...]


def quantize_onnx(src: Path, dst: Path, options: OnnxQuantOptions) -> OnnxQuantReport:
    """Quantize every eligible MatMul of `src` into MatMulNBits and write the model to `dst`.

    All three widths use onnxruntime's MatMulNBits (int8 included, see the module docstring).
    `dst` is one self-contained file (external data of `src` is inlined), written through a temp
    file in its directory that is fsynced and renamed over it, so on any failure `dst` is either
    absent or the file it was before. Raises `BadInput` when `src` is not a readable ONNX model,
    when no MatMul can be quantized, or when the result would not fit one file (2 GiB); and
    `ClawError` when onnx, onnx-ir or ml_dtypes is missing or onnxruntime cannot pack `bits`.
    """
    quantizer = _import_quantizer(options.bits)
    model, src_bytes = _load_model(src)
    valid = _passes_checker(src)
    excluded, eligible = _name_and_sort_matmuls(model)
    if not eligible:
        raise BadInput(
            f"{src}: no MatMul has a 2-D float initializer as weight; nothing to quantize"
        )
    block, level = options.resolved
    tables = 0
    if options.tables:
        model, tables = _quantize_tables(quantizer, model, block, options.symmetric)
    before = _count_ops(model, "MatMulNBits")
    engine = quantizer.MatMulNBitsQuantizer(
        model,
        bits=options.bits,
        block_size=block,
        is_symmetric=options.symmetric,
        accuracy_level=level,
        nodes_to_exclude=excluded,
    )
    with _quiet(_QUANTIZER_MODULE):
        engine.process()
    quantized: ModelProto = engine.model.model
    done = _count_ops(quantized, "MatMulNBits") - before
    if done == 0:
        raise BadInput(f"{src}: onnxruntime's quantizer changed no MatMul; nothing to quantize")
    data = _serialized(quantized, src, check=valid)
    atomic_write(dst, data)
    report = OnnxQuantReport(
        bits=options.bits,
        block_size=block,
        accuracy_level=level,
        symmetric=options.symmetric,
        quantized_matmuls=done,
        skipped=_count_ops(quantized, "MatMul"),
        quantized_tables=tables,
        src_bytes=src_bytes,
        dst_bytes=len(data),
        warnings=options.slow_path_warnings(),
    )
    log.info("quantized %s to %s: %s", src, dst, report)
    return report


def _quantize_tables(
    quantizer: Any, model: ModelProto, block: int, symmetric: bool
) -> tuple[ModelProto, int]:
    """Constant Gather tables to 4-bit GatherBlockQuantized (blocks along the embedding axis);
    MatMuls are left for the main pass at the requested width."""
    before = _count_ops(model, "GatherBlockQuantized")
    engine = quantizer.MatMulNBitsQuantizer(
        model,
        bits=4,
        block_size=block,
        is_symmetric=symmetric,
        op_types_to_quantize=("Gather",),
        quant_axes=(("Gather", 1),),
    )
    # it warns that int4 tensors need opset 21 and IR 10 and upgrades the model: expected here
    with _quiet(_QUANTIZER_MODULE, logging.ERROR):
        engine.process()
    result: ModelProto = engine.model.model
    return result, _count_ops(result, "GatherBlockQuantized") - before


def matmul_nbits_reference(model_path: Path) -> dict[str, npt.NDArray[np.float32]]:
    """The float weight [K, N] each MatMulNBits node of a model stands for, dequantized in numpy.

    Keyed by the node's output name: quantization keeps the original MatMul's output name, so the
    key pairs a dequantized weight with the float one it replaced, and it is unique in a model.
    Computed in float32 as (q - zero_point) * scale per the op spec (the kernel's own arithmetic),
    so `a @ W` matches onnxruntime at accuracy_level 0 to float rounding. This is the independent
    check on the packed layout, and gives the weight error a quantization actually made.
    """
    model, _ = _load_model(model_path)
    weights: dict[str, npt.NDArray[np.float32]] = {}
    for node, scope in _walk(model.graph, {}):
        if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
            weights[node.output[0]] = _dequantize(node, scope, model_path)
    return weights


# --- helpers ------------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _import_quantizer(bits: int) -> Any:
    """onnxruntime's MatMulNBits quantizer, able to pack `bits`, or a clear error.

    onnxruntime does not declare onnx, onnx-ir or ml_dtypes, which the quantizer imports, so a
    plain `pip install onnxruntime` gets an ImportError from deep inside it. The module also calls
    `logging.basicConfig(level=INFO)` on import; the root logger is put back as it was so that
    importing it does not turn on INFO output for every library in the process. Older
    onnxruntime releases lack the 2- and 8-bit packers (`quantize_matmul_{2,8}bits`).
    """
    for module, package in (("onnx", "onnx"), ("onnx_ir", "onnx-ir"), ("ml_dtypes", "ml_dtypes")):
        try:
            importlib.import_module(module)
        except ImportError:
            raise ClawError(
                f"ONNX quantization needs the {package!r} package, which onnxruntime uses but does"
                f" not declare: pip install {package}"
            ) from None
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        import onnxruntime
        from onnxruntime.quantization import matmul_nbits_quantizer
    except ImportError as exc:
        raise ClawError(
            f"this onnxruntime cannot quantize to MatMulNBits ({exc}); upgrade onnxruntime"
        ) from None
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
    if not hasattr(matmul_nbits_quantizer, f"quantize_matmul_{bits}bits"):
        raise ClawError(
            f"onnxruntime {onnxruntime.__version__} cannot pack {bits}-bit MatMulNBits weights;"
            " upgrade onnxruntime (1.32 packs 2, 4 and 8 bits)"
        )
    return matmul_nbits_quantizer


@contextlib.contextmanager
def _quiet(logger_name: str, keep: int = logging.WARNING) -> Iterator[None]:
    """The quantizer logs a few INFO lines per node; keep only its warnings and errors."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(keep)
    try:
        yield
    finally:
        logger.setLevel(level)


def _load_model(path: Path) -> tuple[ModelProto, int]:
    """The model with its external data inlined, and its size on disk (file plus data files)."""
    import onnx
    from onnx.external_data_helper import (
        ExternalDataInfo,
        load_external_data_for_model,
        uses_external_data,
    )

    if not path.is_file():
        raise BadInput(f"{path} does not exist or is not a file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise BadInput(f"{path} is not an ONNX model ({_first_line(exc)})") from None
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise BadInput(f"{path} is not an ONNX model (no IR version or no graph)")
    locations = {
        ExternalDataInfo(tensor).location
        for graph in _graphs(model.graph)
        for tensor in graph.initializer
        if uses_external_data(tensor)
    }
    size = path.stat().st_size
    try:
        size += sum((path.parent / location).stat().st_size for location in locations)
        load_external_data_for_model(model, str(path.parent))
    except Exception as exc:
        raise BadInput(f"{path}: cannot read its external data ({_first_line(exc)})") from None
    return model, size


def _graphs(graph: GraphProto) -> Iterator[GraphProto]:
    """A graph and all its subgraphs (If/Loop/Scan bodies), outermost first."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            subgraphs = [attribute.g] if attribute.HasField("g") else []
            for sub in [*subgraphs, *attribute.graphs]:
                yield from _graphs(sub)


def _walk(
    graph: GraphProto, outer: Mapping[str, TensorProto]
) -> Iterator[tuple[NodeProto, Mapping[str, TensorProto]]]:
    """Every node of a graph and its subgraphs, with the initializers it can see: its own graph's
    and those of the graphs around it, inner names shadowing outer ones (ONNX scoping)."""
    scope = {**outer, **{tensor.name: tensor for tensor in graph.initializer}}
    for node in graph.node:
        yield node, scope
        for attribute in node.attribute:
            subgraphs = [attribute.g] if attribute.HasField("g") else []
            for sub in [*subgraphs, *attribute.graphs]:
                yield from _walk(sub, scope)


def _is_default_matmul(node: NodeProto) -> bool:
    return node.op_type == "MatMul" and node.domain in _DEFAULT_DOMAINS


def _quantizable(node: NodeProto, scope: Mapping[str, TensorProto]) -> bool:
    weight = scope.get(node.input[1]) if len(node.input) == 2 else None
    return (
        weight is not None
        and len(weight.dims) == 2
        and weight.data_type in (_FLOAT32, _FLOAT16)
        and _is_default_matmul(node)
    )


def _name_and_sort_matmuls(model: ModelProto) -> tuple[list[str], list[str]]:
    """Give every MatMul a unique name, then split the names into (excluded, eligible).

    onnxruntime's quantizer takes any node whose op_type is MatMul, including N-D weights with
    leading ones and other domains; it can only be told to leave a node alone by name, and an
    unnamed or duplicate name would exclude (or include) the wrong nodes.
    """
    nodes = list(_walk(model.graph, {}))
    taken = {node.name for node, _ in nodes if node.name}
    seen: set[str] = set()
    excluded: list[str] = []
    eligible: list[str] = []
    for node, scope in nodes:
        if node.op_type != "MatMul":
            continue
        if not node.name or node.name in seen:
            stem = node.name or f"MatMul_{node.output[0]}"
            fresh, n = stem, 0
            while fresh in taken:
                n += 1
                fresh = f"{stem}_{n}"
            node.name = fresh
            taken.add(fresh)
        seen.add(node.name)
        (eligible if _quantizable(node, scope) else excluded).append(node.name)
    return excluded, eligible


def _count_ops(model: ModelProto, op_type: str) -> int:
    return sum(node.op_type == op_type for node, _ in _walk(model.graph, {}))


def _passes_checker(path: Path) -> bool:
    """Whether onnx's checker accepts the source (by path, so external data and > 2 GiB work).

    Some models onnxruntime runs fail the checker (e.g. graph outputs without a shape); those are
    quantized anyway, and only a model that passed is held to passing after quantization.
    """
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        log.debug("%s fails onnx's checker (%s); its quantized form is not checked", path, exc)
        return False
    return True


def _serialized(model: ModelProto, src: Path, *, check: bool) -> bytes:
    """The model as one file's bytes, refused if it would not fit one protobuf (2 GiB)."""
    import onnx

    size = model.ByteSize()
    if size > MAX_SINGLE_FILE_BYTES:
        raise BadInput(
            f"{src}: the quantized model is {size / 2**30:.1f} GiB; one ONNX file holds < 2 GiB"
        )
    if check:
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as exc:
            raise ClawError(
                f"{src}: onnxruntime's quantizer made a model onnx's checker refuses:"
                f" {_first_line(exc)}"
            ) from None
    data: bytes = model.SerializeToString()
    return data


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _dequantize(
    node: NodeProto, scope: Mapping[str, TensorProto], path: Path
) -> npt.NDArray[np.float32]:
    import numpy as np
    from onnx import helper, numpy_helper

    where = f"{path}: MatMulNBits {node.name or node.output[0]}"
    attrs: dict[str, Any] = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    k, n = int(attrs["K"]), int(attrs["N"])
    bits, block = int(attrs.get("bits", 4)), int(attrs["block_size"])
    if bits not in BITS:
        raise BadInput(f"{where} has {bits}-bit weights; only 2, 4 and 8 are byte-aligned")
    if attrs.get("weight_prepacked", 0):
        raise BadInput(f"{where} holds weights prepacked for a GPU; they cannot be read back")
    if len(node.input) > 4 and node.input[4]:
        raise BadInput(f"{where} uses the deprecated g_idx input, which is not supported")

    def constant(name: str) -> npt.NDArray[Any]:
        if name not in scope:
            raise BadInput(f"{where}: input {name!r} is not an initializer")
        return numpy_helper.to_array(scope[name])

    per_byte, mask = 8 // bits, (1 << bits) - 1
    k_blocks = math.ceil(k / block)
    packed = constant(node.input[1])
    if packed.size == 0:  # an omitted projection: the op outputs zeros
        return np.zeros((k, n), dtype=np.float32)
    shifts = np.arange(per_byte, dtype=np.uint8) * np.uint8(bits)

    def unpack(raw: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        """uint8 [..., m] -> [..., m * per_byte] values; a byte's lowest bits come first."""
        values = (raw.astype(np.uint8)[..., None] >> shifts) & np.uint8(mask)
        return values.reshape(*raw.shape[:-1], -1).astype(np.float32)

    q = unpack(packed.reshape(n, k_blocks, block * bits // 8))  # [N, k_blocks, block_size]
    scales = constant(node.input[2]).astype(np.float32).reshape(n, k_blocks)
    zp_name = node.input[3] if len(node.input) > 3 else ""
    if not zp_name:
        zero = np.full((n, k_blocks), 2 ** (bits - 1), dtype=np.float32)
    else:
        raw_zero = constant(zp_name)
        if raw_zero.dtype == np.uint8:
            zero = unpack(raw_zero.reshape(n, -1))[:, :k_blocks]
        else:
            zero = raw_zero.astype(np.float32).reshape(n, k_blocks)
    weight = (q - zero[..., None]) * scales[..., None]
    return np.ascontiguousarray(weight.reshape(n, -1)[:, :k].T, dtype=np.float32)
