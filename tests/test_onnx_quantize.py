"""ONNX weight-only quantization (MatMulNBits): onnxruntime's output against a numpy reference.

The reference (`matmul_nbits_reference`) unpacks B, scales and zero points per the op spec, so
these tests check the layout independently of the kernel: at accuracy_level 0 onnxruntime must
compute exactly relu(x @ W1q) @ W2q up to float32 rounding. At accuracy_level 4 it first rounds
activations to int8 per block of block_size (scale max|a|/127, in float32 as MLAS does it); that
numpy model is exact too (worst 3e-6 of the output scale over 360 random inputs), so both levels
are compared tightly, and level 4 also loosely against float activations.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from clawctl.build.quantize_onnx import (
    OnnxQuantOptions,
    OnnxQuantReport,
    matmul_nbits_reference,
    quantize_onnx,
)
from clawctl.errors import BadInput, ClawError

Array = npt.NDArray[np.float32]
K, HIDDEN, N, BATCH = 256, 512, 128, 8
# float32 sums of <= 512 products are off by ~sqrt(K) * 6e-8 of the output scale; a single weight
# one quantization step off moves its outputs by ~1e-2 of it, so 1e-4 tells them apart.
TIGHT = 1e-4
# Rounding activations to int8 moves each by <= max|a_block| / 254; over K terms with random signs
# that is ~0.3% of the output scale (measured: 0.5-0.7% at the max), so 2% is a loose bound.
LOOSE = 2e-2
ALL_BITS = [8, 4, 2]


def _save(
    path: Path,
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    inits: list[onnx.TensorProto],
) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _value(name: str, *shape: int | str) -> onnx.ValueInfoProto:
    """A float tensor; no dimensions given means an unknown shape."""
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape) if shape else None)


def _float_mlp(path: Path) -> tuple[Array, Array]:
    """x[batch, 256] -> MatMul W1[256, 512] -> Relu -> MatMul W2[512, 128]; h is an output too,
    so each layer can be checked on the activations onnxruntime itself produced."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((K, HIDDEN)) / math.sqrt(K)).astype(np.float32)
    w2 = (rng.standard_normal((HIDDEN, N)) / math.sqrt(HIDDEN)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["a"], name="mm1"),
        helper.make_node("Relu", ["a"], ["h"], name="relu"),
        helper.make_node("MatMul", ["h", "W2"], ["y"], name="mm2"),
    ]
    inits = [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")]
    outputs = [_value("y", "batch", N), _value("h", "batch", HIDDEN)]
    _save(path, nodes, [_value("x", "batch", K)], outputs, inits)
    return w1, w2


X = np.random.default_rng(1).standard_normal((BATCH, K)).astype(np.float32)
Models = dict[tuple[int, int, bool], tuple[Path, OnnxQuantReport]]


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Array, Array]:
    path = tmp_path_factory.mktemp("float") / "mlp.onnx"
    w1, w2 = _float_mlp(path)
    return path, w1, w2


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, mlp: tuple[Path, Array, Array]) -> Models:
    """The float MLP quantized at every width, accuracy level 4 and 0, asymmetric and symmetric."""
    out = tmp_path_factory.mktemp("quantized")
    built: Models = {}
    for bits in ALL_BITS:
        for level in (4, 0):
            for symmetric in (False, True):
                options = OnnxQuantOptions(bits=bits, accuracy_level=level, symmetric=symmetric)
                dst = out / f"q{bits}-l{level}-{'s' if symmetric else 'a'}.onnx"
                built[bits, level, symmetric] = dst, quantize_onnx(mlp[0], dst, options)
    return built


def _run(path: Path, x: Array, outputs: list[str]) -> list[Array]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [np.asarray(r, dtype=np.float32) for r in session.run(outputs, {"x": x})]


