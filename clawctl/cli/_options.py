"""Options shared by several commands, declared once."""

from __future__ import annotations

import re
from typing import Annotated

import typer

from clawctl.errors import BadInput

JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
ModelOption = Annotated[
    str | None, typer.Option("--model", "-m", help="Model name (default: the daemon's default).")
]

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise BadInput(f"invalid duration {text!r}: use e.g. 90s, 30m, 12h, 7d, 2w")
    return float(match.group(1)) * _UNIT[match.group(2)]


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)b?", text.strip().lower())
    if not match:
        raise BadInput(f"invalid size {text!r}: use e.g. 500MB, 2GB")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[match.group(2)]
    return int(float(match.group(1)) * scale)
