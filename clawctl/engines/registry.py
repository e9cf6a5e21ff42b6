"""Engines by name, as import strings resolved on first use.

clawd starts without importing llama_cpp or numpy (idle memory and start-up time matter on a
Pi); the engine module is imported only when the first model loads.
"""

from __future__ import annotations

import importlib
from typing import cast

from clawctl.engines.base import Engine, EngineSettings, LoadEngine
from clawctl.errors import BadInput

ENGINES = {
    "gguf": "clawctl.engines.llama.engine:load_llama_engine",
    "onnx": "clawctl.engines.onnx.genai:load_genai_engine",
}


def resolve(name: str) -> LoadEngine:
    module_name, _, attribute = ENGINES[name].partition(":")
    return cast(LoadEngine, getattr(importlib.import_module(module_name), attribute))


class LazyLoader:
    """A `LoadEngine` that imports the engine module for a model's format on its first load."""

    def __init__(self) -> None:
        self._loads: dict[str, LoadEngine] = {}

    def __call__(self, settings: EngineSettings) -> Engine:
        load = self._loads.get(settings.format)
        if load is None:
            if settings.format not in ENGINES:
                raise BadInput(f"no engine runs {settings.format!r} models")
            load = self._loads[settings.format] = resolve(settings.format)
        return load(settings)