def _relu(a: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return np.maximum(a, 0.0)


def _int8_blocks(a: Array, block: int) -> npt.NDArray[np.float64]:
    """What accuracy_level 4 does to activations, as MLAS's QuantizeARow_CompInt8 does it in
    float32: per block of `block` along K, scale = max|a| / 127, q = round_half_even(a * (127 /
    max|a|)), value q * scale. Float64 arithmetic decides a near-tie differently now and then."""
    blocks = a.astype(np.float32).reshape(a.shape[0], -1, block)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    inverse = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0)
    q = np.rint(blocks * inverse.astype(np.float32))
    values: npt.NDArray[np.float64] = q.astype(np.float64) * (amax / np.float32(127))
    return values.reshape(a.shape)


def _rel_err(got: npt.ArrayLike, want: npt.ArrayLike) -> float:
    want = np.asarray(want, dtype=np.float64)
    return float(np.abs(np.asarray(got, dtype=np.float64) - want).max() / np.abs(want).max())


@pytest.mark.parametrize("bits", ALL_BITS)
def test_level0_output_is_x_times_the_dequantized_weights(bits: int, models: Models) -> None:
    path, report = models[bits, 0, False]
    assert (report.accuracy_level, report.quantized_matmuls, report.skipped) == (0, 2, 0)
    weights = matmul_nbits_reference(path)
    assert sorted(weights) == ["a", "y"]
    assert weights["a"].shape == (K, HIDDEN)
    assert weights["y"].shape == (HIDDEN, N)
    [y] = _run(path, X, ["y"])
    want = _relu(X.astype(np.float64) @ weights["a"]) @ weights["y"]
    assert _rel_err(y, want) < TIGHT


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_level4_output_matches_int8_activations(bits: int, symmetric: bool, models: Models) -> None:
    path, report = models[bits, 4, symmetric]
    block = report.block_size
    weights = matmul_nbits_reference(path)
    w1q, w2q = weights["a"], weights["y"]
    y, h = _run(path, X, ["y", "h"])
    # Layer by layer, each fed the activations onnxruntime produced, so a rounding tie decided
    # differently in layer 1 cannot change an int8 code in layer 2. A CPU without an int8 kernel
    # for these bits computes in float instead; that is exact against the float reference.
    for got, a, w, relu in ((h, X, w1q, True), (y, h, w2q, False)):
        as_int8 = _int8_blocks(a, block) @ w
        as_float = a.astype(np.float64) @ w
        if relu:
            as_int8, as_float = _relu(as_int8), _relu(as_float)
        assert min(_rel_err(got, as_int8), _rel_err(got, as_float)) < TIGHT
        assert _rel_err(got, as_float) < LOOSE
    float_net = _relu(X.astype(np.float64) @ w1q) @ w2q
    assert _rel_err(y, float_net) < LOOSE


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_dequantized_weights_are_within_a_step_of_the_float_ones(
    bits: int, symmetric: bool, models: Models, mlp: tuple[Path, Array, Array]
) -> None:
    """Round to nearest: within half a step (|scale| / 2). Symmetric blocks map the weight of
    largest magnitude to -2^(bits-1), so the other side clamps at 2^(bits-1) - 1: one step."""
    path, report = models[bits, 4, symmetric]
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    weights = matmul_nbits_reference(path)
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 2
    for node, original in zip(nodes, mlp[1:], strict=True):
        assert len(node.input) == (3 if symmetric else 4)
        scales = np.repeat(inits[node.input[2]].T, report.block_size, axis=0)[: original.shape[0]]
        step = np.abs(scales) * (1.0 if symmetric else 0.5)
        error = np.abs(weights[node.output[0]] - original)
        assert (error <= step * (1 + 1e-5) + 1e-7).all()


