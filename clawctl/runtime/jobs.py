"""A generation request on its way through a model's worker, and the events it yields.

The asyncio side creates a `Job` and reads its `events` queue; the model's thread emits into it with
`call_soon_threadsafe`. These types are shared by the fair queue, the worker and the manager, so
they live apart from all three.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass, field

from clawctl.engines.base import (
    AdapterSpec,
    Finished,
    PreparedPrompt,
    Prompt,
    SamplingParams,
    TokenEvent,
)
from clawctl.engines.meter import Thresholds
from clawctl.errors import ClawError
from clawctl.runtime.statekeeper import StateOutcome, StateRequest

NO_STATE = StateOutcome(0, None)


@dataclass(frozen=True)
class Started:
    """The job left the queue: the prompt is tokenized, fits the context, and its state is ready."""

    prompt_tokens: int
    queue_seconds: float
    load_seconds: float
    state: StateOutcome = NO_STATE
    prefill_seconds: float = 0.0  # restoring or prefilling the prompt's state before the engine


@dataclass(frozen=True)
class Failed:
    error: ClawError


JobEvent = Started | TokenEvent | Finished | Failed


@dataclass
class Job:
    prompt: Prompt
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[JobEvent]
    state: StateRequest = field(default_factory=StateRequest)
    adapters: tuple[AdapterSpec, ...] = ()
    watch: Thresholds | None = None
    caller: str = "-"  # who asked (app or uid): the fair queue's key
    prepared: PreparedPrompt | None = None  # tokenized once, while waiting to join
    cancel: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.perf_counter)
    kept: StateOutcome | None = None  # what the state keeper did before it (and left for after)

    def emit(self, event: JobEvent) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


@dataclass(frozen=True)
class Anticipation:
    """Idle-time work for a model's thread: make the memory sequence hold the prefix the next
    request of a conversation is expected to start with (see `ModelWorker._anticipate`).
    `prompts` are two renderings of that request with different last turns: the prefix is what
    they share, the expected turns up to where the unknown one begins."""

    prompts: tuple[Prompt, Prompt]
    adapters: tuple[AdapterSpec, ...] = ()
    not_before: float = 0.0  # `time.monotonic()` before which it waits for a job to come first


def emit_all(deliveries: list[tuple[Job, JobEvent]]) -> None:
    """Hand one decode step's events to their jobs with one wake-up of each event loop, not one
    per token: on a 2-core box every wake-up takes a core from the decoding threads."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, JobEvent]]] = {}
    for job, event in deliveries:
        by_loop.setdefault(job.loop, []).append((job, event))
    for loop, items in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
            loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[Job, JobEvent]]) -> None:
    for job, event in items:
        job.events.put_nowait(event)
