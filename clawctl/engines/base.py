"""The one interface the daemon uses to run a model, and the values that cross it.

The scheduler drives engines only through `Engine`, always from the model's own thread, so engine
implementations need no locking; the one exception is an engine that declares
`PreparesConcurrently`, whose long prompts are tokenized on a second thread. Values are frozen
dataclasses in clawctl's own terms; OpenAI shapes live only in `schemas/` and `api/`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

from clawctl.engines.decoding import TextStream
from clawctl.engines.meter import EntropyMeter, Thresholds, Trigger
from clawctl.schemas.signals import Signals
from clawctl.schemas.state import StateIdentity

FinishReason = Literal["stop", "length", "cancelled"]
# The markup every tool-using model writes its calls in (Qwen2.5's native syntax, and the
# Hermes-style prompt given to models whose template has no tools): see engines/toolprompt.py.
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"


@dataclass(frozen=True)
class EngineSettings:
    """How to load one model (from the model store and the edge profile)."""

    model_path: Path
    n_ctx: int
    n_batch: int
    n_threads: int
    kv_cache_type: str = "f16"
    flash_attn: bool = False
    model_digest: str = ""
    format: str = "gguf"  # which engine loads it: "gguf" (llama.cpp) or "onnx" (onnxruntime-genai)
    parallel: int = 1  # sequences decoded together in one context (continuous batching)
    # KV cells of the context: 0 for a stream of `n_ctx` per sequence; with `kv_unified`, one
    # pool the sequences share (each still holds at most `n_ctx` tokens).
    kv_cells: int = 0
    kv_unified: bool = False
    draft_max: int = 0  # draft tokens per step for greedy requests (0: no speculation)
    draft_path: Path | None = None  # a draft model with the same vocabulary (GGUF)

    def cells(self) -> int:
        """KV cells the context holds, whatever their layout."""
        return self.kv_cells or self.n_ctx * max(1, self.parallel)


@dataclass(frozen=True)
class FreezePoint:
    """Capture a generation's state once its sequence holds the first `tokens` prompt tokens
    (a prefix-pool block), and hand it (raw state, tokens) to `save`, on the model's thread;
    the prefill is cut there, as if that prefix had been computed first on its own."""

    tokens: int
    save: Callable[[bytearray, list[int]], None]


@dataclass(frozen=True)
class AdapterSpec:
    """A LoRA adapter to apply: its blob (content address and file) and scale."""

    digest: str
    path: Path
    scale: float


@dataclass(frozen=True)
class ToolCall:
    """A call an assistant turn made: `arguments` is the JSON text of an object."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ToolSpec:
    """A function the model may call; `parameters` is its JSON Schema as JSON text (frozen
    values: prompts are hashed and compared)."""

    name: str
    description: str = ""
    parameters: str = '{"type": "object", "properties": {}}'


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None  # a tool turn: the call it answers
    name: str | None = None


@dataclass(frozen=True)
class Grammar:
    """A GBNF grammar that constrains sampling. `trigger` (a regex over the generated text)
    makes it lazy: free text until the pattern matches, then constrained from the match's
    first group on (llama.cpp's lazy grammars); None constrains from the first token."""

    gbnf: str
    trigger: str | None = None


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    speculative: bool = True  # draft by prompt lookup when decoding greedily
    grammar: Grammar | None = None
    logprobs: int | None = None  # report each token's logprob and this many alternatives


