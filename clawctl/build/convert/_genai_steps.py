"""The heavy steps of `gguf_onnx`, run as a script in a child interpreter.

`gguf_onnx.convert_gguf_to_genai` passes this file's source to `python -c` and never imports it:
torch and transformers take seconds and hundreds of MB to import, and a crash inside them (or
the OOM killer) must end the child, not the daemon or CLI that asked for a conversion. Running the
text with `-c` rather than the file by path keeps this package's directory off the child's
`sys.path`, and it lets the build tools live in another interpreter than the one running clawctl,
so this file imports nothing from clawctl, only the standard library, numpy, onnx and
safetensors, plus torch and transformers through `importlib` (they are optional, and the
type-checked environment may not have them).

Two steps:

* `dequantize GGUF HF_DIR`: transformers reads the GGUF into float32 and saves a plain Hugging
  Face folder, the only input the onnxruntime-genai model builder takes.
* `transplant HF_DIR SRC DST [--head]`: the builder re-quantizes those float32 weights to int4 its
  own way (symmetric, no zero point), which loses much of what the GGUF's Q4_1 quantization got
  right; greedy top-1 agreement with llama.cpp on the same GGUF drops to about 0.61. But every
  Q4_1 block dequantizes to exactly `d * q + m` with q in 0..15, so the float32 weights still hold
  the GGUF's own blocks and the graph can be given them back: MatMulNBits computes
  `scale * (q - zero_point)`, so scale = d, zero_point = round(-m / d), and the remainder
  `r = m + zero_point * d` of each block is added as `blocksum(x) @ R^T`. The Q8_0 tied
  embedding / lm_head becomes an exact 8-bit MatMulNBits (and 8-bit GatherBlockQuantized). The
  result agrees with llama.cpp on about 0.94 of greedy tokens. Each block is checked to lie on
  its integer grid before it is written; a matrix that does not is an error, not a silent
  approximation.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    import onnx

    FloatArray = npt.NDArray[np.float64]

BLOCK = 32  # Q4_1 / Q8_0 block length, and the builder's default int4 block size
# A block is "on its grid" when every value is within this fraction of its step d of d*q+m.
GRID_TOLERANCE = 1e-3
LAYER_NODE = re.compile(r"^/model/layers\.(\d+)/(attn|mlp)/(\w+)/MatMul")
HEAD_NODE = re.compile(r"^/lm_head/MatMul")


def dequantize(gguf: Path, hf_dir: Path) -> dict[str, Any]:
    """GGUF -> float32 Hugging Face folder (config, generation config, tokenizer, safetensors).

    The model transformers loads from a GGUF remembers it came from one (`quantization_config`),
    and `save_pretrained` refuses to write such a model; so the config is cleaned and the weights
    are moved into a freshly built model of the same class, with the embedding re-tied.
    """
    torch = importlib.import_module("torch")
    transformers = importlib.import_module("transformers")
    source, name = str(gguf.parent), gguf.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, gguf_file=name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        source, gguf_file=name, dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    eos = config.eos_token_id
    pad = config.pad_token_id if config.pad_token_id is not None else eos
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=eos, pad_token_id=pad
    )
    model.save_pretrained(str(hf_dir))
    tokenizer.save_pretrained(str(hf_dir))
    return {"architecture": type(model).__name__, "tied": bool(config.tie_word_embeddings)}


def q4_1_blocks(w: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray, float]:
    """Split [N, K] weights that are exactly `d * q + m` per block into (q, d, m, max error/d).

    Q4_1 quantizes a block's minimum to q = 0 and its maximum to q = 15, so min and max give m
    and d back (d in float32 is the GGUF's float16 d, exactly).
    """
    import numpy as np

    n, k = w.shape
    blocks = w.astype(np.float64).reshape(n, k // BLOCK, BLOCK)
    low, high = blocks.min(-1), blocks.max(-1)
    d = (high - low) / 15.0
    safe = np.where(d == 0, 1.0, d)
    q = np.clip(np.rint((blocks - low[..., None]) / safe[..., None]), 0, 15)
    error = np.abs(d[..., None] * q + low[..., None] - blocks).max(-1) / safe
    return q, d, low, float(error.max())


def q8_0_blocks(w: FloatArray) -> tuple[FloatArray, FloatArray, float]:
    """Split [N, K] weights that are exactly `d * q` per block (q in -127..127) into (q, d, err)."""
    import numpy as np

    n, k = w.shape
    blocks = w.astype(np.float64).reshape(n, k // BLOCK, BLOCK)
    d = np.abs(blocks).max(-1) / 127.0
    safe = np.where(d == 0, 1.0, d)
    q = np.clip(np.rint(blocks / safe[..., None]), -127, 127)
    error = np.abs(d[..., None] * q - blocks).max(-1) / safe
    return q, d, float(error.max())


class _Graph:
    """The decoder graph being rewritten: its nodes in order and its initializers by name."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.nodes: list[onnx.NodeProto] = list(model.graph.node)
        self.inits = {t.name: t for t in model.graph.initializer}

    def set(self, name: str, array: Any) -> None:
        from onnx import numpy_helper

        tensor = numpy_helper.from_array(array, name)
        if name in self.inits:
            self.inits[name].CopyFrom(tensor)
        else:
            self.model.graph.initializer.append(tensor)
            self.inits[name] = self.model.graph.initializer[-1]

    def finish(self) -> None:
        """Write the node list back and drop initializers nothing reads any more."""
        graph = self.model.graph
        del graph.node[:]
        graph.node.extend(self.nodes)
        used = {name for node in graph.node for name in node.input}
        keep = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(keep)


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _set_int_attribute(node: onnx.NodeProto, name: str, value: int) -> None:
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            attribute.i = value
            return
    node.attribute.append(helper.make_attribute(name, value))


def _layer_weight(weights: dict[str, Any], layer: str, block: str, proj: str) -> Any:
    import numpy as np

    module = "self_attn" if block == "attn" else "mlp"
    prefix = f"model.layers.{layer}.{module}"
    if proj == "qkv_proj":  # the builder packs q, k and v into one MatMul, in that order
        return np.concatenate([weights[f"{prefix}.{x}_proj.weight"] for x in "qkv"], axis=0)
    return weights[f"{prefix}.{proj}.weight"]


def _pack_nibbles(values: Any) -> Any:
    """Pack 4-bit values pairwise along the last axis, first of a pair in the low nibble."""
    import numpy as np

    values = values.astype(np.uint8)
    if values.shape[-1] % 2:
        pad = np.zeros((*values.shape[:-1], 1), np.uint8)
        values = np.concatenate([values, pad], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def transplant(hf_dir: Path, src: Path, dst: Path, *, head: bool) -> dict[str, Any]:
    """Write SRC's graph to DST with the GGUF's Q4_1 layer blocks (and, with `head`, its Q8_0
    tied embedding / lm_head) in place of the builder's int4 weights; copy SRC's other files."""
    import numpy as np
    import onnx
    from onnx import helper
    from safetensors.numpy import load_file

    weights = load_file(hf_dir / "model.safetensors")  # float32; each matrix widened on its own
    graph = _Graph(onnx.load(str(src / "model.onnx")))
    blocksum_of: dict[str, str] = {}
    nodes: list[onnx.NodeProto] = []
    layers = heads = 0
    worst = 0.0
    head_q8: tuple[str, int, int] | None = None
    for node in graph.nodes:
        nodes.append(node)
        if node.op_type != "MatMulNBits":
            continue
        attrs = _attributes(node)
        if attrs.get("block_size") != BLOCK or attrs.get("bits") != 4 or len(node.input) != 3:
            raise RuntimeError(f"unexpected MatMulNBits {node.name}: {attrs}, {len(node.input)} in")
        b_name, s_name = node.input[1], node.input[2]
        if HEAD_NODE.match(node.name):
            if not head:
                continue
            embedding = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
            q8, d8, error = q8_0_blocks(embedding)
            if error > GRID_TOLERANCE:
                raise RuntimeError(f"lm_head is not Q8_0 blocks (off grid by {error:.3g} d)")
            worst = max(worst, error)
            graph.set(b_name, (q8 + 128).astype(np.uint8))  # 8-bit default zero point is 128
            graph.set(s_name, d8.astype(np.float32))
            _set_int_attribute(node, "bits", 8)
            head_q8 = (b_name, *embedding.shape)
            heads += 1
            continue
        match = LAYER_NODE.match(node.name)
        if match is None:
            raise RuntimeError(f"no GGUF weight known for MatMulNBits node {node.name}")
        w = _layer_weight(weights, *match.groups())
        q, d, low, error = q4_1_blocks(w)
        if error > GRID_TOLERANCE:
            raise RuntimeError(f"{node.name} is not Q4_1 blocks (off grid by {error:.3g} d)")
        worst = max(worst, error)
        n, k = w.shape
        zero = np.clip(np.rint(-low / np.where(d == 0, 1.0, d)), 0, 15)
        rest = low + zero * d  # what the integer zero point leaves of m, per block
        zp_name = b_name.replace("weight_Q4", "weight_zp")
        off_name = b_name.replace("weight_Q4", "weight_offset_t")
        graph.set(b_name, _pack_nibbles(q))
        graph.set(s_name, d.astype(np.float32))
        graph.set(zp_name, _pack_nibbles(zero))
        graph.set(off_name, np.ascontiguousarray(rest.T).astype(np.float32))  # [K/32, N]
        node.input.append(zp_name)
        x = node.input[0]
        if x not in blocksum_of:  # q/k/v and gate/up read the same x: sum its blocks once
            base = node.name.rsplit("/", 1)[0] + "/q41_blocksum"
            graph.set(base + "/shape", np.array([0, 0, k // BLOCK, BLOCK], np.int64))
            graph.set(base + "/axes", np.array([-1], np.int64))
            nodes.insert(
                len(nodes) - 1,
                helper.make_node(
                    "Reshape", [x, base + "/shape"], [base + "/blocks"], name=base + "/Reshape"
                ),
            )
            nodes.insert(
                len(nodes) - 1,
                helper.make_node(
                    "ReduceSum",
                    [base + "/blocks", base + "/axes"],
                    [base + "/output_0"],
                    name=base + "/ReduceSum",
                    keepdims=0,
                ),
            )
            blocksum_of[x] = base + "/output_0"
        y = node.output[0]
        node.output[0] = y + "_q41_main"
        nodes.append(
            helper.make_node(
                "MatMul", [blocksum_of[x], off_name], [y + "_q41_rest"], name=node.name + "_rest"
            )
        )
        nodes.append(
            helper.make_node(
                "Add", [y + "_q41_main", y + "_q41_rest"], [y], name=node.name + "_add"
            )
        )
        layers += 1
    if head_q8 is not None:  # a shared embedding reads lm_head's blocks: make it 8-bit too
        name, n, k = head_q8
        for node in nodes:
            if node.op_type != "GatherBlockQuantized":
                continue
            reshape = next((r for r in nodes if r.output[0] == node.input[0]), None)
            if reshape is None or reshape.op_type != "Reshape" or reshape.input[0] != name:
                continue
            shape = reshape.input[1] + "_q8"
            graph.set(shape, np.array([n, k], np.int64))
            reshape.input[1] = shape
            _set_int_attribute(node, "bits", 8)
    graph.nodes = nodes
    graph.finish()
    dst.mkdir(parents=True, exist_ok=True)
    onnx.save(
        graph.model,
        str(dst / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=1024,
    )
    for path in src.iterdir():
        if path.is_file() and not path.name.startswith("model.onnx"):
            shutil.copyfile(path, dst / path.name)
    return {"layer_matmuls": layers, "head_matmuls": heads, "max_grid_error": worst}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="clawctl-genai-steps")
    steps = parser.add_subparsers(dest="step", required=True)
    step = steps.add_parser("dequantize")
    step.add_argument("gguf", type=Path)
    step.add_argument("hf_dir", type=Path)
    step = steps.add_parser("transplant")
    step.add_argument("hf_dir", type=Path)
    step.add_argument("src", type=Path)
    step.add_argument("dst", type=Path)
    step.add_argument("--head", action="store_true", help="also the Q8_0 embedding / lm_head")
    args = parser.parse_args(argv)
    if args.step == "dequantize":
        report = dequantize(args.gguf, args.hf_dir)
    else:
        report = transplant(args.hf_dir, args.src, args.dst, head=args.head)
    print(json.dumps(report))  # the last stdout line is the step's report


if __name__ == "__main__":
    main()
