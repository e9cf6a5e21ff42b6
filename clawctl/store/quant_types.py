"""GGUF quantization types: llama.cpp's file-type numbers, their names and what they need.

One table serves both directions: naming a model file's `general.file_type`, and choosing the
ftype for `clawctl models quantize --to TYPE`. The numbers are llama.cpp's `llama_ftype`.
"""

from __future__ import annotations

from dataclasses import dataclass

from clawctl.errors import BadInput


@dataclass(frozen=True)
class QuantType:
    name: str
    ftype: int
    bits: int
    needs_imatrix: bool = False


QUANT_TYPES: tuple[QuantType, ...] = (
    QuantType("f32", 0, 32),
    QuantType("f16", 1, 16),
    QuantType("q4_0", 2, 4),
    QuantType("q4_1", 3, 4),
    QuantType("q8_0", 7, 8),
    QuantType("q5_0", 8, 5),
    QuantType("q5_1", 9, 5),
    QuantType("q2_k", 10, 2),
    QuantType("q3_k_s", 11, 3),
    QuantType("q3_k_m", 12, 3),
    QuantType("q3_k_l", 13, 3),
    QuantType("q4_k_s", 14, 4),
    QuantType("q4_k_m", 15, 4),
    QuantType("q5_k_s", 16, 5),
    QuantType("q5_k_m", 17, 5),
    QuantType("q6_k", 18, 6),
    QuantType("iq2_xxs", 19, 2, needs_imatrix=True),
    QuantType("iq2_xs", 20, 2, needs_imatrix=True),
    QuantType("q2_k_s", 21, 2, needs_imatrix=True),
    QuantType("iq3_xs", 22, 3),
    QuantType("iq3_xxs", 23, 3),
    QuantType("iq1_s", 24, 1, needs_imatrix=True),
    QuantType("iq4_nl", 25, 4),
    QuantType("iq3_s", 26, 3),
    QuantType("iq3_m", 27, 3),
    QuantType("iq2_s", 28, 2, needs_imatrix=True),
    QuantType("iq2_m", 29, 2, needs_imatrix=True),
    QuantType("iq4_xs", 30, 4),
    QuantType("iq1_m", 31, 1, needs_imatrix=True),
    QuantType("bf16", 32, 16),
    QuantType("tq1_0", 36, 1),
    QuantType("tq2_0", 37, 2),
    QuantType("q2_0", 41, 2),
)

_BY_NAME = {q.name: q for q in QUANT_TYPES}
_BY_FTYPE = {q.ftype: q for q in QUANT_TYPES}
INT4 = ("q4_0", "q4_1", "q4_k_s", "q4_k_m", "iq4_nl", "iq4_xs")
INT2 = ("q2_0", "q2_k", "q2_k_s", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "tq2_0")


def quant_by_name(name: str) -> QuantType:
    key = name.lower()
    if key not in _BY_NAME:
        raise BadInput(
            f"unknown quantization type {name!r}; INT4: {', '.join(INT4)}; INT2: {', '.join(INT2)}",
            param="to",
        )
    return _BY_NAME[key]


def quant_name_for_ftype(ftype: int | None) -> str:
    if ftype is None:
        return "unknown"
    known = _BY_FTYPE.get(ftype & 0x3FF)  # llama.cpp sets bit 10 for "guessed"
    return known.name.upper() if known else f"ftype-{ftype}"
