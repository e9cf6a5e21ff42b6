"""Write-behind: what this box freezes goes to the fleet in the background.

The snapshot writer hands each pool entry and named snapshot it wrote to `submit`, which only
records it: a small file in the outbox directory (so a restart, or a kill, loses nothing) and a
place in a bounded queue (so a fleet that is down for a day costs a bounded amount of memory and
disk; what does not fit is left local and counted). One thread at the lowest CPU priority
uploads in order; while the store is unreachable it retries the same entry with exponential
back-off, and a request never waits for any of it. An entry whose file was evicted meanwhile is
dropped: the fleet is a cache too.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
import threading
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from clawctl.errors import ClawError
from clawctl.fleet.bucket import FleetUnavailable
from clawctl.fleet.store import FleetStore
from clawctl.fsutil import atomic_write
from clawctl.schemas.fleet import FleetKind

log = logging.getLogger("clawd.fleet")
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0


class OutboxEntry(BaseModel):
    """One upload still owed to the fleet, as kept on disk."""

    model_config = ConfigDict(frozen=True)

    kind: FleetKind
    path: str


class FleetUploader:
    def __init__(self, fleet: FleetStore, outbox: Path, capacity: int) -> None:
        self.fleet = fleet
        self.outbox = outbox
        self.capacity = capacity
        self.errors = 0
        self.skipped = 0  # entries left local because the queue was full
        self.last_error: str | None = None
        self._queue: collections.deque[tuple[Path, OutboxEntry]] = collections.deque()
        self._changed = threading.Condition()
        self._stopping = False
        self._busy = False
        outbox.mkdir(parents=True, exist_ok=True)
        for path in sorted(outbox.glob("*.json"), key=lambda p: p.stat().st_mtime):
            try:
                self._queue.append((path, OutboxEntry.model_validate_json(path.read_bytes())))
            except (OSError, ValidationError):
                log.warning("fleet outbox entry %s is unreadable; dropped", path.name)
                path.unlink(missing_ok=True)
        self._thread = threading.Thread(target=self._run, name="fleet-uploader", daemon=True)
        self._thread.start()

    def submit(self, kind: FleetKind, path: Path) -> bool:
        """Owe the fleet this file; False if the queue is full (the file stays local only)."""
        entry = OutboxEntry(kind=kind, path=str(path))
        name = hashlib.sha256(str(path).encode()).hexdigest()[:24] + ".json"
        with self._changed:
            if any(record.path == entry.path for _, record in self._queue):
                return True
            if len(self._queue) + self._busy >= self.capacity:
                self.skipped += 1
                log.warning("fleet upload queue is full; %s stays on this box only", path.name)
                return False
            marker = self.outbox / name
            atomic_write(marker, entry.model_dump_json().encode(), mode=0o600)
            self._queue.append((marker, entry))
            self._changed.notify_all()
        return True

    @property
    def queued(self) -> int:
        with self._changed:
            return len(self._queue) + (1 if self._busy else 0)

    def _run(self) -> None:
        with contextlib.suppress(OSError):  # hashing and sending must not slow the model
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        backoff = FIRST_BACKOFF
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._stopping or bool(self._queue))
                if self._stopping:
                    return
                marker, entry = self._queue.popleft()
                self._busy = True
            retry = False
            try:
                self.fleet.push(entry.kind, Path(entry.path))
            except FileNotFoundError:
                log.info("%s was removed before its upload; skipped", Path(entry.path).name)
            except FleetUnavailable as exc:
                retry = True
                self.errors += 1
                self.last_error = exc.message
                log.warning("fleet upload of %s failed (retrying in %.1f s): %s",
                            Path(entry.path).name, backoff, exc.message)  # fmt: skip
            except (ClawError, OSError) as exc:
                self.errors += 1
                self.last_error = getattr(exc, "message", None) or str(exc)
                log.warning("%s cannot go to the fleet: %s", entry.path, self.last_error)
            with self._changed:
                self._busy = False
                if retry:
                    self._queue.appendleft((marker, entry))
                    if self._changed.wait_for(lambda: self._stopping, timeout=backoff):
                        return
                    backoff = min(backoff * 2, MAX_BACKOFF)
                    continue
            backoff = FIRST_BACKOFF
            marker.unlink(missing_ok=True)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the upload in progress; what is still queued stays in the outbox."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        self._thread.join(timeout)
