"""A real implementation of the Engine protocol that needs no model: it echoes the prompt's
words back one per step, and records which threads touched it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from clawctl.engines.base import (
    EngineSettings,
    Finished,
    PreparedPrompt,
    Prompt,
    SamplingParams,
    TokenEvent,
)
from clawctl.errors import EngineError


@dataclass
class FakeEngine:
    settings: EngineSettings
    memory: int = 100 << 20
    step_seconds: float = 0.0
    threads: set[int] = field(default_factory=set)
    closed: bool = False
    words: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.threads.add(threading.get_ident())

    @property
    def n_ctx(self) -> int:
        return self.settings.n_ctx

    def prepare(self, prompt: Prompt) -> PreparedPrompt:
        self.threads.add(threading.get_ident())
        if prompt.chat is not None:
            text = " ".join(turn.content for turn in prompt.chat)
        else:
            text = prompt.text or ""
        self.words = text.split()
        return PreparedPrompt(list(range(len(self.words))))

    def generate(
        self,
        prompt: PreparedPrompt,
        params: SamplingParams,
        cancelled: Callable[[], bool],
        watch: object = None,
    ) -> Iterator[TokenEvent | Finished]:
        self.threads.add(threading.get_ident())
        limit = params.max_tokens or len(self.words)
        produced = 0
        for word in self.words[:limit]:
            if cancelled():
                break
            time.sleep(self.step_seconds)
            produced += 1
            yield TokenEvent(word + " ")
        reason = "cancelled" if cancelled() else ("length" if produced == limit else "stop")
        yield Finished(reason, len(prompt.tokens), produced, 0.001, 0.001)  # type: ignore[arg-type]

    def memory_bytes(self) -> int:
        return self.memory

    def set_adapters(self, adapters: tuple[object, ...]) -> None:
        self.threads.add(threading.get_ident())

    def release_adapters(self) -> None:
        return None

    def close(self) -> None:
        self.threads.add(threading.get_ident())
        self.closed = True


class FakeLoader:
    """Builds FakeEngines and remembers them; can be told to fail a load."""

    def __init__(self, memory: int = 100 << 20, step_seconds: float = 0.0) -> None:
        self.memory = memory
        self.step_seconds = step_seconds
        self.engines: list[FakeEngine] = []
        self.fail_next = False

    def __call__(self, settings: EngineSettings) -> FakeEngine:
        if self.fail_next:
            self.fail_next = False
            raise EngineError("simulated load failure")
        engine = FakeEngine(settings, self.memory, self.step_seconds)
        self.engines.append(engine)
        return engine
