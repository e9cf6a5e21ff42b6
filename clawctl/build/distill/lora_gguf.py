"""A PEFT LoRA written as a GGUF adapter llama.cpp loads, with the `gguf` package.

Why not llama.cpp's `convert_lora_to_gguf.py`: it wants the base model as a Hugging Face folder
and imports llama.cpp's own copy of gguf-py; for the two layouts we train (llama, qwen2) the
mapping is a table and one permutation, written here and proved by `proof.py` on every adapter.

What llama.cpp expects (its `llama_adapter_lora_init` and the converter):
- `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha` (llama.cpp scales by
  alpha / rank, as PEFT does), the base's `general.architecture`;
- for each adapted weight `blk.N.attn_q.weight`, `…weight.lora_a` holding A (rank x n_in) and
  `…weight.lora_b` holding B (n_out x rank), as the numpy arrays are (gguf reverses dimensions);
- for the llama architecture, llama.cpp's converter permuted the rows of Q and K (rotary pairs
  interleaved per head; transformers undoes it when it reads a GGUF), so the rows of B for Q and
  K are permuted the same way; A, whose rows are the rank, is not.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from clawctl.errors import BadInput
from clawctl.fsutil import fsync_dir
from clawctl.schemas.distill import DISTILL_ARCHITECTURES

# transformers module name -> llama.cpp tensor name
TENSOR_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# True: Q/K rows permuted by llama.cpp's converter (the architectures are DISTILL_ARCHITECTURES)
ARCHITECTURES = {"llama": True, "qwen2": False}
assert tuple(ARCHITECTURES) == DISTILL_ARCHITECTURES
_PEFT_NAME = re.compile(r"layers\.(\d+)\.(\w+\.\w+)\.lora_([AB])\.weight$")


def check_architecture(architecture: str) -> None:
    if architecture not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise BadInput(
            f"distill trains adapters for the {known} architectures; this base is {architecture!r}"
        )


def permute_rows(rows: Any, n_head: int) -> Any:
    """llama.cpp's `LlamaModel.permute` on the first axis (heads' rotary halves interleaved)."""
    shape = rows.shape
    return (
        rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
    )


def write_lora_gguf(
    state: dict[str, Any],
    out: Path,
    *,
    architecture: str,
    alpha: float,
    n_head: int,
    n_kv_head: int,
    name: str,
) -> list[str]:
    """Write PEFT's `state` (its adapter state dict, torch tensors) as a GGUF LoRA at `out`
    (atomically); returns the llama.cpp tensor names adapted."""
    import gguf
    import numpy as np

    check_architecture(architecture)
    permuted = ARCHITECTURES[architecture]
    pairs: dict[str, dict[str, Any]] = {}
    for key, tensor in state.items():
        match = _PEFT_NAME.search(key)
        if match is None or match.group(2) not in TENSOR_NAMES:
            raise BadInput(f"the adapter holds {key}, which has no llama.cpp tensor")
        layer, module, side = match.groups()
        target = f"blk.{layer}.{TENSOR_NAMES[module]}.weight"
        array = tensor.detach().to("cpu").float().numpy()
        if side == "B" and permuted and module == "self_attn.q_proj":
            array = permute_rows(array, n_head)
        elif side == "B" and permuted and module == "self_attn.k_proj":
            array = permute_rows(array, n_kv_head)
        pairs.setdefault(target, {})[side] = np.ascontiguousarray(array, dtype=np.float32)
    scratch = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(path=scratch, arch=architecture)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    writer.add_name(name)
    for target in sorted(pairs, key=_tensor_order):
        pair = pairs[target]
        if set(pair) != {"A", "B"}:
            raise BadInput(f"the adapter lacks half of the pair for {target}")
        writer.add_tensor(f"{target}.lora_a", pair["A"])
        writer.add_tensor(f"{target}.lora_b", pair["B"])
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with scratch.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(scratch, out)
        fsync_dir(out.parent)
    finally:
        scratch.unlink(missing_ok=True)
    return sorted(pairs, key=_tensor_order)


def _tensor_order(name: str) -> tuple[int, str]:
    return int(name.split(".")[1]), name