def test_error_grows_as_bits_shrink(models: Models, mlp: tuple[Path, Array, Array]) -> None:
    _, w1, w2 = mlp
    float_out = _relu(X.astype(np.float64) @ w1) @ w2
    weight_err: list[float] = []
    output_err: list[float] = []
    for bits in ALL_BITS:
        path, _ = models[bits, 0, False]
        weights = matmul_nbits_reference(path)
        weight_err.append(float(np.linalg.norm(weights["a"] - w1) / np.linalg.norm(w1)))
        output_err.append(_rel_err(_run(path, X, ["y"])[0], float_out))
    # Gaussian weights, round to nearest: ~0.6%, ~8% and ~41% of the weights' norm.
    assert weight_err[0] < 0.02 < weight_err[1] < 0.15 < weight_err[2] < 0.6
    assert output_err[0] < output_err[1] < output_err[2]


def _payload(bits: int, block: int, symmetric: bool) -> int:
    """Bytes of B, float32 scales and packed zero points for both weights."""
    total = 0
    for k, n in ((K, HIDDEN), (HIDDEN, N)):
        k_blocks = math.ceil(k / block)
        total += n * k_blocks * (block * bits // 8 + 4)
        total += 0 if symmetric else n * math.ceil(k_blocks * bits / 8)
    return total


def test_files_shrink_with_the_bits(models: Models, mlp: tuple[Path, Array, Array]) -> None:
    src_bytes = mlp[0].stat().st_size
    sizes = []
    for bits in ALL_BITS:
        for symmetric in (False, True):
            path, report = models[bits, 4, symmetric]
            assert report.src_bytes == src_bytes
            assert report.dst_bytes == path.stat().st_size
            payload = _payload(bits, report.block_size, symmetric)
            assert payload <= report.dst_bytes <= payload + 2048
        sizes.append(models[bits, 4, False][1].dst_bytes)
    assert sizes[2] < sizes[1] < sizes[0] < src_bytes
    assert sizes[0] < 0.3 * src_bytes  # 8 bits + 40 bits per 32 weights, vs 32 bits


def test_defaults_and_slow_path_warnings(models: Models) -> None:
    assert OnnxQuantOptions(bits=2) == OnnxQuantOptions(2, 32, 4, False)
    assert OnnxQuantOptions.create(2, None, None) == OnnxQuantOptions(bits=2)
    assert OnnxQuantOptions(bits=4).resolved == (32, 4)
    assert OnnxQuantOptions(bits=8).resolved == (32, 4)
    for bits in ALL_BITS:
        assert OnnxQuantOptions(bits=bits).slow_path_warnings() == ()
        assert models[bits, 4, False][1].warnings == ()
    assert OnnxQuantOptions(bits=4, accuracy_level=0).slow_path_warnings() == ()
    assert len(OnnxQuantOptions(bits=2, block_size=16, accuracy_level=0).slow_path_warnings()) == 2
    [slow_block] = OnnxQuantOptions(bits=2, block_size=256).slow_path_warnings()
    assert "block_size 256" in slow_block
    [slow_level] = models[2, 0, False][1].warnings
    assert "accuracy_level 0" in slow_level
    [slow_int8] = models[8, 0, False][1].warnings
    assert "8-bit" in slow_int8


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"bits": 3}, "bits"),
        ({"bits": 16}, "bits"),
        ({"bits": True}, "bits"),
        ({"bits": 4, "block_size": 8}, "block_size"),
        ({"bits": 4, "block_size": 48}, "block_size"),
        ({"bits": 4, "block_size": 512}, "block_size"),
        ({"bits": 2, "block_size": 0}, "block_size"),
        ({"bits": 4, "accuracy_level": 5}, "accuracy_level"),
        ({"bits": 4, "accuracy_level": -1}, "accuracy_level"),
    ],
)
def test_bad_options_raise_bad_input(kwargs: dict[str, int], param: str) -> None:
    with pytest.raises(BadInput) as caught:
        OnnxQuantOptions(**kwargs)  # type: ignore[arg-type]
    assert caught.value.param == param
    assert "\n" not in caught.value.message


