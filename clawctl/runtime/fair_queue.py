"""The fair queue in front of one model: least-served caller first, FIFO within a caller."""

from __future__ import annotations

import threading
from collections import deque

from clawctl.runtime.jobs import Job


class FairQueue:
    """The jobs waiting for one model, served fairly across callers: the next job comes from
    the caller served least since the queue was last empty (FIFO within a caller), so an app
    that sends a burst waits behind itself, not in front of everybody else."""

    def __init__(self) -> None:
        self._ready = threading.Condition()
        self._waiting: dict[str, deque[Job]] = {}  # insertion order: ties go to earlier callers
        self._served: dict[str, int] = {}
        self._stopped = False

    def put(self, job: Job) -> None:
        with self._ready:
            self._waiting.setdefault(job.caller, deque()).append(job)
            self._ready.notify()

    def stop(self) -> None:
        """Wake the consumer with None once the jobs already queued are taken."""
        with self._ready:
            self._stopped = True
            self._ready.notify()

    def take(self, wait: bool) -> Job | None:
        """The next job; None when the queue is empty and `wait` is false, or once stopped."""
        with self._ready:
            while not self._waiting:
                if self._stopped or not wait:
                    return None
                self._ready.wait()
            caller = min(self._waiting, key=lambda c: self._served.get(c, 0))
            jobs = self._waiting[caller]
            job = jobs.popleft()
            if not jobs:
                del self._waiting[caller]
            self._served[caller] = self._served.get(caller, 0) + 1
            if not self._waiting:
                self._served.clear()
            return job
