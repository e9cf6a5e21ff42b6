"""The only parser and validator of model names.

Names become file names in the store, so they are restricted to a safe alphabet: no path
separators, no leading dot, no traversal.
"""

from __future__ import annotations

import re

from clawctl.errors import BadInput

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,79}$")


def validate_model_name(name: str) -> str:
    if not _NAME.fullmatch(name) or ".." in name:
        raise BadInput(
            f"invalid model name {name!r}: use 1-80 lowercase letters, digits, '.', '_' or '-',"
            " starting with a letter or digit",
            param="model",
        )
    return name


def name_from_filename(filename: str) -> str:
    """Turn 'SmolLM2-135M-Instruct.Q4_1.gguf' into 'smollm2-135m-instruct.q4_1'."""
    stem = filename.rsplit("/", 1)[-1]
    if stem.lower().endswith(".gguf"):
        stem = stem[: -len(".gguf")]
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-.") or "model"
    return validate_model_name(cleaned[:80])