@pytest.mark.parametrize("bits", ALL_BITS)
def test_padded_k_and_odd_block_counts_match_the_kernel(bits: int, tmp_path: Path) -> None:
    """K = 200 with blocks of 32: 7 blocks, the last one padded, and a spare zero-point slot."""
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((200, 24)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"])]
    src = _save(
        tmp_path / "f.onnx",
        nodes,
        [_value("x", 3, 200)],
        [_value("y", 3, 24)],
        [numpy_helper.from_array(w, "W")],
    )
    options = OnnxQuantOptions(bits=bits, block_size=32, accuracy_level=0)
    report = quantize_onnx(src, tmp_path / "q.onnx", options)
    assert (report.quantized_matmuls, report.skipped) == (1, 0)
    x = rng.standard_normal((3, 200)).astype(np.float32)
    [y] = _run(tmp_path / "q.onnx", x, ["y"])
    [wq] = matmul_nbits_reference(tmp_path / "q.onnx").values()
    assert _rel_err(y, x.astype(np.float64) @ wq) < TIGHT


def test_only_2d_constant_weights_are_quantized(tmp_path: Path) -> None:
    """A weight fed as an input, or 3-D, stays a float MatMul; unnamed nodes are told apart."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    w3 = rng.standard_normal((1, 64, 32)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["y1"]),
        helper.make_node("MatMul", ["x", "b"], ["y2"], name="dynamic"),
        helper.make_node("MatMul", ["x", "W3"], ["y3"]),
    ]
    inputs = [_value("x", 2, 64), _value("b", 64, 32)]
    outputs = [_value("y1", 2, 32), _value("y2", 2, 32), _value("y3", 1, 2, 32)]
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(w3, "W3")]
    src = _save(tmp_path / "f.onnx", nodes, inputs, outputs, inits)
    dst = tmp_path / "q.onnx"
    report = quantize_onnx(src, dst, OnnxQuantOptions(bits=4))
    assert (report.quantized_matmuls, report.skipped) == (1, 2)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    b = rng.standard_normal((64, 32)).astype(np.float32)
    session = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    y1, y2, y3 = session.run(None, {"x": x, "b": b})
    np.testing.assert_allclose(y2, x @ b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y3, (x @ w3[0])[None], rtol=1e-5, atol=1e-5)
    assert list(matmul_nbits_reference(dst)) == ["y1"]
    assert _rel_err(y1, x @ w) < 0.2


@pytest.mark.parametrize("shaped", [True, False])
def test_matmul_inside_a_subgraph_using_an_outer_weight(shaped: bool, tmp_path: Path) -> None:
    """An If branch whose MatMul reads the outer graph's W. Without output shapes onnx's checker
    refuses the model but onnxruntime runs it, so it is quantized all the same."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    shape = (2, 32) if shaped else ()
    then = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["z"], name="inner")], "then", [],
        [_value("z", *shape)],
    )  # fmt: skip
    orelse = helper.make_graph(
        [helper.make_node("Identity", ["zeros"], ["z2"])], "else", [], [_value("z2", *shape)]
    )
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=orelse)]
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    zeros = numpy_helper.from_array(np.zeros((2, 32), np.float32), "zeros")
    inits = [numpy_helper.from_array(w, "W"), zeros]
    src = _save(
        tmp_path / "f.onnx", nodes, [_value("x", 2, 64), cond], [_value("y", *shape)], inits
    )
    dst = tmp_path / "q.onnx"
    report = quantize_onnx(src, dst, OnnxQuantOptions(bits=8, accuracy_level=0))
    assert (report.quantized_matmuls, report.skipped) == (1, 0)
    if shaped:
        onnx.checker.check_model(str(dst))
    x = rng.standard_normal((2, 64)).astype(np.float32)
    session = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    [y] = session.run(None, {"x": x, "c": np.array(True)})
    [wq] = matmul_nbits_reference(dst).values()
    assert _rel_err(y, x.astype(np.float64) @ wq) < TIGHT


