"""The fair queue in front of one model: least-served caller first, FIFO within a caller."""

from __future__ import annotations

import threading
import time
from collections import deque

from clawctl.runtime.jobs import Anticipation, Job


class FairQueue:
    """The jobs waiting for one model, served fairly across callers: the next job comes from
    the caller served least since the queue was last empty (FIFO within a caller), so an app
    that sends a burst waits behind itself, not in front of everybody else.

    Besides jobs it holds at most one `Anticipation`, the newest (an older one is outdated by
    it): idle-time work the consumer takes only when no job is waiting, and not before its
    `not_before`."""

    def __init__(self) -> None:
        self._ready = threading.Condition()
        self._waiting: dict[str, deque[Job]] = {}  # insertion order: ties go to earlier callers
        self._served: dict[str, int] = {}
        self._stopped = False
        self._idle: Anticipation | None = None

    def put(self, job: Job) -> None:
        """Queue a job; it outdates idle-time work not yet taken (the context it would build
        on is about to change)."""
        with self._ready:
            self._waiting.setdefault(job.caller, deque()).append(job)
            self._idle = None
            self._ready.notify()

    def anticipate(self, work: Anticipation) -> None:
        """Offer idle-time work, replacing any not yet taken."""
        with self._ready:
            self._idle = work
            self._ready.notify()

    def take_idle(self) -> Anticipation | None:
        """The idle-time work, if it is due, no job is waiting and the queue is not stopped."""
        with self._ready:
            work = self._idle
            if work is not None and work.not_before > time.monotonic():
                return None  # not due yet: kept
            self._idle = None
            return None if self._waiting or self._stopped else work

    def has_jobs(self) -> bool:
        """Whether a job is waiting (read between the chunks of idle-time work)."""
        with self._ready:
            return bool(self._waiting)

    @property
    def stopped(self) -> bool:
        with self._ready:
            return self._stopped

    def stop(self) -> None:
        """Wake the consumer with None once the jobs already queued are taken."""
        with self._ready:
            self._stopped = True
            self._ready.notify()

    def take(self, wait: bool) -> Job | None:
        """The next job; None when the queue is empty and `wait` is false, once stopped, or
        when idle-time work is due (`take_idle`)."""
        with self._ready:
            while not self._waiting:
                if self._stopped or not wait:
                    return None
                if self._idle is None:
                    self._ready.wait()
                    continue
                delay = self._idle.not_before - time.monotonic()
                if delay <= 0:
                    return None
                self._ready.wait(delay)
            caller = min(self._waiting, key=lambda c: self._served.get(c, 0))
            jobs = self._waiting[caller]
            job = jobs.popleft()
            if not jobs:
                del self._waiting[caller]
            self._served[caller] = self._served.get(caller, 0) + 1
            if not self._waiting:
                self._served.clear()
            return job
