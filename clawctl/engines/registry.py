"""Engines by name, as import strings resolved on first use.

clawd starts without importing llama_cpp or numpy (idle memory and start-up time matter on a
Pi); the engine module is imported only when the first model loads.
"""

from __future__ import annotations

import importlib
from typing import cast

from clawctl.engines.base import Engine, EngineSettings, LoadEngine

ENGINES = {"gguf": "clawctl.engines.llama:load_llama_engine"}


def resolve(name: str) -> LoadEngine:
    module_name, _, attribute = ENGINES[name].partition(":")
    return cast(LoadEngine, getattr(importlib.import_module(module_name), attribute))


class LazyLoader:
    """A `LoadEngine` that imports its engine module on the first load."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._load: LoadEngine | None = None

    def __call__(self, settings: EngineSettings) -> Engine:
        if self._load is None:
            self._load = resolve(self.name)
        return self._load(settings)
