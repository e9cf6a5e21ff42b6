"""The fleet's layout in its bucket, and this box's view of it.

    <prefix>/objects/<sha256>                      snapshot files, content-addressed
    <prefix>/pool/<identity key>/<chain>.json      a pool entry's pointer (`PoolPointer`)
    <prefix>/named/<name>.json                     a named snapshot's pointer (`NamedPointer`)
    <prefix>/sessions/<id>.json                    a session's newest state (`NamedPointer`)
    <prefix>/refs/<sha256>/<box>                   empty: <box> used that object (its time)

Model blobs are objects too, under the sha256 the catalog pins them by, so a box pulling a
catalog model tries the fleet's copy first (a presigned URL the build subprocess downloads)
and every byte is still checked against the catalog.

`gc` removes what no box has used for a while: a box touches its ref of an object whenever it
uploads or fetches it, so an object whose refs (and its own upload) are all older than the
retention window is one nobody asked for lately. Named snapshots are kept until removed.

Objects are the very `.snap` files the local store keeps, named by the sha256 of their bytes and
written with a conditional put, so two boxes uploading one prefix write it once and nothing is
ever overwritten. Each object also carries its identity (model digest, adapters, state format,
KV types, context size) as object metadata for anyone browsing the bucket; what a box trusts is
what it checks after a download: the bytes' sha256 against the pointer, then the file's own
header identity against its context (the same refusal a local snapshot gets), then every chunk's
checksum when it is restored.

A pool pointer lists every block chain hash of the tokens its object holds, so one listing per
identity plus a small read per new entry tells a box every prefix the fleet can serve; pool
entries from boxes with another `block_tokens` simply never match.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pydantic import ValidationError

from clawctl.config import FleetSection
from clawctl.errors import ClawError, IntegrityError, NotFound
from clawctl.fleet.bucket import Bucket, FleetObjectMissing, FleetUnavailable
from clawctl.fsutil import fsync_dir
from clawctl.schemas.fleet import (
    FleetGcResult,
    FleetKind,
    FleetStatus,
    NamedPointer,
    PoolPointer,
)
from clawctl.schemas.snapshots import Kind, SnapshotInfo
from clawctl.schemas.state import StateIdentity
from clawctl.store.snapshot_format import (
    SnapshotHeader,
    SnapshotMismatch,
    read_header,
    read_open_header,
)
from clawctl.store.snapshots import SnapshotStore, block_hashes, validate_snapshot_name

log = logging.getLogger("clawd.fleet")
HASH_CHUNK = 1 << 20
BANDWIDTH_WEIGHT = 0.5  # of the newest fetch in the running estimate
# After the fleet failed a lookup, requests skip it this long (an unreachable host would
# otherwise cost each of them a connect timeout).
LOOKUP_BACKOFF_SECONDS = 30.0


def file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return _sha256(handle)


def _sha256(handle: IO[bytes]) -> str:
    digest = hashlib.sha256()
    while chunk := handle.read(HASH_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class FleetHit:
    pointer: PoolPointer
    tokens: int  # leading prompt tokens the entry holds (block aligned)


@dataclass
class _PoolIndex:
    by_chain: dict[str, PoolPointer]
    seen: set[str]  # pointer keys already read
    refreshed: float = 0.0


@dataclass
class _Counters:
    uploaded: int = 0
    already_there: int = 0
    fetched: int = 0
    fetched_bytes: int = 0
    fetch_refused: int = 0


class FleetStore:
    def __init__(
        self, bucket: Bucket, section: FleetSection, box: str, snapshots: SnapshotStore
    ) -> None:
        self.bucket = bucket
        self.section = section
        self.box = box
        self.snapshots = snapshots
        self._root = section.prefix.strip("/")
        self._lock = threading.Lock()
        self._pools: dict[str, _PoolIndex] = {}
        self._bandwidth: float | None = None  # bytes/s, measured on fetches
        self._skip_until = 0.0
        self.counters = _Counters()

    # --- keys --------------------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self._root, *parts) if p)

    def object_key(self, sha256: str) -> str:
        return self._key("objects", sha256)

    def pool_key(self, identity_key: str, chain: str) -> str:
        return self._key("pool", identity_key, f"{chain}.json")

    def named_key(self, name: str) -> str:
        return self._key("named", f"{name}.json")

    def session_key(self, name: str) -> str:
        return self._key("sessions", f"{name}.json")

    def ref_key(self, sha256: str, box: str | None = None) -> str:
        return self._key("refs", sha256, box or self.box)

    def _touch(self, sha256: str) -> None:
        """Mark an object as used by this box now (what `gc` keeps)."""
        try:
            self.bucket.put_bytes(self.ref_key(sha256), b"")
        except FleetUnavailable as exc:  # only gc reads it: not worth failing a fetch for
            log.warning("fleet ref of %s not written: %s", sha256[:12], exc.message)

    # --- pushing -----------------------------------------------------------------------------

    def push(self, kind: FleetKind, path: Path) -> bool:
        """Upload one local file the fleet shares: a snapshot, or a model or adapter blob;
        False if the fleet had its bytes already."""
        if kind == "model" or kind == "adapter":
            return self._push_blob(kind, path)
        return self._push_snapshot(kind, path)

    def _sent(self, sha256: str, created: bool) -> bool:
        self._touch(sha256)
        with self._lock:
            if created:
                self.counters.uploaded += 1
            else:
                self.counters.already_there += 1
        return created

    def _push_blob(self, kind: FleetKind, path: Path) -> bool:
        """A model or adapter blob, unless the fleet has it: a HEAD spares sending hundreds of
        megabytes for the conditional put to refuse. Hashed here (not trusted from its name)."""
        with path.open("rb") as body:
            sha256 = _sha256(body)
            size = body.tell()
            body.seek(0)
            key = self.object_key(sha256)
            created = False
            if self.bucket.head(key) is None:
                created = self.bucket.put_if_absent(key, body, size, {"kind": kind})
        return self._sent(sha256, created)

    def blob_url(self, sha256: str) -> str | None:
        """A time-limited URL of the fleet's copy of a blob; None if it has none (or is not
        reachable: the model then comes from its source)."""
        key = self.object_key(sha256)
        try:
            if self.bucket.head(key) is None:
                return None
        except FleetUnavailable as exc:
            log.warning("fleet not asked for %s: %s", sha256[:12], exc.message)
            return None
        self._touch(sha256)
        return self.bucket.presigned_get(key)

    def _push_snapshot(self, kind: Kind, path: Path) -> bool:
        """Upload one local snapshot and its pointer; False if the object was already there.
        Raises FileNotFoundError if the file is gone (evicted before its turn came). A session's
        pointer moves to its newest state; pool and named pointers name one object for good."""
        with path.open("rb") as body:  # one handle: a session rewritten meanwhile is not mixed in
            header = read_open_header(body, path.name)
            body.seek(0)
            sha256 = _sha256(body)
            size = body.tell()
            body.seek(0)
            identity = header.identity
            metadata = {
                "kind": kind,
                "identity": identity.key(),
                "model-sha256": identity.model_sha256,
                "state-format": identity.state_format,
                "n-ctx": str(identity.n_ctx),
                "kv-type": f"{identity.type_k}/{identity.type_v}",
                "tokens": str(len(header.tokens)),
                "box": self.box,
            }
            created = self.bucket.put_if_absent(self.object_key(sha256), body, size, metadata)
        record: PoolPointer | NamedPointer
        if kind == "pool":
            record = PoolPointer(
                chain=path.stem, sha256=sha256, size=size, tokens=len(header.tokens),
                chains=block_hashes(identity, header.tokens, self.snapshots.block_tokens),
                box=self.box, created_at=header.created_at,
            )  # fmt: skip
            key = self.pool_key(identity.key(), path.stem)
        else:
            record = NamedPointer(
                name=path.stem, sha256=sha256, size=size, tokens=len(header.tokens),
                identity=identity, box=self.box, created_at=header.created_at,
            )  # fmt: skip
            key = (self.session_key if kind == "session" else self.named_key)(path.stem)
        self.bucket.put_bytes(key, record.model_dump_json().encode())
        return self._sent(sha256, created)

    # --- the pool ----------------------------------------------------------------------------

    def _refresh(self, identity: StateIdentity, index: _PoolIndex) -> None:
        """Read the pointers of entries this box has not seen yet (pointers never change)."""
        prefix = self._key("pool", identity.key()) + "/"
        for key in self.bucket.keys(prefix):
            if key in index.seen or not key.endswith(".json"):
                continue
            data = self.bucket.get_bytes(key)
            index.seen.add(key)
            if data is None:
                continue
            try:
                pointer = PoolPointer.model_validate_json(data)
            except ValidationError:
                log.warning("fleet pool pointer %s is not valid; ignored", key)
                continue
            for chain in pointer.chains:
                known = index.by_chain.get(chain)
                if known is None or pointer.tokens > known.tokens:
                    index.by_chain[chain] = pointer
        index.refreshed = time.monotonic()

    def pool_lookup(self, identity: StateIdentity, hashes: Sequence[str]) -> FleetHit | None:
        """The fleet entry sharing the most leading blocks with a prompt (its chain hashes);
        None also while the fleet is unreachable (then only what is already indexed counts)."""
        with self._lock:
            index = self._pools.setdefault(identity.key(), _PoolIndex({}, set()))
            now = time.monotonic()
            stale = now - index.refreshed >= self.section.index_refresh_seconds
            if stale and now >= self._skip_until:
                try:
                    self._refresh(identity, index)
                except FleetUnavailable as exc:
                    self._skip_until = now + LOOKUP_BACKOFF_SECONDS
                    log.warning("fleet index not read (next try in %.0f s): %s",
                                LOOKUP_BACKOFF_SECONDS, exc.message)  # fmt: skip
            for i in range(len(hashes) - 1, -1, -1):
                pointer = index.by_chain.get(hashes[i])
                if pointer is not None:
                    return FleetHit(pointer, (i + 1) * self.snapshots.block_tokens)
        return None

    def worth_fetching(self, size: int, tokens: int, prefill_rate: float | None = None) -> bool:
        """Whether downloading `size` bytes is expected to beat computing `tokens` here at
        `prefill_rate` tokens/s (measured by the caller; else the configured assumption)."""
        bandwidth = self._bandwidth or self.section.assumed_bandwidth_mb_s * (1 << 20)
        rate = prefill_rate or self.section.assumed_prefill_tokens_s
        return size / bandwidth < tokens / rate

    def _download(self, sha256: str, handle: IO[bytes]) -> None:
        started = time.perf_counter()
        got = self.bucket.download(self.object_key(sha256), handle)
        if got != sha256:
            with self._lock:
                self.counters.fetch_refused += 1
            raise IntegrityError(
                f"fleet object {sha256[:12]}… arrived with sha256 {got[:12]}…; not used"
            )
        handle.flush()
        os.fsync(handle.fileno())
        self._touch(sha256)
        size = handle.tell()
        seconds = max(time.perf_counter() - started, 1e-6)
        with self._lock:
            measured = size / seconds
            self._bandwidth = (
                measured
                if self._bandwidth is None
                else BANDWIDTH_WEIGHT * measured + (1 - BANDWIDTH_WEIGHT) * self._bandwidth
            )
            self.counters.fetched += 1
            self.counters.fetched_bytes += size

    def fetch_pool(self, pointer: PoolPointer, identity: StateIdentity) -> Path:
        """Download a fleet pool entry into the local pool, checked: its bytes against the
        pointer's sha256 and its header against this context's identity."""
        target = self.snapshots.pool_path(identity, validate_snapshot_name(pointer.chain))
        try:
            header = self._fetch_into(pointer.sha256, target, identity, "pool")
        except FleetObjectMissing:  # removed since it was indexed: stop offering it
            with self._lock:
                index = self._pools.get(identity.key())
                if index is not None:
                    for chain in pointer.chains:
                        if index.by_chain.get(chain) is pointer:
                            del index.by_chain[chain]
            raise
        self.snapshots.pool_added(identity, target, header.tokens)
        return target

    def _fetch_into(
        self, sha256: str, target: Path, identity: StateIdentity, kind: Kind
    ) -> SnapshotHeader:
        """Download an object to a temp file beside `target`, check it, and move it into
        place (replacing an older file); nothing is left behind when a check fails."""
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            dir=target.parent, prefix=".fleet-", suffix=".tmp", delete=False
        ) as handle:
            tmp = Path(handle.name)
        try:
            with tmp.open("r+b") as out:
                self._download(sha256, out)
            header = self._checked_header(tmp, identity, kind)
            os.chmod(tmp, 0o600)
            os.replace(tmp, target)
            fsync_dir(target.parent)
        finally:
            tmp.unlink(missing_ok=True)
        return header

    def session_pointer(self, name: str) -> NamedPointer | None:
        """The newest state of session `name` another box froze; None if none (or the fleet is
        unreachable: the session is then computed here)."""
        try:
            data = self.bucket.get_bytes(self.session_key(validate_snapshot_name(name, "session")))
        except FleetUnavailable as exc:
            log.warning("fleet session %s not looked up: %s", name, exc.message)
            return None
        if data is None:
            return None
        try:
            return NamedPointer.model_validate_json(data)
        except ValidationError:
            log.warning("fleet session pointer %s is not valid; ignored", name)
            return None

    def fetch_session(self, pointer: NamedPointer, identity: StateIdentity) -> SnapshotHeader:
        """A session's state from the fleet into the local session file, checked."""
        target = self.snapshots.path_for("session", pointer.name)
        return self._fetch_into(pointer.sha256, target, identity, "session")

    def _checked_header(self, path: Path, identity: StateIdentity, kind: Kind) -> SnapshotHeader:
        try:
            header = read_header(path)
        except ClawError:
            with self._lock:
                self.counters.fetch_refused += 1
            raise
        problem = identity.mismatch(header.identity)
        if problem is None and header.kind != kind:
            problem = f"it is a {header.kind} snapshot, not a {kind} one"
        if problem is not None:
            with self._lock:
                self.counters.fetch_refused += 1
            raise SnapshotMismatch(f"fleet snapshot {path.stem} does not fit here: {problem}")
        return header

    # --- named snapshots ---------------------------------------------------------------------

    def named(self) -> list[str]:
        prefix = self._key("named") + "/"
        return sorted(
            key[len(prefix) : -len(".json")] for key in self.bucket.keys(prefix)
            if key.endswith(".json")
        )  # fmt: skip

    def pull_named(self, name: str, as_name: str | None = None) -> SnapshotInfo:
        """A named snapshot from the fleet into the local store, verified whole (as an import
        is) and never replacing a local one."""
        data = self.bucket.get_bytes(self.named_key(validate_snapshot_name(name)))
        if data is None:
            raise NotFound(f"the fleet has no snapshot named {name!r}", param="name")
        pointer = NamedPointer.model_validate_json(data)
        with self.snapshots.incoming() as (tmp, handle):
            self._download(pointer.sha256, handle)
            return self.snapshots.adopt(tmp, handle, as_name or name)

    # --- garbage collection ------------------------------------------------------------------

    def _pointers(
        self, folder: str, model: type[PoolPointer] | type[NamedPointer]
    ) -> dict[str, str]:
        """pointer key -> the sha256 of the object it names, for every pointer under `folder`."""
        named: dict[str, str] = {}
        for key in self.bucket.keys(self._key(folder) + "/"):
            data = self.bucket.get_bytes(key)
            if data is None:
                continue
            try:
                named[key] = model.model_validate_json(data).sha256
            except ValidationError:
                log.warning("fleet pointer %s is not valid; left alone", key)
        return named

    def gc(self, older_than: float, dry_run: bool = False) -> FleetGcResult:
        """Remove objects (and the pool and session pointers naming them) that no box has
        uploaded or fetched for `older_than` seconds; named snapshots are kept."""
        cutoff = time.time() - older_than
        used: dict[str, float] = {}
        refs: dict[str, list[str]] = {}
        for entry in self.bucket.listing(self._key("refs") + "/"):
            sha256 = entry.key.rsplit("/", 2)[-2]
            used[sha256] = max(used.get(sha256, 0.0), entry.modified)
            refs.setdefault(sha256, []).append(entry.key)
        keep = set(self._pointers("named", NamedPointer).values())
        doomed: dict[str, int] = {}
        kept = 0
        for entry in self.bucket.listing(self._key("objects") + "/"):
            sha256 = entry.key.rsplit("/", 1)[-1]
            if sha256 in keep or max(used.get(sha256, 0.0), entry.modified) >= cutoff:
                kept += 1
            else:
                doomed[sha256] = entry.size
        pointers = [
            key
            for folder, model in (("pool", PoolPointer), ("sessions", NamedPointer))
            for key, sha256 in self._pointers(folder, model).items()
            if sha256 in doomed
        ]
        if not dry_run:  # pointers first: no box is sent to an object that is gone
            for key in pointers:
                self.bucket.delete(key)
            for sha256 in doomed:
                self.bucket.delete(self.object_key(sha256))
                for key in refs.get(sha256, []):
                    self.bucket.delete(key)
            with self._lock:
                self._pools.clear()  # re-read the index without the removed entries
        return FleetGcResult(
            objects=len(doomed), bytes=sum(doomed.values()), pointers=len(pointers),
            kept=kept, dry_run=dry_run,
        )  # fmt: skip

    # --- status ------------------------------------------------------------------------------

    def status(self) -> FleetStatus:
        reachable, problem, named = True, None, []
        try:
            named = self.named()
        except FleetUnavailable as exc:
            reachable, problem = False, exc.message
        with self._lock:
            counters = self.counters
            bandwidth = self._bandwidth
            entries = sum(
                len({p.sha256 for p in index.by_chain.values()}) for index in self._pools.values()
            )
        return FleetStatus(
            enabled=True, endpoint=self.bucket.endpoint, bucket=self.bucket.name,
            prefix=self._root, box=self.box, reachable=reachable, problem=problem,
            uploaded=counters.uploaded, already_there=counters.already_there,
            fetched=counters.fetched, fetched_bytes=counters.fetched_bytes,
            fetch_refused=counters.fetch_refused,
            bandwidth_mb_s=round(bandwidth / (1 << 20), 1) if bandwidth else None,
            pool_entries=entries, named=named,
        )  # fmt: skip
