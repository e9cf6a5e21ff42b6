"""The thread that tokenizes a model's long prompts while the model's own thread decodes.

Tokenizing is linear in the prompt: a megabyte of text takes the better part of a second. Done
between decode steps on the model's thread, it would stall every open generation, and the jobs
queued behind it, for that long. A worker whose engine declares `PreparesConcurrently` hands a
long prompt (`LONG_PROMPT_CHARS` and more) to this one extra thread per model instead; the job
rejoins the model's queue once prepared (or fails from here: too long for the context, rejected
by the chat template), and meanwhile the worker keeps decoding and admitting the jobs behind it.
Short prompts are still prepared inline: handing them over would cost more than tokenizing them.

The worker joins this thread before it closes the engine, so no prompt is tokenized against a
freed model.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from clawctl.engines.base import PreparesConcurrently, Prompt
from clawctl.errors import ClawError, EngineError
from clawctl.runtime.jobs import Failed, Job

log = logging.getLogger("clawd.worker")

# ~4k tokens of English: tens of milliseconds to tokenize, about one decode step.
LONG_PROMPT_CHARS = 16_384


def prompt_chars(prompt: Prompt) -> int:
    """How much text a prompt holds (token-id prompts hold none: nothing to tokenize)."""
    if prompt.text is not None:
        return len(prompt.text)
    if prompt.chat is not None:
        return sum(len(turn.content) for turn in prompt.chat)
    return 0


class Preparer:
    """One thread preparing jobs' prompts in arrival order; `ready` gets each prepared job."""

    def __init__(
        self, engine: PreparesConcurrently, name: str, ready: Callable[[Job], None]
    ) -> None:
        self._engine = engine
        self._ready = ready
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._pending = 0
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"prepare:{name}", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._idle:
            self._pending += 1
        self._jobs.put(job)

    def wait_idle(self) -> bool:
        """Block until no prompt is being prepared; True if some were (they rejoined the queue)."""
        with self._idle:
            had = self._pending > 0
            self._idle.wait_for(lambda: self._pending == 0)
        return had

    def close(self) -> None:
        """Finish the prompts handed over, then end the thread."""
        self._jobs.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                if not job.cancel.is_set():  # a cancelled job is failed by the worker
                    job.prepared = self._engine.prepare_concurrently(job.prompt)
            except ClawError as exc:
                job.emit(Failed(exc))
            except Exception as exc:
                log.exception("could not prepare a prompt")
                job.emit(Failed(EngineError(f"preparing the prompt failed: {exc}")))
            else:
                self._ready(job)  # before the count drops: wait_idle() means "all rejoined"
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()
