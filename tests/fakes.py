"""A real implementation of the Engine protocol that needs no model: it echoes the prompt's
words back one per step, and records which threads touched it.

With a `watch` (a routing tier's thresholds) it runs the real entropy meter on scripted
uncertainty: a word starting with "?" is a token the model is unsure of (entropy 3 nats, top
probability 0.2), every other word a confident one. So a test decides where the cascade
escalates by what it asks."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from clawctl.engines.base import (
    EngineSettings,
    Finished,
    FinishReason,
    PreparedPrompt,
    Prompt,
    SamplingParams,
    TokenEvent,
)
from clawctl.engines.meter import EntropyMeter, Thresholds
from clawctl.errors import EngineError

UNSURE = (3.0, 0.2, 0.02)  # entropy (nats), top probability, top-1/top-2 margin
SURE = (0.05, 0.98, 0.97)


@dataclass
class FakeSlot:
    left: list[str]
    limit: int
    prompt_tokens: int
    cancelled: Callable[[], bool]
    produced: int = 0
    meter: EntropyMeter | None = None


@dataclass
class FakeEngine:
    settings: EngineSettings
    memory: int = 100 << 20
    step_seconds: float = 0.0
    threads: set[int] = field(default_factory=set)
    closed: bool = False
    vocab: dict[str, int] = field(default_factory=dict)
    slots: dict[int, FakeSlot] = field(default_factory=dict)
    peak: int = 0  # most slots open at once
    stateful: bool = True  # False: no state keeper (the fake holds no llama.cpp state)
    held: list[int] = field(default_factory=list)  # the memory sequence's tokens
    prefills: list[int] = field(default_factory=list)  # lengths `prefill` was asked to hold
    on_prefill: Callable[[], None] | None = None  # called after each prefill

    def __post_init__(self) -> None:
        self.threads.add(threading.get_ident())

    @property
    def n_ctx(self) -> int:
        return self.settings.n_ctx

    @property
    def words(self) -> list[str]:
        return list(self.vocab)

    @property
    def parallel(self) -> int:
        return self.settings.parallel

    @property
    def active(self) -> int:
        return len(self.slots)

    def prepare(self, prompt: Prompt) -> PreparedPrompt:
        self.threads.add(threading.get_ident())
        if prompt.chat is not None:
            text = " ".join(turn.content for turn in prompt.chat)
        else:
            text = prompt.text or ""
        tokens = []
        for word in text.split():  # a "vocabulary" that grows with every new word
            tokens.append(self.vocab.setdefault(word, len(self.vocab)))
        return PreparedPrompt(tokens)

    def admits(self, prompt: PreparedPrompt, params: SamplingParams) -> bool:
        return len(self.slots) < self.parallel

    def open(
        self,
        prompt: PreparedPrompt,
        params: SamplingParams,
        cancelled: Callable[[], bool],
        watch: object = None,
        freeze: object = None,
    ) -> int:
        self.threads.add(threading.get_ident())
        if not self.slots:  # a generation on an idle context takes the memory sequence
            self.held = list(prompt.tokens)
        slot = next(i for i in range(self.parallel) if i not in self.slots)
        words = [self.words[t] for t in prompt.tokens]
        limit = params.max_tokens or len(words)
        meter = None
        if isinstance(watch, Thresholds):
            meter = EntropyMeter(max(1, len(self.vocab)), watch, lambda t: self.words[t])
        self.slots[slot] = FakeSlot(
            list(words[:limit]), limit, len(prompt.tokens), cancelled, meter=meter
        )
        self.peak = max(self.peak, len(self.slots))
        return slot

    def shared_prefix(self, generation: int) -> int:
        return 0

    def step(self) -> list[tuple[int, TokenEvent | Finished]]:
        """One "decode" for every open slot: a word each, one sleep for all (batching)."""
        self.threads.add(threading.get_ident())
        time.sleep(self.step_seconds)
        events: list[tuple[int, TokenEvent | Finished]] = []
        for i, slot in list(self.slots.items()):
            stopped = False
            if not slot.cancelled() and slot.left:
                word = slot.left.pop(0)
                slot.produced += 1
                meter = slot.meter
                if meter is not None:
                    entropy, p1, margin = UNSURE if word.startswith("?") else SURE
                    fired = meter.account(entropy, p1, margin, self.vocab[word])
                    stopped = fired is not None and meter.thresholds.stop
                if not stopped:
                    events.append((i, TokenEvent(word + " ", slot.produced)))
                    if slot.left:
                        continue
            reason: FinishReason = "cancelled" if slot.cancelled() else (
                "length" if slot.produced == slot.limit and not stopped else "stop"
            )  # fmt: skip
            meter = slot.meter
            if meter is not None and reason != "cancelled" and meter.trigger is None:
                meter.finish()
            events.append(
                (
                    i,
                    Finished(
                        reason,
                        slot.prompt_tokens,
                        slot.produced,
                        0.001,
                        0.001,
                        signals=meter.signals() if meter else None,
                        escalate=meter.trigger if meter else None,
                    ),
                )
            )
            del self.slots[i]
        return events

    def held_prefix(self, tokens: list[int]) -> int:
        n = 0
        for a, b in zip(self.held, tokens, strict=False):
            if a != b:
                break
            n += 1
        return n

    def prefill(self, tokens: list[int], reuse: bool = True) -> int:
        keep = self.held_prefix(tokens) if reuse else 0
        self.held = list(tokens)
        self.prefills.append(len(tokens))
        if self.on_prefill is not None:
            self.on_prefill()
        return len(tokens) - keep

    def memory_bytes(self) -> int:
        return self.memory

    def kv_cells(self) -> tuple[int, int]:
        return len(self.slots), self.n_ctx

    def set_adapters(self, adapters: tuple[object, ...]) -> None:
        self.threads.add(threading.get_ident())

    def release_adapters(self) -> None:
        return None

    def close(self) -> None:
        self.threads.add(threading.get_ident())
        self.closed = True


class FakeLoader:
    """Builds FakeEngines and remembers them; can be told to fail a load."""

    def __init__(
        self, memory: int = 100 << 20, step_seconds: float = 0.0, stateful: bool = True
    ) -> None:
        self.memory = memory
        self.step_seconds = step_seconds
        self.stateful = stateful
        self.engines: list[FakeEngine] = []
        self.fail_next = False

    def __call__(self, settings: EngineSettings) -> FakeEngine:
        if self.fail_next:
            self.fail_next = False
            raise EngineError("simulated load failure")
        engine = FakeEngine(settings, self.memory, self.step_seconds, stateful=self.stateful)
        self.engines.append(engine)
        return engine
