"""An installed GGUF model (llama architecture) to an onnxruntime-genai INT4 (or INT8) directory.

onnxruntime-genai's model builder reads Hugging Face folders, not GGUF, so the path is:

1. *dequantize*: transformers reads the GGUF into float32 and saves a Hugging Face folder
   (config, generation config, tokenizer with its chat template, safetensors);
2. *build*: `python -m onnxruntime_genai.models.builder -p int4 -e cpu` writes the decoder graph
   with MatMulNBits weights, `genai_config.json` and the tokenizer files;
3. *transplant* (Q4_1 GGUFs only): the builder re-quantizes the float32 weights its own way, and
   greedy top-1 agreement with llama.cpp running the same GGUF falls to about 0.61. Q4_1 blocks
   map exactly onto MatMulNBits (scale, integer zero point, and a small per-block remainder
   added back), so the GGUF's own blocks are written into the graph instead, and the Q8_0 tied
   embedding / lm_head as 8-bit blocks: agreement rises to about 0.94. Other GGUF types keep the
   builder's weights (`exact_weights` False). See `_genai_steps` for the arithmetic.

The three steps need torch, transformers, accelerate and onnxruntime-genai (the `convert` extra).
They run in child processes of `python` (by default this interpreter): importing clawctl must
never import torch, a conversion's gigabyte of float32 tensors is returned to the system when the
child exits, and a crash or an OOM kill there ends the child, not the CLI or daemon asking.
Children run offline (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE, a Hugging Face home inside
`work_dir`): everything they read is on disk already, and a conversion must not reach a hub.

2-bit is refused: the builder writes 2-bit weights only for mixture-of-experts layers, never for
dense MatMuls.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clawctl.config import environment
from clawctl.errors import BadInput, EngineError
from clawctl.store.gguf_meta import read_gguf_info

log = logging.getLogger("clawctl.build.convert")

MISSING_TOOLS = (
    "converting to ONNX needs the build tools: pip install 'clawctl[convert]' "
    "(torch CPU, transformers, accelerate, onnxruntime-genai)"
)
# The first four are the `convert` extra; the rest come with clawctl but `python` may be another
# interpreter than the one running clawctl.
TOOL_MODULES = (
    "torch",
    "transformers",
    "accelerate",
    "onnxruntime_genai",
    "onnx",
    "gguf",
    "safetensors",
    "numpy",
)
PRECISIONS = {4: "int4", 8: "int8", 32: "fp32"}  # fp32: for quantizing further ourselves
# The GGUF tensors that become the builder's MatMulNBits layers (blk.N.<name>.weight).
LAYER_MATRICES = frozenset(
    {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}
)
# Only llama's builder graph has been checked node by node against the transplant's name mapping.
TRANSPLANT_ARCHITECTURES = frozenset({"llama"})
STEPS_SCRIPT = Path(__file__).with_name("_genai_steps.py")
REQUIRED_FILES = ("genai_config.json", "model.onnx")


@dataclass(frozen=True)
class GenaiConversion:
    """What a conversion wrote and the shape of the model it wrote."""

    out_dir: Path
    files: tuple[str, ...]  # file names inside out_dir
    parameters: int  # as counted in the GGUF (a tied embedding once)
    context_length: int
    layers: int
    kv_width: int  # n_kv_heads * head_dim: K (and V) floats per token per layer
    exact_weights: bool  # every quantized matrix holds the GGUF's own blocks (transplant applied)
    seconds: float


@dataclass(frozen=True)
class _Plan:
    """Which GGUF weights go back into the graph as they are."""

    layers: bool  # all layer matrices are Q4_1
    head: bool  # ... and the (tied) embedding / lm_head is Q8_0


def convert_gguf_to_genai(
    gguf: Path, out_dir: Path, work_dir: Path, *, bits: int = 4, python: str | None = None
) -> GenaiConversion:
    """Convert `gguf` into an onnxruntime-genai model directory `out_dir` (new or empty).

    `work_dir` is scratch space (about 1.5 times the float32 model, 4 bytes a parameter, while
    converting); its intermediates are deleted on success and kept on failure; each step's output
    stays there as `<step>.log`.
    `python` is the interpreter that has the build tools (default: this one). `out_dir` appears
    only once complete. BadInput for what the caller can fix (bits, paths, missing tools),
    EngineError when a step fails (the message ends with the step's last stderr line).
    """
    started = time.monotonic()
    precision = _precision(bits)
    gguf, out_dir, work_dir = Path(gguf), Path(out_dir), Path(work_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise BadInput(f"{out_dir} already exists and is not an empty directory")
    if not gguf.is_file():
        raise BadInput(f"{gguf} is not a file")
    interpreter = python or sys.executable
    work_dir.mkdir(parents=True, exist_ok=True)
    env = _child_env(work_dir)
    _check_tools(interpreter, env, work_dir)
    info = read_gguf_info(gguf)
    plan = _plan(gguf, info.architecture, bits)

    source, hf_dir = work_dir / "source-gguf", work_dir / "hf-float32"
    built, final = work_dir / "onnx-built", work_dir / "onnx-final"
    for scratch in (source, hf_dir, built, final):
        shutil.rmtree(scratch, ignore_errors=True)
    source.mkdir()
    _link(gguf, source / "model.gguf")

    steps = [interpreter, "-c", STEPS_SCRIPT.read_text(encoding="utf-8")]
    _run(
        "dequantize", [*steps, "dequantize", str(source / "model.gguf"), str(hf_dir)], env, work_dir
    )
    cache = str(work_dir / "builder-cache")
    builder = [interpreter, "-m", "onnxruntime_genai.models.builder", "-c", cache, "-e", "cpu"]
    _run("build", [*builder, "-i", str(hf_dir), "-o", str(built), "-p", precision], env, work_dir)
    _require_files(built, "build")
    if plan.layers:
        head = ["--head"] if plan.head else []
        transplant = [*steps, "transplant", str(hf_dir), str(built), str(final), *head]
        _run("transplant", transplant, env, work_dir)
        _require_files(final, "transplant")
    else:
        built.rename(final)
    context_length, layers, kv_width = _shape(final, hf_dir)
    for path in final.iterdir():
        path.chmod(0o644)  # the builder writes some files 0600; the daemon may run as another user
    final.chmod(0o755)
    _publish(final, out_dir)
    for scratch in (source, hf_dir, built, work_dir / "builder-cache", work_dir / "hf-home"):
        shutil.rmtree(scratch, ignore_errors=True)
    return GenaiConversion(
        out_dir=out_dir,
        files=tuple(sorted(p.name for p in out_dir.iterdir() if p.is_file())),
        parameters=info.n_params,
        context_length=context_length,
        layers=layers,
        kv_width=kv_width,
        exact_weights=plan.layers and plan.head,
        seconds=time.monotonic() - started,
    )


def _precision(bits: int) -> str:
    if bits == 2:
        raise BadInput(
            "2-bit ONNX is not possible: onnxruntime-genai's builder writes 2-bit weights only for "
            "mixture-of-experts layers, not dense ones; use bits=4"
        )
    if bits not in PRECISIONS:
        raise BadInput(f"bits must be 4, 8 or 32 for an ONNX conversion, not {bits}")
    return PRECISIONS[bits]


def _child_env(work_dir: Path) -> dict[str, str]:
    env = dict(environment())
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(work_dir / "hf-home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def _check_tools(python: str, env: dict[str, str], cwd: Path) -> None:
    """BadInput unless `python` has the build tools.

    Asked of `python` in a subprocess (this process must never import torch), and by finding the
    modules rather than importing them: importing torch and transformers takes 5-10 s on an edge
    box, and an install that is present but broken still fails, with its own error, in the
    first step.
    """
    code = (
        "import importlib.util, sys\n"
        f"missing = [m for m in {TOOL_MODULES!r} if importlib.util.find_spec(m) is None]\n"
        "print(' '.join(missing))\n"
        "sys.exit(3 if missing else 0)\n"
    )
    try:
        done = subprocess.run(
            [python, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, check=False
        )
    except OSError as exc:
        raise BadInput(f"cannot run {python} to convert to ONNX: {exc.strerror}") from None
    if done.returncode == 3:
        raise BadInput(MISSING_TOOLS)
    if done.returncode != 0:
        raise EngineError(
            f"{python} could not look for the ONNX build tools: {_last_line(done.stderr)}"
        )


def _plan(gguf: Path, architecture: str, bits: int) -> _Plan:
    """Transplant only what maps exactly: Q4_1 layer matrices into 4-bit MatMulNBits (with a
    Q8_0 embedding / lm_head as 8-bit blocks), and only in a graph layout known to map."""
    if bits != 4 or architecture not in TRANSPLANT_ARCHITECTURES:
        return _Plan(layers=False, head=False)
    from gguf import GGUFReader  # read_gguf_info has validated the file and taught gguf new types

    types = {t.name: t.tensor_type.name for t in GGUFReader(gguf).tensors}
    layer_types = {
        kind
        for name, kind in types.items()
        if name.startswith("blk.") and name.split(".")[2] in LAYER_MATRICES
    }
    layers = layer_types == {"Q4_1"}
    head = types.get("output.weight", types.get("token_embd.weight")) == "Q8_0"
    return _Plan(layers=layers, head=layers and head)


def _link(target: Path, link: Path) -> None:
    """Give the GGUF a directory of its own (transformers loads a directory + file name)."""
    try:
        link.symlink_to(target.resolve())
    except OSError:
        shutil.copyfile(target, link)


def _run(step: str, command: list[str], env: dict[str, str], cwd: Path) -> str:
    """Run one step; its output goes to `<work_dir>/<step>.log`. Returns stdout."""
    began = time.monotonic()
    log_path = cwd / f"{step}.log"
    try:
        done = subprocess.run(
            command, env=env, cwd=cwd, capture_output=True, text=True, errors="replace", check=False
        )
    except OSError as exc:
        raise EngineError(f"ONNX conversion step {step} could not start: {exc.strerror}") from None
    log_path.write_text(done.stdout + "\n--- stderr ---\n" + done.stderr, encoding="utf-8")
    if done.returncode != 0:
        raise EngineError(
            f"ONNX conversion step {step} failed (exit {done.returncode}, log {log_path}): "
            f"{_last_line(done.stderr)}"
        )
    log.info("genai conversion: %s took %.1f s", step, time.monotonic() - began)
    return done.stdout


def _publish(final: Path, out_dir: Path) -> None:
    """Move the finished directory to `out_dir` so that `out_dir` never holds part of a model:
    across file systems it is first copied next to `out_dir`, then renamed in one step."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.move(str(final), str(staging))
    if out_dir.exists():
        out_dir.rmdir()  # checked empty at the start
    staging.rename(out_dir)


def _require_files(directory: Path, step: str) -> None:
    missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
    if missing:
        raise EngineError(f"ONNX conversion step {step} wrote no {', '.join(missing)}")


def _shape(model_dir: Path, hf_dir: Path) -> tuple[int, int, int]:
    """(context length, layers, kv width) from genai_config.json, else the Hugging Face config."""
    genai: dict[str, Any] = json.loads((model_dir / "genai_config.json").read_text("utf-8"))
    model = genai.get("model", {})
    decoder = model.get("decoder", {})
    hf: dict[str, Any] = {}
    if (hf_dir / "config.json").is_file():
        hf = json.loads((hf_dir / "config.json").read_text("utf-8"))
    heads = hf.get("num_attention_heads") or 1
    context = model.get("context_length") or hf.get("max_position_embeddings")
    layers = decoder.get("num_hidden_layers") or hf.get("num_hidden_layers")
    kv_heads = decoder.get("num_key_value_heads") or hf.get("num_key_value_heads") or heads
    head_dim = (
        decoder.get("head_size") or hf.get("head_dim") or (hf.get("hidden_size") or 0) // heads
    )
    if not (context and layers and kv_heads and head_dim):
        raise EngineError(f"{model_dir / 'genai_config.json'} lacks the model's shape")
    return int(context), int(layers), int(kv_heads) * int(head_dim)
