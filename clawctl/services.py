"""Everything a running clawd serves requests with, built once and injected into the API."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from clawctl import __version__
from clawctl.config import DaemonConfig, environment
from clawctl.engines.base import AdapterSpec, LoadEngine
from clawctl.engines.registry import LazyLoader
from clawctl.errors import BadInput, ClawError
from clawctl.fleet.bucket import Bucket
from clawctl.fleet.ledger_shipper import LedgerShipper
from clawctl.fleet.store import FleetStore
from clawctl.fleet.uploader import FleetUploader
from clawctl.ledger import Ledger
from clawctl.metrics import Metrics
from clawctl.profiles import EdgeProfile, load_profile
from clawctl.routing.adjust import ThresholdAdjuster
from clawctl.routing.audit import AuditSampler
from clawctl.routing.policy_store import PolicyStore
from clawctl.routing.remote import RemoteTier
from clawctl.runtime.answer_cache import AnswerCache
from clawctl.runtime.anticipation import Anticipator
from clawctl.runtime.embeddings import EmbeddingService
from clawctl.runtime.manager import ModelManager
from clawctl.runtime.statekeeper import SnapshotWriter, StateKeeper
from clawctl.schemas.admin import CacheStatus, Health
from clawctl.schemas.openai import AdapterChoice
from clawctl.schemas.policy import Tier
from clawctl.store.adapters import AdapterStore
from clawctl.store.models import ModelStore
from clawctl.store.snapshots import SnapshotStore


def box_name(config: DaemonConfig) -> str:
    """This box's name in the fleet (store pointers, ledger rows): `[fleet] box_id`, else the
    host name."""
    return config.fleet.box_id or socket.gethostname()


@dataclass
class Services:
    config: DaemonConfig
    profile: EdgeProfile
    store: ModelStore
    manager: ModelManager
    metrics: Metrics
    snapshots: SnapshotStore
    writer: SnapshotWriter
    adapters: AdapterStore
    ledger: Ledger
    policies: PolicyStore
    answers: AnswerCache
    embeddings: EmbeddingService
    started_at: float = field(default_factory=time.time)
    fleet: FleetStore | None = None
    uploader: FleetUploader | None = None
    shipper: LedgerShipper | None = None
    audits: AuditSampler = field(default_factory=AuditSampler)
    adjuster: ThresholdAdjuster = field(default_factory=ThresholdAdjuster)
    anticipator: Anticipator | None = None  # `[snapshots] anticipate`
    # Work started after a response (audits): finished or cancelled when clawd stops.
    background: set[asyncio.Task[None]] = field(default_factory=set)
    _remotes: dict[str, RemoteTier] = field(default_factory=dict)
    # An httpx async transport for remote tiers (tests: an in-process ASGI app); None: network.
    remote_transport: Any = None

    @classmethod
    def build(cls, config: DaemonConfig, load_engine: LoadEngine | None = None) -> Services:
        load_engine = load_engine or LazyLoader()
        profile = load_profile(config.paths, config.profile)
        store = ModelStore(config.paths)
        snap = config.snapshots
        budget_mb = snap.budget_mb or profile.snapshot_budget_mb
        snapshots = SnapshotStore(config.paths, budget_mb * (1 << 20), snap.block_tokens)
        snapshots.sweep_temps()
        writer = SnapshotWriter(snapshots, "shuffle2" if profile.kv_cache_type == "f16" else "none")
        fleet, uploader = cls._fleet(config, snapshots)
        if uploader is not None:
            sessions, submit = config.fleet.sessions, uploader.submit
            writer.on_written = lambda kind, path: (
                submit(kind, path) if kind != "session" or sessions else None
            )
        keeper = StateKeeper(snapshots, writer, snap.pool, snap.pool_min_tokens, fleet)
        manager = ModelManager(
            store,
            profile,
            load_engine,
            config.keep_alive_seconds,
            config.max_queue,
            keeper,
            config.drafts,
        )
        adapters = AdapterStore(store)
        ledger = Ledger(config.paths.ledger_file)
        ledger.prune(config.ledger.retention_days)
        shipper = None
        if config.fleet_ledger_dsn is not None:
            section = config.fleet
            shipper = LedgerShipper(
                config.paths.ledger_file, config.fleet_ledger_dsn, box_name(config),
                section.ledger_batch, section.ledger_interval_seconds,
            )  # fmt: skip
            ledger.on_recorded = shipper.nudge
        cache = config.cache
        return cls(
            config,
            profile,
            store,
            manager,
            Metrics.create(),
            snapshots,
            writer,
            adapters,
            ledger,
            PolicyStore(config.paths),
            AnswerCache(cache.max_entries, cache.max_mb << 20, cache.ttl_seconds),
            EmbeddingService(store, threads=profile.effective_threads()),
            fleet=fleet,
            uploader=uploader,
            shipper=shipper,
            anticipator=Anticipator() if snap.anticipate else None,
        )

    @staticmethod
    def _fleet(
        config: DaemonConfig, snapshots: SnapshotStore
    ) -> tuple[FleetStore | None, FleetUploader | None]:
        """The fleet store and its uploader when `[fleet] endpoint` is set (nothing is
        contacted here: an unreachable fleet never keeps clawd from starting)."""
        section = config.fleet
        if not section.endpoint:
            return None, None
        bucket = Bucket(section.endpoint, section.bucket, section.region, config.fleet_credentials)
        fleet = FleetStore(bucket, section, box_name(config), snapshots)
        if not section.upload:
            return fleet, None
        outbox = config.paths.data_dir / "fleet" / "outbox"
        return fleet, FleetUploader(fleet, outbox, section.upload_queue)

    def remote(self, tier: Tier) -> RemoteTier:
        """The client of a remote tier, kept across requests (its circuit breaker with it)."""
        key = tier.model_dump_json()  # the same settings share a client and its breaker
        client = self._remotes.get(key)
        if client is None:
            client = self._remotes[key] = RemoteTier(tier, environment(), self.remote_transport)
        return client

    async def stop(self) -> None:
        """Finish generations, then the snapshot writes they queued."""
        for task in list(self.background):  # an audit is worth nothing half done
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        await self.manager.stop(self.config.graceful_timeout_seconds)
        self.writer.stop()
        if self.uploader is not None:
            self.uploader.stop()  # what it has not sent stays in its outbox for the next start
        if self.shipper is not None:
            self.shipper.stop()  # Postgres knows where it got to: the next start resumes there
        self.embeddings.close()
        self.ledger.close()
        for remote in self._remotes.values():
            await remote.aclose()

    def adapter_specs(self, model: str, choices: list[AdapterChoice]) -> tuple[AdapterSpec, ...]:
        """Resolve a request's adapters against the store (installed for this base model)."""
        if not choices:
            return ()
        base = self.store.get(model)
        specs = []
        for choice in choices:
            manifest = self.adapters.get(model, choice.name)
            if manifest.base_digest != base.digest:
                raise BadInput(
                    f"adapter {choice.name!r} was installed for other bytes of {model};"
                    " install it again",
                    param="adapters",
                )
            specs.append(AdapterSpec(manifest.digest, self.adapters.file(manifest), choice.scale))
        return tuple(specs)

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
            cache=self.cache_status(),
        )

    def cache_status(self) -> CacheStatus:
        stats, semantic = self.answers.stats, self.config.cache.embedding_model
        try:
            self.embeddings.manifest(semantic)
        except ClawError:
            semantic = ""
        return CacheStatus(
            entries=len(self.answers),
            bytes=self.answers.bytes,
            exact_hits=stats.exact_hits,
            semantic_hits=stats.semantic_hits,
            misses=stats.misses,
            near_misses=stats.near_misses,
            semantic_model=semantic or None,
            embedding_models=self.embeddings.loaded(),
        )