def test_not_onnx_is_bad_input_and_writes_nothing(tmp_path: Path) -> None:
    src = tmp_path / "model.onnx"
    src.write_text("this is not an ONNX model\n")
    dst = tmp_path / "out" / "q.onnx"
    with pytest.raises(BadInput, match="not an ONNX model"):
        quantize_onnx(src, dst, OnnxQuantOptions(bits=4))
    assert not dst.exists()
    with pytest.raises(BadInput, match="does not exist"):
        quantize_onnx(tmp_path / "missing.onnx", dst, OnnxQuantOptions(bits=4))
    assert not dst.exists()


def test_nothing_to_quantize_keeps_the_old_destination(tmp_path: Path) -> None:
    nodes = [helper.make_node("MatMul", ["x", "b"], ["y"])]
    src = _save(
        tmp_path / "f.onnx",
        nodes,
        [_value("x", 2, 64), _value("b", 64, 32)],
        [_value("y", 2, 32)],
        [],
    )
    dst = tmp_path / "q.onnx"
    dst.write_bytes(b"old")
    with pytest.raises(BadInput, match="nothing to quantize"):
        quantize_onnx(src, dst, OnnxQuantOptions(bits=4))
    assert dst.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.onnx", "q.onnx"]


def test_a_failed_write_leaves_no_partial_file(
    tmp_path: Path, mlp: tuple[Path, Array, Array], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_disk)
    dst = tmp_path / "q.onnx"
    with pytest.raises(OSError, match="No space"):
        quantize_onnx(mlp[0], dst, OnnxQuantOptions(bits=4))
    assert list(tmp_path.iterdir()) == []


def test_missing_onnx_ir_is_a_clear_error(
    tmp_path: Path, mlp: tuple[Path, Array, Array], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnx_ir", None)
    dst = tmp_path / "q.onnx"
    with pytest.raises(ClawError, match="pip install onnx-ir"):
        quantize_onnx(mlp[0], dst, OnnxQuantOptions(bits=4))
    assert not dst.exists()


@pytest.mark.parametrize("bits", ALL_BITS)
def test_lookup_tables_go_to_4_bits_with_4_and_2_bit_weights(bits: int, tmp_path: Path) -> None:
    """A Gather on a constant table (a text encoder's word embeddings) is quantized to 4-bit
    GatherBlockQuantized for int4/int2 - each looked-up row within half a step of its block's
    range - and left float for int8."""
    rng = np.random.default_rng(5)
    table = rng.standard_normal((64, K)).astype(np.float32)
    w = (rng.standard_normal((K, N)) / math.sqrt(K)).astype(np.float32)
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"])
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["rows"], name="lookup"),
        helper.make_node("MatMul", ["rows", "W"], ["y"], name="mm"),
    ]
    inits = [numpy_helper.from_array(table, "table"), numpy_helper.from_array(w, "W")]
    src = _save(tmp_path / "f.onnx", nodes, [ids], [_value("y", "batch", N), _value("rows")], inits)
    dst = tmp_path / f"q{bits}.onnx"
    report = quantize_onnx(src, dst, OnnxQuantOptions(bits=bits, accuracy_level=0))
    assert report.quantized_matmuls == 1
    assert report.quantized_tables == (1 if bits <= 4 else 0)
    picked = np.array([3, 17, 63, 0], dtype=np.int64)
    session = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    y, rows = session.run(["y", "rows"], {"ids": picked})
    if bits <= 4:
        blocks = table[picked].reshape(len(picked), -1, 32)
        step = (blocks.max(axis=2) - blocks.min(axis=2)) / 15  # uint4: 16 levels per block
        error = np.abs(rows.reshape(blocks.shape) - blocks)
        assert np.all(error <= step[..., None] / 2 + 1e-6)
    else:
        assert np.array_equal(rows, table[picked])
    weights = next(iter(matmul_nbits_reference(dst).values()))
    assert np.allclose(y, rows @ weights, atol=TIGHT * float(np.abs(y).max()))
    without = quantize_onnx(
        src, tmp_path / "mm-only.onnx", OnnxQuantOptions(bits=bits, accuracy_level=0, tables=False)
    )
    assert without.quantized_tables == 0
    if bits <= 4:
        assert report.dst_bytes < without.dst_bytes
