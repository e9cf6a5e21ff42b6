"""ONNX language models with onnxruntime-genai: an engine a routing tier can run, metered like
the GGUF engine.

A model directory made by `clawctl models convert` (genai_config.json, model.onnx and its data,
tokenizer files, chat template) is loaded once; each generation is an `og.Generator`. Before a
token is chosen, the step's next-token logits are read (`get_logits`: float32, one row of the
vocabulary, a copy of ~200 KB - onnxruntime-genai exposes no pointer) and handed to the same
`EntropyMeter` the GGUF engine uses, so ONNX tiers report the same entropy and margins and can
trigger escalation. Sampling is onnxruntime-genai's own (greedy, or top-k/top-p with temperature).

What it does not do, and says so: continuous batching (one generation at a time), snapshots,
sessions and the prefix pool (onnxruntime-genai cannot hand out its KV cache), and LoRA adapters.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from clawctl.engines.base import (
    AdapterSpec,
    EngineSettings,
    Finished,
    FinishReason,
    FreezePoint,
    PreparedPrompt,
    Prompt,
    SamplingParams,
    TokenEvent,
    estimate_kv_bytes,
    finish_events,
)
from clawctl.engines.decoding import TextStream
from clawctl.engines.meter import EntropyMeter, Thresholds
from clawctl.errors import BadInput, EngineError
from clawctl.schemas.state import StateIdentity

GENERATION = 0  # the id of the one open generation


@dataclass
class _Open:
    generator: Any
    text: TextStream
    meter: EntropyMeter | None
    cancelled: Callable[[], bool]
    max_tokens: int
    prompt_tokens: int
    opened: float
    first: float | None = None
    sampled: int = 0


class GenaiEngine:
    """One onnxruntime-genai model. Called from the model's own thread only."""

    def __init__(self, settings: EngineSettings) -> None:
        import onnxruntime_genai as og

        self.settings = settings
        directory = settings.model_path
        config_file = directory / "genai_config.json"
        if not config_file.is_file():
            raise BadInput(f"{directory} is not an onnxruntime-genai model (no genai_config.json)")
        self._config = json.loads(config_file.read_text(encoding="utf-8"))
        try:
            config = og.Config(str(directory))
            threads = {"intra_op_num_threads": settings.n_threads, "inter_op_num_threads": 1}
            config.overlay(json.dumps({"model": {"decoder": {"session_options": threads}}}))
            self._model = og.Model(config)
            self._tokenizer = og.Tokenizer(self._model)
        except Exception as exc:  # onnxruntime-genai raises RuntimeError/OSError variants
            raise EngineError(f"onnxruntime-genai could not load {directory.name}: {exc}") from None
        model = self._config.get("model", {})
        self._context = min(settings.n_ctx, int(model.get("context_length") or settings.n_ctx))
        self._n_vocab = int(model.get("vocab_size") or 0)
        self._eos = _ids(model.get("eos_token_id"))
        self._og = og
        self._open: _Open | None = None

    # --- prompts --------------------------------------------------------------------------

    @property
    def n_ctx(self) -> int:
        return self._context

    def prepare(self, prompt: Prompt) -> PreparedPrompt:
        if prompt.tokens is not None:
            if self._n_vocab and any(t < 0 or t >= self._n_vocab for t in prompt.tokens):
                raise BadInput(f"prompt token ids must be in [0, {self._n_vocab})", param="prompt")
            tokens = list(prompt.tokens)
        elif prompt.chat is not None:
            messages = [{"role": t.role, "content": t.content} for t in prompt.chat]
            try:
                text = self._tokenizer.apply_chat_template(
                    json.dumps(messages), add_generation_prompt=True
                )
            except Exception as exc:
                raise BadInput(f"the model's chat template rejected the messages: {exc}") from None
            tokens = [int(t) for t in self._tokenizer.encode(text)]
        else:
            assert prompt.text is not None
            tokens = [int(t) for t in self._tokenizer.encode(prompt.text)]
        if not tokens:
            raise BadInput("the prompt is empty", param="prompt")
        return PreparedPrompt(tokens)

    # --- generation -----------------------------------------------------------------------

    @property
    def parallel(self) -> int:
        return 1

    @property
    def active(self) -> int:
        return 0 if self._open is None else 1

    @property
    def stateful(self) -> bool:
        return False

    def admits(self, prompt: PreparedPrompt, params: SamplingParams) -> bool:
        return self._open is None

    def open(
        self,
        prompt: PreparedPrompt,
        params: SamplingParams,
        cancelled: Callable[[], bool],
        watch: Thresholds | None = None,
        freeze: FreezePoint | None = None,  # never given: this engine has no saved states
    ) -> int:
        if self._open is not None:
            raise EngineError("one generation at a time on an ONNX model")
        if params.grammar is not None:
            raise BadInput(
                "tools and JSON output need grammar-constrained decoding, which ONNX models do "
                "not have here; use a GGUF model"
            )
        if params.logprobs is not None:
            raise BadInput("logprobs are not available for ONNX models here; use a GGUF model")
        og = self._og
        room = self._context - len(prompt.tokens)
        max_tokens = min(params.max_tokens or room, room)
        search: dict[str, Any] = {"max_length": len(prompt.tokens) + max_tokens}
        if params.temperature > 0:
            search |= {
                "do_sample": True,
                "temperature": params.temperature,
                "top_p": params.top_p,
                "top_k": params.top_k or 0,
                "repetition_penalty": params.repeat_penalty,
            }
            if params.seed is not None:
                search["random_seed"] = params.seed
        else:
            search["do_sample"] = False
        meter = None
        if watch is not None:
            n_vocab = self._n_vocab or 1
            meter = EntropyMeter(n_vocab, watch, self._piece)
        generator_params = og.GeneratorParams(self._model)
        generator_params.set_search_options(**search)
        generator = og.Generator(self._model, generator_params)
        generator.append_tokens(prompt.tokens)
        self._open = _Open(
            generator=generator,
            text=TextStream(tuple(params.stop)),
            meter=meter,
            cancelled=cancelled,
            max_tokens=max_tokens,
            prompt_tokens=len(prompt.tokens),
            opened=time.perf_counter(),
        )
        return GENERATION

    def _piece(self, token: int) -> str:
        return str(self._tokenizer.decode([token]))

    def shared_prefix(self, generation: int) -> int:
        return 0

    def step(self) -> list[tuple[int, TokenEvent | Finished]]:
        current = self._open
        if current is None:
            return []
        try:
            return self._advance(current)
        except Exception:
            self._close()
            raise

    def _advance(self, current: _Open) -> list[tuple[int, TokenEvent | Finished]]:
        if current.cancelled():
            return self._finish(current, "cancelled")
        generator = current.generator
        if generator.is_done():
            return self._finish(current, "length" if current.sampled else "stop")
        meter = current.meter
        if meter is not None:
            logits = generator.get_logits()[0, -1]
            if meter.observe(logits) and meter.thresholds.stop:
                return self._finish(current, "stop")
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
        if current.first is None:
            current.first = time.perf_counter()
        if token in self._eos:
            return self._finish(current, "stop")
        current.sampled += 1
        events: list[tuple[int, TokenEvent | Finished]] = []
        text = current.text.feed(self._piece(token).encode("utf-8"))
        if text:
            events.append((GENERATION, TokenEvent(text, current.sampled)))
        if current.text.stopped:
            return events + self._finish(current, "stop")
        if current.sampled >= current.max_tokens:
            return events + self._finish(current, "length")
        return events

    def _finish(
        self, current: _Open, reason: FinishReason
    ) -> list[tuple[int, TokenEvent | Finished]]:
        self._close()
        return finish_events(
            GENERATION,
            reason,
            current.text,
            current.meter,
            (current.prompt_tokens, current.sampled),
            (current.opened, current.first),
        )

    def _close(self) -> None:
        self._open = None  # dropping the generator frees its KV cache

    def kv_cells(self) -> tuple[int, int]:
        current = self._open
        held = 0 if current is None else current.prompt_tokens + current.sampled
        return held, self._context

    def memory_bytes(self) -> int:
        model = self._config.get("model", {})
        decoder = model.get("decoder", {})
        layers = int(decoder.get("num_hidden_layers") or 0)
        kv_width = int(decoder.get("num_key_value_heads") or 0) * int(decoder.get("head_size") or 0)
        weights = sum(p.stat().st_size for p in self.settings.model_path.iterdir() if p.is_file())
        return weights + estimate_kv_bytes(layers, self._context, kv_width, "f32")

    # --- what ONNX models do not support ----------------------------------------------------

    def set_adapters(self, adapters: tuple[AdapterSpec, ...]) -> None:
        if adapters:
            raise BadInput("LoRA adapters need a GGUF model; this is an ONNX model", param="claw")

    def release_adapters(self) -> None:
        return None

    def identity(self) -> StateIdentity:
        raise _stateless()

    def cached_tokens(self) -> list[int]:
        return []

    def held_prefix(self, tokens: list[int]) -> int:
        return 0

    def prefill(self, tokens: list[int], reuse: bool = True) -> int:
        raise _stateless()

    def capture_state(self) -> tuple[bytearray, list[int]]:
        raise _stateless()

    def restore_state(self, raw: bytearray, tokens: list[int]) -> None:
        raise _stateless()

    def close(self) -> None:
        self._open = None
        self._tokenizer = None
        self._model = None


def _stateless() -> BadInput:
    return BadInput(
        "snapshots and sessions need a GGUF model: onnxruntime-genai does not expose its state",
        param="claw",
    )


def _ids(value: object) -> frozenset[int]:
    if isinstance(value, list):
        return frozenset(int(v) for v in value)
    return frozenset() if value is None else frozenset({int(str(value))})


def load_genai_engine(settings: EngineSettings) -> GenaiEngine:
    return GenaiEngine(settings)