@dataclass(frozen=True)
class Prompt:
    """Exactly one of: chat turns (templated by the model), raw text, or token ids."""

    chat: tuple[ChatTurn, ...] | None = None
    text: str | None = None
    tokens: tuple[int, ...] | None = None
    tools: tuple[ToolSpec, ...] = ()  # offered to a chat prompt (rendered by its template)


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability under the model (the raw logits, before sampling
    settings and grammars), with the most likely alternatives when asked (OpenAI's
    `logprobs.content` entry; `top` entries have no `top` of their own)."""

    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class TokenEvent:
    """Text produced by one decode step (may be empty while a stop string is being matched);
    `tokens` counts the tokens sampled so far, for holding text until a tier commits.
    `logprobs`: the tokens sampled since the last event, when the request asked for them."""

    text: str
    tokens: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    prompt_seconds: float
    decode_seconds: float
    signals: Signals | None = None
    escalate: Trigger | None = None  # the entropy meter stopped the generation
    drafted: int = 0  # tokens proposed by prompt lookup
    accepted: int = 0  # of those, how many the model confirmed


@dataclass(frozen=True)
class PreparedPrompt:
    tokens: list[int]
    stop: tuple[str, ...] = field(default=())


class Engine(Protocol):
    """A loaded model. Every method is called from the model's dedicated thread only."""

    @property
    def n_ctx(self) -> int: ...

    def prepare(self, prompt: Prompt) -> PreparedPrompt:
        """Template (for chat) and tokenize a prompt."""
        ...

    @property
    def parallel(self) -> int:
        """How many generations `step` can advance together."""
        ...

    @property
    def active(self) -> int:
        """How many generations are open."""
        ...

    @property
    def stateful(self) -> bool:
        """Whether the context's state can be prefilled, captured and restored (snapshots,
        sessions, the prefix pool); the state methods below raise otherwise."""
        ...

    def admits(self, prompt: PreparedPrompt, params: SamplingParams) -> bool:
        """Whether a generation can join the open ones now (a free sequence). With none open,
        any prompt that fits the context is admitted."""
        ...

    def open(
        self,
        prompt: PreparedPrompt,
        params: SamplingParams,
        cancelled: Callable[[], bool],
        watch: Thresholds | None = None,
        freeze: FreezePoint | None = None,
    ) -> int:
        """Start a generation and return its id. Opened with none open, it continues from what
        the context holds (the state keeper prepared it); otherwise it shares its longest common
        prefix with the other sequences. Either way the rest of the prompt is computed in later
        steps, beside the other generations (and stops there if cancelled). With `watch`,
        every token goes through the entropy meter, which stops generation when a threshold is
        crossed (`Finished.escalate`). With `freeze`, the state at that prompt length is
        captured on the way (the prefix pool)."""
        ...

    def shared_prefix(self, generation: int) -> int:
        """Prompt tokens an open generation took from another sequence instead of computing."""
        ...

    def step(self) -> list[tuple[int, TokenEvent | Finished]]:
        """One decode call over every open generation: their new text, and `Finished` for each
        that ended (and is closed). Cancellation is observed between steps. If it raises, every
        open generation is closed."""
        ...

    def memory_bytes(self) -> int:
        """Resident memory this engine holds (weights plus KV cache), for the budget."""
        ...

    def kv_cells(self) -> tuple[int, int]:
        """(held, total) KV cells: tokens the context holds now, and what it can hold."""
        ...

    def set_adapters(self, adapters: tuple[AdapterSpec, ...]) -> None:
        """Apply exactly these LoRA adapters (empty: none) without reloading the base model.
        Each adapter file is loaded once; a change of set invalidates the cached prefix."""
        ...

    def release_adapters(self) -> None:
        """Free loaded adapters that are not active and whose files were removed."""
        ...

    # --- state: what snapshots, sessions and the prefix pool are built on ---------------------

    def identity(self) -> StateIdentity:
        """What a saved state must match to be restored into this context."""
        ...

    def cached_tokens(self) -> list[int]:
        """The token ids whose keys and values the context holds now."""
        ...

    def held_prefix(self, tokens: list[int]) -> int:
        """How many leading `tokens` the context holds now (compared without copying it)."""
        ...

    def prefill(self, tokens: list[int], reuse: bool = True) -> int:
        """Make the context hold exactly `tokens`, reusing the common prefix unless `reuse` is
        false; returns how many tokens were evaluated."""
        ...

    def capture_state(self) -> tuple[bytearray, list[int]]:
        """A copy of the memory sequence's raw state (its KV cells) and the tokens it holds."""
        ...

    def restore_state(self, raw: bytearray, tokens: list[int]) -> None:
        """Replace the memory sequence's state with a captured one (already verified); the
        other sequences keep theirs."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class PreparesConcurrently(Protocol):
    """An engine that may also prepare prompts on a second thread while its own thread decodes:
    preparing reads only what loading fixed (template, vocabulary), never the context. The
    worker tokenizes long prompts there, so one huge prompt does not stall every other
    generation's steps; the engine says why that is safe for it in its docstring."""

    def prepare_concurrently(self, prompt: Prompt) -> PreparedPrompt:
        """`Engine.prepare`, safe to call from one other thread while the model's thread runs
        the engine's other methods (never after `close`)."""
        ...


LoadEngine = Callable[[EngineSettings], Engine]


def generate(
    engine: Engine,
    prompt: PreparedPrompt,
    params: SamplingParams,
    cancelled: Callable[[], bool] = lambda: False,
    watch: Thresholds | None = None,
) -> Iterator[TokenEvent | Finished]:
    """Run one generation alone to its end (benchmarks, tools); the last item is `Finished`."""
    opened = engine.open(prompt, params, cancelled, watch)
    while True:
        for slot, event in engine.step():
            if slot == opened:
                yield event
                if isinstance(event, Finished):
                    return


Event = tuple[int, TokenEvent | Finished]


def finish_events(
    generation: int,
    reason: FinishReason,
    text: TextStream,
    meter: EntropyMeter | None,
    counts: tuple[int, int],
    times: tuple[float, float | None],
    drafts: tuple[int, int] = (0, 0),
    logprobs: tuple[TokenLogprob, ...] = (),
) -> list[Event]:
    """How every engine ends a generation: the meter judges a finished answer, the text held
    back for a possible stop string is released (not for a cancelled one), then `Finished`.
    `counts` is (prompt tokens, tokens sampled), `times` (opened, first token), `drafts`
    (drafted, accepted); `logprobs` those of tokens no event has carried yet."""
    ended = time.perf_counter()
    opened, first = times[0], times[1] or ended
    if meter is not None and reason != "cancelled" and meter.trigger is None:
        meter.finish()
    tail = "" if reason == "cancelled" else text.flush()
    done = Finished(
        finish_reason=reason,
        prompt_tokens=counts[0],
        completion_tokens=counts[1],
        prompt_seconds=first - opened,
        decode_seconds=ended - first,
        signals=meter.signals() if meter else None,
        escalate=meter.trigger if meter else None,
        drafted=drafts[0],
        accepted=drafts[1],
    )
    if tail or (logprobs and reason != "cancelled"):
        return [(generation, TokenEvent(tail, counts[1], logprobs)), (generation, done)]
    return [(generation, done)]


KV_BYTES_PER_ELEMENT = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


def estimate_kv_bytes(n_layer: int, n_ctx: int, n_embd_kv: int, kv_cache_type: str) -> int:
    """Bytes of a full K+V cache: what a loaded model adds to its weights in memory."""
    return int(2 * n_layer * n_ctx * n_embd_kv * KV_BYTES_PER_ELEMENT.get(kv_cache_type, 2.0))
