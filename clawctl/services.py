"""Everything a running clawd serves requests with, built once and injected into the API."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from clawctl import __version__
from clawctl.config import DaemonConfig
from clawctl.engines.base import LoadEngine
from clawctl.engines.registry import LazyLoader
from clawctl.metrics import Metrics
from clawctl.profiles import EdgeProfile, load_profile
from clawctl.scheduler import ModelManager
from clawctl.schemas.admin import Health
from clawctl.store.models import ModelStore


@dataclass
class Services:
    config: DaemonConfig
    profile: EdgeProfile
    store: ModelStore
    manager: ModelManager
    metrics: Metrics
    started_at: float = field(default_factory=time.time)

    @classmethod
    def build(cls, config: DaemonConfig, load_engine: LoadEngine | None = None) -> Services:
        load_engine = load_engine or LazyLoader("gguf")
        profile = load_profile(config.paths, config.profile)
        store = ModelStore(config.paths)
        manager = ModelManager(
            store, profile, load_engine, config.keep_alive_seconds, config.max_queue
        )
        return cls(config, profile, store, manager, Metrics.create())

    def health(self) -> Health:
        loaded = self.manager.loaded()
        self.metrics.loaded_models.set(len(loaded))
        return Health(
            status="ok",
            version=__version__,
            pid=os.getpid(),
            uptime_seconds=time.time() - self.started_at,
            profile=self.profile.name,
            socket=str(self.config.socket_path),
            default_model=self.config.default_model,
            memory_budget_bytes=self.manager.budget_bytes,
            loaded=loaded,
        )
