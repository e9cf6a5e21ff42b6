"""GGUF models through llama-cpp-python (with `llama_slots.py` and `llama_draft.py`, the only
modules that import it).

Chat prompts are rendered with the GGUF's own `tokenizer.chat_template` (the same Jinja formatter
llama-cpp-python uses). Generation is continuous batching over the context's sequences
(`llama_slots.py`); this module owns loading, prompts,
adapters and whole-context state.

Concurrency: an instance is created, used and closed on one dedicated thread (see scheduler.py);
llama-cpp-python's OpenMP build slows ~4x once a second thread has called a model.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from clawctl.engines.base import (
    AdapterSpec,
    EngineSettings,
    Finished,
    FreezePoint,
    PreparedPrompt,
    Prompt,
    SamplingParams,
    TokenEvent,
    estimate_kv_bytes,
)
from clawctl.engines.llama.draft import DraftModel
from clawctl.engines.llama.load import load_llama, uses_flash_attn
from clawctl.engines.llama.slots import MEMORY_SEQ, SlotBatch, seq_state
from clawctl.engines.llama.tokens import Overflow, PieceTokenizer
from clawctl.engines.meter import Thresholds
from clawctl.engines.toolprompt import (
    dumps,
    hermes_turns,
    template_knows_tools,
    template_turns,
    tool_dicts,
)
from clawctl.errors import BadInput, ContextOverflow, EngineError
from clawctl.schemas.state import AdapterRef, StateIdentity

# What a raw llama.cpp state depends on besides the identity fields: the library that wrote it
# and its format, one sequence's state (so it is saved and restored while others decode).
STATE_FORMAT = (
    f"llama-cpp-python/{llama_cpp.__version__}/seq-state-v{llama_cpp.LLAMA_STATE_SEQ_VERSION}"
)
FALLBACK_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class LlamaEngine:
    """One GGUF model loaded with llama-cpp-python."""

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self._llama = load_llama(settings.model_path, settings, settings.model_path.name)
        self._flash_attn = uses_flash_attn(settings)
        parallel = max(1, settings.parallel)
        self._drafter: DraftModel | None = None
        if settings.draft_path is not None and settings.draft_max > 0:
            try:
                self._drafter = DraftModel(settings.draft_path, self._llama, settings)
            except BaseException:
                self._llama.close()
                raise
        self._slots = SlotBatch(
            self._llama,
            parallel,
            settings.n_ctx,
            settings.kv_unified,
            settings.draft_max,
            self._drafter,
        )
        self._loaded_adapters: dict[str, tuple[Path, Any]] = {}
        self._active: tuple[AdapterSpec, ...] = ()
        self._formatter = self._build_formatter()
        self._n_vocab = int(self._llama.n_vocab())
        self._max_token_bytes: int | None = None  # found on the first long prompt
        self._pieces = PieceTokenizer(self._llama._model.vocab, self._n_vocab)

    def _build_formatter(self) -> Jinja2ChatFormatter:
        llama = self._llama
        metadata = llama.metadata
        template = metadata.get("tokenizer.chat_template") or FALLBACK_TEMPLATE
        self._native_tools = template_knows_tools(template)
        eos, bos = llama.token_eos(), llama.token_bos()
        model = llama._model  # the tokenizer's text for special tokens
        formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=model.token_get_text(eos) if eos != -1 else "",
            bos_token=model.token_get_text(bos) if bos != -1 else "",
        )
        # HF's `tojson` (key order kept, no HTML escaping), which these templates were written
        # for; Jinja's own sorts keys and escapes "<" in tool schemas.
        filters = formatter._environment.environment.filters
        filters["tojson"] = lambda value, indent=None: dumps(value)
        return formatter

    @property
    def n_ctx(self) -> int:
        """Tokens one generation may hold (its stream, or its share of the pool)."""
        return self._slots.n_ctx

    def kv_cells(self) -> tuple[int, int]:
        """(cells held, cells in all) of the context's KV cache."""
        return self._slots.used_cells(), self._slots.cells

    def prepare(self, prompt: Prompt) -> PreparedPrompt:
        """Template (chat) and tokenize a prompt, refusing one that cannot fit the context
        before tokenizing it: `len(text) / max_token_bytes` is a lower bound on its tokens (see
        `_min_tokens`), and the tokenizer writes at most `n_ctx` ids, so an overlong prompt costs
        one tokenizer pass, never a list of millions of ids."""
        if prompt.tokens is not None:
            if len(prompt.tokens) >= self.n_ctx:
                raise self._overflow(f"{len(prompt.tokens)} tokens", "prompt")
            n_vocab = self._n_vocab
            if any(t < 0 or t >= n_vocab for t in prompt.tokens):
                raise BadInput(f"prompt token ids must be in [0, {n_vocab})", param="prompt")
            return PreparedPrompt(_not_empty(list(prompt.tokens)))
        if prompt.chat is not None:
            tools: list[Any] | None = None
            if self._native_tools:
                messages: list[Any] = template_turns(prompt.chat)
                tools = tool_dicts(prompt.tools) or None
            else:
                messages = hermes_turns(prompt.chat, prompt.tools)
            try:
                rendered = self._formatter(messages=messages, tools=tools)
            except Exception as exc:  # jinja raises whatever the template raises
                raise BadInput(f"the model's chat template rejected the messages: {exc}") from None
            stops = rendered.stop if isinstance(rendered.stop, list) else [rendered.stop or ""]
            text = _utf8(rendered.prompt, "messages")
            tokens = self._tokenize(text, not rendered.added_special, True, "messages")
            return PreparedPrompt(_not_empty(tokens), tuple(s for s in stops if s))
        assert prompt.text is not None
        tokens = self._tokenize(_utf8(prompt.text, "prompt"), True, False, "prompt")
        return PreparedPrompt(_not_empty(tokens))

    def prepare_concurrently(self, prompt: Prompt) -> PreparedPrompt:
        """`prepare`, called from the worker's preparer thread while this model's own thread
        decodes (`engines.base.PreparesConcurrently`).

        Safe because preparing reads only what loading fixed: the Jinja template and
        llama.cpp's vocabulary. `llama_tokenize` and `llama_token_to_piece` take the
        `llama_vocab`, not the context; `llama_vocab::impl::tokenize` is a const method that
        builds a tokenizer session per call, and its caches (special tokens, token pieces) are
        filled when the model loads. llama-server itself tokenizes on its HTTP threads while its
        main loop decodes. No ggml graph runs, so the OpenMP thread-pool slowdown that gives each
        model one thread (STYLE.md) does not apply; ctypes releases the GIL for the call, so
        decode steps go on meanwhile. The worker joins the preparer before it closes the model.
        """
        return self.prepare(prompt)

    def _tokenize(self, text: bytes, add_bos: bool, special: bool, param: str) -> list[int]:
        """Chat prompts (special tokens parsed) by pieces, remembering an agent's repeated
        turns (engines/llama/tokens.py); plain text whole."""
        n_ctx = self.n_ctx
        floor = self._min_tokens(text)
        if floor >= n_ctx:
            raise self._overflow(f"at least {floor} tokens ({len(text)} bytes)", param)
        try:
            if special:
                return self._pieces.tokenize(text, add_bos, n_ctx)
            return self._pieces.plain(text, add_bos, n_ctx)
        except Overflow as exc:
            raise self._overflow(f"{exc.tokens} tokens", param) from None

    def _min_tokens(self, text: bytes) -> int:
        """A lower bound on the tokens of `text`: each token stands for at most
        `max_token_bytes` bytes of it, so there are at least len/max_token_bytes of them. 0
        when no bound holds (see `_max_token_bytes`) or the text is too short to matter."""
        if len(text) < self.n_ctx:
            return 0  # fewer bytes than the context holds tokens: tokenizing it is cheap
        if self._max_token_bytes is None:
            self._max_token_bytes = _max_token_bytes(self._llama._model.vocab)
        longest = self._max_token_bytes
        return -(-len(text) // longest) if longest > 0 else 0

    def _overflow(self, size: str, param: str) -> ContextOverflow:
        return ContextOverflow(
            f"the prompt has {size} but the model's context holds {self.n_ctx}; shorten it",
            param=param,
        )

    # --- generations: continuous batching over the context's sequences ------------------------

    @property
    def parallel(self) -> int:
        return self._slots.parallel

    @property
    def active(self) -> int:
        return len(self._slots.slots)

    @property
    def stateful(self) -> bool:
        return True

    def admits(self, prompt: PreparedPrompt, params: SamplingParams) -> bool:
        return self._slots.admits(prompt, params)

    def open(
        self,
        prompt: PreparedPrompt,
        params: SamplingParams,
        cancelled: Callable[[], bool],
        watch: Thresholds | None = None,
        freeze: FreezePoint | None = None,
    ) -> int:
        return self._slots.open(prompt, params, cancelled, watch, freeze)

    def step(self) -> list[tuple[int, TokenEvent | Finished]]:
        return self._slots.step()

    def shared_prefix(self, generation: int) -> int:
        return self._slots.slots[generation].shared

    def memory_bytes(self) -> int:
        total = _memory_bytes(self._llama, self.settings.model_path, self.settings)
        if self._drafter is not None and self.settings.draft_path is not None:
            total += _memory_bytes(self._drafter.llama, self.settings.draft_path, self.settings)
        return total

    def set_adapters(self, adapters: tuple[AdapterSpec, ...]) -> None:
        if adapters == self._active:
            return
        pointers = []
        for spec in adapters:
            if spec.digest not in self._loaded_adapters:
                pointer = llama_cpp.llama_adapter_lora_init(
                    self._llama.model, str(spec.path).encode()
                )
                if not pointer:
                    raise EngineError(f"llama.cpp could not load the adapter {spec.path.name}")
                self._loaded_adapters[spec.digest] = (spec.path, pointer)
            pointers.append(self._loaded_adapters[spec.digest][1])
        count = len(adapters)
        array = (llama_cpp.llama_adapter_lora_p_ctypes * count)(*pointers) if count else None
        scales = (ctypes.c_float * count)(*(s.scale for s in adapters)) if count else None
        if llama_cpp.llama_set_adapters_lora(self._llama.ctx, array, count, scales) != 0:
            raise EngineError("llama.cpp could not apply the adapters")
        self._active = adapters
        # Keys and values computed under other adapters are wrong under these: forget them.
        self._slots.forget_idle()
        self._llama.n_tokens = 0
        self._llama._ctx.kv_cache_seq_rm(-1, 0, -1)

    def release_adapters(self) -> None:
        active = {spec.digest for spec in self._active}
        for digest, (path, pointer) in list(self._loaded_adapters.items()):
            if digest not in active and not path.exists():
                llama_cpp.llama_adapter_lora_free(pointer)
                del self._loaded_adapters[digest]

    # --- state ----------------------------------------------------------------------------

    def identity(self) -> StateIdentity:
        kv = self.settings.kv_cache_type
        return StateIdentity(
            model_sha256=self.settings.model_digest,
            adapters=tuple(AdapterRef(sha256=a.digest, scale=a.scale) for a in self._active),
            state_format=STATE_FORMAT,
            n_ctx=self.n_ctx,
            type_k=kv,
            type_v=kv,
            flash_attn=self._flash_attn,
            sequences=self.parallel,
            kv_pool=self._slots.cells if self._slots.unified else 0,
        )

    def cached_tokens(self) -> list[int]:
        llama = self._llama
        return [int(t) for t in llama.input_ids[: llama.n_tokens]]

    def held_prefix(self, tokens: list[int]) -> int:
        return self._slots.memory_prefix(tokens)

    def prefill(self, tokens: list[int], reuse: bool = True) -> int:
        """Make the memory sequence hold `tokens` (on an idle context). Without `reuse` it
        starts from an empty context: every sequence's cells go."""
        if not reuse:
            self._slots.forget_idle()
            self._slots.cut_memory([])
        keep = self._slots.cut_memory(tokens)
        self._slots.room_for_memory(len(tokens))
        if keep < len(tokens):
            self._llama.eval(tokens[keep:])
        if not reuse:
            self._slots.mark_memory_cold()
        return len(tokens) - keep

    def capture_state(self) -> tuple[bytearray, list[int]]:
        return seq_state(self._llama._ctx.ctx, MEMORY_SEQ), self.cached_tokens()

    def restore_state(self, raw: bytearray, tokens: list[int]) -> None:
        llama = self._llama
        if len(tokens) > self.n_ctx:
            raise EngineError("the saved state holds more tokens than this context")
        self._slots.cut_memory([])  # the memory sequence is replaced; the others keep theirs
        self._slots.room_for_memory(len(tokens))
        ctx = llama._ctx.ctx
        read = int(llama_cpp.llama_state_seq_set_data(ctx, _c_bytes(raw), len(raw), MEMORY_SEQ))
        if read != len(raw):
            self._slots.cut_memory([])
            raise EngineError("llama.cpp rejected the saved state")
        llama.input_ids[: len(tokens)] = tokens
        llama.n_tokens = len(tokens)
        llama._requires_eval = True  # logits are not part of a usable restored state
        self._slots.mark_memory_cold()

    def close(self) -> None:
        self._slots.close()
        if self._drafter is not None:
            self._drafter.close()
        for _, pointer in self._loaded_adapters.values():
            llama_cpp.llama_adapter_lora_free(pointer)
        self._loaded_adapters.clear()
        self._llama.close()


def _memory_bytes(llama: llama_cpp.Llama, path: Path, settings: EngineSettings) -> int:
    """A loaded model's weights plus its context's KV cells (streams or pool alike)."""
    meta = llama.metadata
    arch = meta.get("general.architecture", "llama")
    n_embd = int(meta.get(f"{arch}.embedding_length", "0"))
    heads = int(meta.get(f"{arch}.attention.head_count", "1")) or 1
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", str(heads)))
    n_layer = int(meta.get(f"{arch}.block_count", "0"))
    width = n_embd * kv_heads // heads
    cells = int(llama_cpp.llama_n_ctx(llama._ctx.ctx))
    return path.stat().st_size + estimate_kv_bytes(n_layer, cells, width, settings.kv_cache_type)


def _max_token_bytes(vocab: Any) -> int:
    """The most bytes of input text one token of this vocabulary stands for; 0 if that bound
    does not hold.

    A token's piece (`llama_token_to_piece`, special tokens included since chat prompts parse
    them) is the input it covers for the byte-level BPE and SentencePiece tokenizers: they only
    split and merge the input, add at most a leading space, and map bytes they cannot place to
    one byte token each. It does not hold for tokenizers that normalize text (WordPiece and
    Unigram lowercase, strip accents or collapse spaces), nor for special tokens that swallow the
    whitespace beside them (the LSTRIP/RSTRIP attributes): then no early refusal is made.
    Reading the whole vocabulary takes ~60 ms for 49k tokens, once per loaded model.
    """
    if llama_cpp.llama_vocab_type(vocab) not in (
        llama_cpp.LLAMA_VOCAB_TYPE_BPE,
        llama_cpp.LLAMA_VOCAB_TYPE_SPM,
    ):
        return 0
    swallows = llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP | llama_cpp.LLAMA_TOKEN_ATTR_RSTRIP
    piece = ctypes.create_string_buffer(256)
    longest = 1
    for token in range(int(llama_cpp.llama_vocab_n_tokens(vocab))):
        if int(llama_cpp.llama_vocab_get_attr(vocab, token)) & swallows:
            return 0
        size = int(llama_cpp.llama_token_to_piece(vocab, token, piece, len(piece), 0, True))
        longest = max(longest, abs(size))  # negative: the piece is that long, and truncated
    return longest


def _utf8(text: str, param: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, e.g. from a JSON "\ud800" escape
        raise BadInput("the prompt is not valid Unicode (a lone surrogate)", param=param) from None


def _not_empty(tokens: list[int]) -> list[int]:
    """A generation continues from at least one token (this model adds no BOS to an empty one)."""
    if not tokens:
        raise BadInput("the prompt is empty; give at least one token of text", param="prompt")
    return tokens


def _c_bytes(buffer: bytearray) -> Any:
    """A ctypes view of a bytearray, without copying it."""
    return (ctypes.c_uint8 * len(buffer)).from_buffer(buffer)


def load_llama_engine(settings: EngineSettings) -> LlamaEngine:
    return LlamaEngine(settings)
