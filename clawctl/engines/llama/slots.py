"""Continuous batching for llama.cpp: several generations as sequences of one context.

Each open generation is a `Slot`: a llama.cpp sequence id, its own sampler chain, stop strings,
entropy meter and prompt-lookup drafts. `SlotBatch.step` builds one `llama_batch` from every
slot (the last sampled token plus any drafts of a decoding slot, a chunk of a slot's prompt) and
makes one `llama_decode` call, so N streams cost little more than one on a CPU where decoding is
memory-bound. Generations join and leave between steps. Prompts, too, are computed in these
steps (shortest first, a smaller share of the step while others decode; the last token of a prompt
computed from an empty or hydrated context in a step of its own), so a long prompt never holds the
others up and stops when cancelled.

KV cells are laid out one of two ways (the fit chooses, by the profile's KV budget). Where the
budget holds a whole context per sequence, each sequence has its own stream (llama.cpp's
non-unified cache: attention of one sequence never scans the others' cells, the fastest layout).
Otherwise the sequences share one pool (llama.cpp's unified cache), so one long agent context and
several short requests fit together: a generation is admitted when the pool has room for its
prompt and a little growth beside the running ones' (cells that ended generations left are given
back first, oldest first), and when the running ones outgrow the pool the youngest is suspended:
its cells go, its tokens so far become prompt again, and it resumes, recomputing them (reusing
any prefix another sequence holds), once there is room (vLLM's recompute preemption). Sequence 0
is also the context's "memory": the state keeper
(snapshots, sessions, the prefix pool) prepares it when a generation opens on an idle context,
and what it holds afterwards is reused by the next request, as before batching. The other
sequences keep their cells when their generation ends, as llama-server's slots keep their last
prompt: a generation joining busy ones takes the free sequence that already holds the longest
prefix of its prompt, or copies a longer one from another sequence (`llama_memory_seq_cp`) and
cuts it to the shared prefix, then prefills only the rest. Snapshots hold one sequence's state
(`seq_state`), so they leave the others' cells alone; adapter changes drop every cell.

Speculative decoding: a greedy slot proposes up to `draft_max` tokens that have reliably followed
its latest n-grams earlier in its prompt or output (prompt lookup, `NgramIndex`) and verifies
them in the same decode call;
the longest prefix the model agrees with is kept and the rest of the cells are dropped.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import llama_cpp
import numpy as np
import numpy.typing as npt

from clawctl.engines.base import (
    Finished,
    FinishReason,
    FreezePoint,
    Grammar,
    PreparedPrompt,
    SamplingParams,
    TokenEvent,
    TokenLogprob,
    finish_events,
)
from clawctl.engines.decoding import DraftPacer, DraftRequest, NgramIndex, StepCosts, TextStream
from clawctl.engines.llama.constrained import CandidateSampler
from clawctl.engines.meter import EntropyMeter, Thresholds
from clawctl.errors import EngineError
from clawctl.schemas.state import common_prefix

if TYPE_CHECKING:
    from clawctl.engines.llama.draft import DraftModel

MEMORY_SEQ = 0
# A shared prefix this short (a lone BOS token) is recomputed: reusing it saves nothing, and
# prefilling from position 0 keeps batch boundaries, hence rounding, canonical for cold prompts.
MIN_REUSE = 4
# Another sequence's prefix is copied only when it holds this many more tokens: a copy between
# streams moves the whole stream (7.5 ms for a 4,096-cell SmolLM2 stream here), about what 3
# prompt tokens cost. In a pool a copy only tags the cells (they are then shared): any gain pays.
MIN_COPY = 8
# Prompt tokens per step while other generations decode: a step lasts about as long as its
# prompt chunk takes, and every decoding generation waits for it (bench/kv_layout.py measures
# the trade between a short answer beside a long prompt and that prompt's own prefill).
MIXED_PREFILL = 64
# Cells a pool keeps free per running generation for what it will generate next: admission
# leaves this much beside each, and a suspended generation resumes only with this much spare.
GROWTH = 256


@dataclass
class Slot:
    seq: int
    prompt_tokens: int
    held: list[int]  # tokens whose cells this sequence holds, in position order
    pending: list[int]  # prompt tokens still to decode
    params: SamplingParams
    cancelled: Callable[[], bool]
    sampler: Any
    grammar: Any  # a llama.cpp grammar sampler, checked after the chain samples (or None)
    text: TextStream
    meter: EntropyMeter | None
    ngrams: NgramIndex | None
    max_tokens: int
    shared: int = 0  # prompt tokens copied from another sequence
    opened: float = field(default_factory=time.perf_counter)
    first: float | None = None
    last: int | None = None  # sampled, not yet decoded
    sampled: int = 0
    drafted: int = 0
    accepted: int = 0
    pacer: DraftPacer | None = None  # how far to draft (greedy generations only)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # not yet carried by an event
    suspended: bool = False  # its cells were given back to a full pool; `pending` holds them
    freeze: FreezePoint | None = None  # capture the state at this prompt length on the way
    # The prompt's last token gets a step of its own (see `SlotBatch.open`).
    last_alone: bool = True

    def claim(self) -> int:
        """Cells this generation holds or is about to: its tokens and a little growth."""
        left = self.max_tokens - self.sampled
        return len(self.held) + len(self.pending) + max(0, min(GROWTH, left))


@dataclass
class Planned:
    """A slot's part of one batch: its `tokens` from batch index `start`."""

    slot: Slot
    start: int
    tokens: list[int]
    prefill: bool


class SlotBatch:
    """The open generations of one llama.cpp context. Used from the model's thread only."""

    def __init__(
        self,
        llama: llama_cpp.Llama,
        parallel: int,
        n_ctx: int,
        unified: bool,
        draft_max: int,
        drafter: DraftModel | None = None,
    ) -> None:
        self._llama = llama
        self._drafter = drafter
        self.parallel = parallel
        self.unified = unified
        self.cells = int(llama_cpp.llama_n_ctx(llama._ctx.ctx))
        # Tokens one sequence may hold: its stream, or in a pool what the model is run with.
        self.n_ctx = min(n_ctx, int(llama_cpp.llama_n_ctx_seq(llama._ctx.ctx)))
        self.draft_max = draft_max
        self.n_batch = llama.n_batch
        self._n_vocab = int(llama.n_vocab())
        self._vocab = llama._model.vocab
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._memory = llama_cpp.llama_get_memory(llama._ctx.ctx)
        self._pieces: dict[int, bytes] = {}
        self.slots: dict[int, Slot] = {}
        self._idle: dict[int, list[int]] = {}  # ended generations' sequences: tokens they hold
        self._memory_cold = False  # see `mark_memory_cold`
        self._candidates = CandidateSampler(self._n_vocab)
        self._costs = StepCosts()  # what verify steps cost here, for the slots' draft pacers

    def close(self) -> None:
        for slot in self.slots.values():
            _free_samplers(slot)
        self.slots.clear()
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None

    # --- admission ------------------------------------------------------------------------

    def _max_new(self, prompt_tokens: int, params: SamplingParams) -> int:
        room = self.n_ctx - prompt_tokens
        return room if params.max_tokens is None else max(0, min(params.max_tokens, room))

    def admits(self, prompt: PreparedPrompt, params: SamplingParams) -> bool:
        """A free sequence, and in a pool room for the prompt and some growth beside what the
        running generations hold and claim (each stream holds a whole context anyway)."""
        if len(self.slots) >= self.parallel:
            return False
        if any(slot.suspended for slot in self.slots.values()):
            return False  # those resume first
        if self._computing_its_prefix(prompt.tokens):
            return False  # it copies that prefix once computed, rather than computing it too
        size = len(prompt.tokens)
        growth = min(GROWTH, self._max_new(size, params))
        return self._make_room(size + growth + self._claimed())

    def _computing_its_prefix(self, tokens: list[int]) -> bool:
        """Whether a running generation is still computing a prompt that shares a longer
        prefix with `tokens` than any sequence holds now (requests with the same system prompt
        and tools arriving together: the later ones wait a few steps and copy it)."""
        computing = [s for s in self.slots.values() if s.pending and not s.suspended]
        if not computing:  # the usual case while a request waits: asked at every step
            return False
        held = max(common_prefix(self._held_by(seq), tokens) for seq in range(self.parallel))
        for slot in computing:
            coming = common_prefix([*slot.held, *slot.pending], tokens)
            if coming >= held + MIN_COPY and coming > len(slot.held):
                return True
        return False

    # --- the pool ---------------------------------------------------------------------------

    def used_cells(self) -> int:
        """Cells the sequences hold. In a pool this counts a prefix one sequence copied from
        another twice, though they share its cells: an upper bound, so room is never
        overestimated."""
        total = sum(len(slot.held) for slot in self.slots.values())
        total += sum(len(held) for held in self._idle.values())
        if MEMORY_SEQ not in self.slots:
            total += self._llama.n_tokens
        return total

    def _claimed(self) -> int:
        """What the running generations hold or are about to, beyond the cells counted."""
        return sum(
            slot.claim() - len(slot.held) for slot in self.slots.values() if not slot.suspended
        )

    def _make_room(self, need: int, keep_memory: bool = False) -> bool:
        """Whether `need` more cells fit, after giving back what ended generations left
        (oldest first) and then, unless `keep_memory` or a generation runs in it, the memory
        sequence's cells. Streams always have room (admission is by sequence)."""
        if not self.unified:
            return True
        droppable = sum(len(held) for held in self._idle.values())
        if not keep_memory and MEMORY_SEQ not in self.slots:
            droppable += self._llama.n_tokens
        if self.cells - self.used_cells() + droppable < need:
            return False  # cannot fit even so: keep the cells for the prompts they may serve
        for seq in list(self._idle):
            if self.cells - self.used_cells() >= need:
                return True
            self._drop(seq)
            del self._idle[seq]
        if self.cells - self.used_cells() >= need:
            return True
        if not keep_memory and MEMORY_SEQ not in self.slots and self._llama.n_tokens:
            self._drop(MEMORY_SEQ)
            self._llama.n_tokens = 0
        return self.cells - self.used_cells() >= need

    def room_for_memory(self, tokens: int) -> None:
        """Before the memory sequence grows to `tokens` on an idle context: free what the
        pool needs from the idle sequences (it always can: the pool holds one context)."""
        self._make_room(max(0, tokens - self._llama.n_tokens), keep_memory=True)

    def _suspend_youngest(self) -> bool:
        """Give back the cells of the most recently opened running generation, if another
        one runs; its tokens so far become its prompt again."""
        running = [slot for slot in self.slots.values() if not slot.suspended]
        if len(running) < 2:
            return False
        slot = max(running, key=lambda s: s.opened)
        self._drop(slot.seq)
        tail = [] if slot.last is None else [slot.last]
        slot.pending = [*slot.held, *tail, *slot.pending]
        slot.held, slot.last, slot.suspended = [], None, True
        if slot.seq == MEMORY_SEQ:
            self._llama.n_tokens = 0
        if self._drafter is not None:
            self._drafter.release(slot.seq)
        return True

    def _resume(self) -> None:
        """Resume suspended generations, oldest first, while the pool has room for them."""
        for slot in sorted(self.slots.values(), key=lambda s: s.opened):
            if not slot.suspended:
                continue
            if not self._make_room(slot.claim() + self._claimed()):
                return
            tokens = slot.pending
            slot.held, slot.pending = [], []
            shared = self._share_prefix(slot.seq, tokens)
            slot.held, slot.pending = list(tokens[:shared]), list(tokens[shared:])
            slot.suspended = False

    def _fit_step(self) -> None:
        """In a pool: resume what fits, then make room for the coming step, suspending the
        youngest generations while it does not fit."""
        if not self.unified:
            return
        self._resume()
        while True:
            running = [slot for slot in self.slots.values() if not slot.suspended]
            step = sum(len(s.pending) if s.pending else 1 + self.draft_max for s in running)
            if self._make_room(min(self.n_batch, step)) or not self._suspend_youngest():
                return

    # --- opening --------------------------------------------------------------------------

    def open(
        self,
        prompt: PreparedPrompt,
        params: SamplingParams,
        cancelled: Callable[[], bool],
        watch: Thresholds | None,
        freeze: FreezePoint | None = None,
    ) -> int:
        tokens = prompt.tokens
        opened = time.perf_counter()  # the prefill in later steps is the prompt's time too
        # First: a meter the model cannot serve is the caller's error, before any state moves.
        meter = EntropyMeter(self._n_vocab, watch, self._text) if watch else None
        if not self.slots:
            # The memory sequence continues from what it holds (the state keeper prepared it).
            seq = MEMORY_SEQ
            shared = 0
            cold = self._memory_cold
            keep = self.cut_memory(tokens[:-1])
            self.room_for_memory(len(tokens))
            self._memory_cold = False  # from now on it holds this generation's tokens
        else:
            seq = self._free_seq(tokens)
            keep = shared = self._share_prefix(seq, tokens)
            cold = False
        # Exactness where it is promised: a prompt computed from an empty context, or from a
        # state saved that way (hydrated), decodes its last token alone, so a hydrated prompt
        # replays a cold prefill's decode calls and rounds as it does (docs/snapshot-format.md).
        # A prompt that continues what a live sequence holds (an agent's next call) has no cold
        # twin to match: its last token goes with the rest, saving a decode step at depth.
        last_alone = keep == 0 or cold
        held, pending = list(tokens[:keep]), list(tokens[keep:])
        sampler = self._sampler(params, tokens)
        try:
            grammar = None if params.grammar is None else self._grammar(params.grammar)
        except BaseException:
            llama_cpp.llama_sampler_free(sampler)
            raise
        greedy = params.temperature <= 0
        ngrams = None
        if greedy and params.speculative and self.draft_max > 0:
            ngrams = NgramIndex()
            ngrams.extend(list(tokens))
        self.slots[seq] = Slot(
            seq=seq,
            prompt_tokens=len(tokens),
            held=held,
            pending=list(pending),
            params=params,
            cancelled=cancelled,
            sampler=sampler,
            grammar=grammar,
            text=TextStream((*prompt.stop, *params.stop)),
            meter=meter,
            ngrams=ngrams,
            pacer=None if ngrams is None else DraftPacer(self._costs),
            max_tokens=self._max_new(len(tokens), params),
            shared=shared,
            opened=opened,
            freeze=freeze if freeze is not None and freeze.tokens > keep else None,
            last_alone=last_alone,
        )
        return seq

    def memory_prefix(self, tokens: list[int]) -> int:
        """How many leading `tokens` the memory sequence holds (compared without copying)."""
        llama = self._llama
        n = min(llama.n_tokens, len(tokens))
        if n == 0:
            return 0
        same = llama.input_ids[:n] == np.asarray(tokens[:n], dtype=np.intc)
        return n if same.all() else int(np.argmin(same))

    def cut_memory(self, tokens: list[int]) -> int:
        """Keep the memory sequence's cells for the longest prefix of `tokens` it holds (none
        if under MIN_REUSE, so a cold prompt is computed from position 0 in canonical chunks)
        and drop the rest; how many it keeps."""
        llama = self._llama
        keep = self.memory_prefix(tokens)
        if keep < MIN_REUSE:
            keep = 0
        llama.n_tokens = keep
        llama_cpp.llama_memory_seq_rm(self._memory, MEMORY_SEQ, keep, -1)
        self._memory_cold = self._memory_cold and keep > 0
        return keep

    def mark_memory_cold(self) -> None:
        """The memory sequence now holds a state computed as a cold prefill computes it, from
        an empty context (restored from a saved state, or prefilled to save one): the next
        prompt opened on it decodes its last token alone, as a cold prompt does."""
        self._memory_cold = True

    def _held_by(self, seq: int) -> list[int]:
        if seq in self.slots:
            return self.slots[seq].held
        if seq == MEMORY_SEQ:
            llama = self._llama
            return [int(t) for t in llama.input_ids[: llama.n_tokens]]
        return self._idle.get(seq, [])

    def _free_seq(self, tokens: list[int]) -> int:
        """The free sequence whose cells already hold the longest prefix of `tokens` (as a
        llama-server slot keeps its last prompt): the lowest on ties."""
        free = [seq for seq in range(self.parallel) if seq not in self.slots]
        return max(free, key=lambda seq: (common_prefix(self._held_by(seq), tokens), -seq))

    def _share_prefix(self, seq: int, tokens: list[int]) -> int:
        """Make `seq` hold the longest prefix of `tokens` that it or another sequence holds;
        its length. Its own cells are kept in place; another's are copied when they hold at
        least MIN_COPY tokens more."""
        limit = len(tokens) - 1  # the last prompt token is decoded: its logits are needed
        own = min(limit, common_prefix(self._held_by(seq), tokens))
        best, source = own, seq
        gain = 1 if self.unified else MIN_COPY
        for other in range(self.parallel):
            if other != seq:
                n = min(limit, common_prefix(self._held_by(other), tokens))
                if n >= best + gain:
                    best, source = n, other
        self._idle.pop(seq, None)
        if source != seq:  # streams are copied whole (into an emptied one), then cut
            llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1)
            llama_cpp.llama_memory_seq_cp(self._memory, source, seq, -1, -1)
        llama_cpp.llama_memory_seq_rm(self._memory, seq, best, -1)
        if seq == MEMORY_SEQ:
            self._llama.input_ids[:best] = tokens[:best]
            self._llama.n_tokens = best
        return best

    def forget_idle(self) -> None:
        """Drop what ended generations left in their sequences: before the whole context is
        saved (a snapshot holds the memory sequence only), replaced or invalidated."""
        for seq in self._idle:
            self._drop(seq)
        self._idle.clear()

    def _sampler(self, params: SamplingParams, prompt: list[int]) -> Any:
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = llama_cpp.llama_sampler_chain_add
        penalised = (
            params.repeat_penalty != 1.0
            or params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0
        )
        if penalised:
            last_n = 64
            add(
                chain,
                llama_cpp.llama_sampler_init_penalties(
                    self._n_vocab, last_n, params.repeat_penalty,
                    params.frequency_penalty, params.presence_penalty,
                ),
            )  # fmt: skip
            for token in prompt[-last_n:]:
                llama_cpp.llama_sampler_accept(chain, token)
        if params.temperature <= 0:
            add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            seed = llama_cpp.LLAMA_DEFAULT_SEED if params.seed is None else params.seed
            add(chain, llama_cpp.llama_sampler_init_top_k(params.top_k))
            add(chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
            add(chain, llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
            add(chain, llama_cpp.llama_sampler_init_temp(params.temperature))
            add(chain, llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    def _grammar(self, grammar: Grammar) -> Any:
        """A grammar sampler; lazy ones wait for their trigger pattern. The grammar module
        checked that llama.cpp parses the text, so NULL here is a library failure."""
        text, root = grammar.gbnf.encode(), b"root"
        if grammar.trigger is None:
            sampler = llama_cpp.llama_sampler_init_grammar(self._vocab, text, root)
        else:
            patterns = (ctypes.c_char_p * 1)(grammar.trigger.encode())
            no_tokens = (llama_cpp.llama_token * 1)()
            sampler = llama_cpp.llama_sampler_init_grammar_lazy_patterns(
                self._vocab, text, root, patterns, 1, no_tokens, 0
            )
        if not sampler:
            raise EngineError("llama.cpp refused the request's grammar")
        return sampler

    # --- stepping -------------------------------------------------------------------------

    def step(self) -> list[tuple[int, TokenEvent | Finished]]:
        try:
            return self._step()
        except BaseException:
            for slot in list(self.slots.values()):  # a failed step ends every generation
                self._close(slot, keep=False)
            if self._drafter is not None:
                self._drafter.reset()
            raise

    def _step(self) -> list[tuple[int, TokenEvent | Finished]]:
        events: list[tuple[int, TokenEvent | Finished]] = []
        for slot in list(self.slots.values()):
            if slot.cancelled():
                events.extend(self._finish(slot, "cancelled"))
        if not self.slots:
            return events
        self._fit_step()
        plan = self._plan()
        started = time.perf_counter()
        if (code := self._decode(plan)) != 0:
            raise EngineError(f"llama_decode failed ({code})")
        if len(plan) == 1 and not plan[0].prefill:  # one generation's step: a clean measurement
            seconds, only = time.perf_counter() - started, plan[0]
            self._costs.observe(len(only.slot.held), len(only.tokens), seconds)
        for part in plan:
            events.extend(self._advance(part))
        return events

    def _plan(self) -> list[Planned]:
        """Decoding slots first (one token, plus drafts), then prompt chunks in what is left."""
        running = [s for s in self.slots.values() if not s.suspended]
        decoding = [s for s in running if not s.pending]
        drafts = self._all_drafts(decoding, self.n_batch - len(decoding))
        plan: list[Planned] = []
        start = 0
        for slot in decoding:
            assert slot.last is not None
            tokens = [slot.last, *drafts.get(slot.seq, ())]
            plan.append(Planned(slot, start, tokens, prefill=False))
            start += len(tokens)
        # Shortest prompts first: a short request joining an agent's long prefill is computed
        # in the same step, not after it; while any generation decodes, prompts get a smaller
        # share of the step, so it keeps decoding at a useful pace.
        end = self.n_batch if not decoding else min(self.n_batch, start + MIXED_PREFILL)
        for slot in sorted((s for s in running if s.pending), key=lambda s: len(s.pending)):
            if start >= end:
                break
            chunk = slot.pending[: self._chunk_limit(slot, end - start)]
            plan.append(Planned(slot, start, chunk, prefill=True))
            start += len(chunk)
        return plan

    @staticmethod
    def _chunk_limit(slot: Slot, budget: int) -> int:
        """Prompt tokens of `slot` for this step: as many as fit, but never past the slot's
        freeze point, and the last prompt token alone in its own step where the slot asks it."""
        alone = slot.last_alone and len(slot.pending) > 1
        limit = min(budget, len(slot.pending) - 1) if alone else budget
        if slot.freeze is not None:
            limit = min(limit, slot.freeze.tokens - len(slot.held))
        return limit

    def _all_drafts(self, decoding: list[Slot], budget: int) -> dict[int, list[int]]:
        """Prompt-lookup drafts where the history repeats itself; the draft model's (if one is
        configured) for the other speculating slots, all in one batched run of it. Each slot's
        pacer decides how many are worth verifying."""
        drafts: dict[int, list[int]] = {}
        wanted: list[DraftRequest] = []
        for slot in decoding:
            limit = self._draft_limit(slot, budget)
            if limit <= 0:
                continue
            assert slot.ngrams is not None
            assert slot.pacer is not None
            assert slot.last is not None
            found = slot.ngrams.draft(limit)
            if not found and self._drafter is None:
                continue
            if found:
                length = slot.pacer.length(len(slot.held), len(found))
            else:
                length = slot.pacer.length(len(slot.held), limit, by_model=True)
            if length <= 0:
                continue
            if found:
                drafts[slot.seq] = found[:length]
            else:
                wanted.append(DraftRequest(slot.seq, [*slot.held, slot.last], length))
            budget -= length
        if wanted:
            assert self._drafter is not None
            drafts.update(self._drafter.draft(wanted))
            if self._drafter.step_seconds is not None:
                self._costs.observe_draft(self._drafter.step_seconds)
        return drafts

    def _draft_limit(self, slot: Slot, budget: int) -> int:
        if slot.ngrams is None or budget <= 0:
            return 0
        left = slot.max_tokens - slot.sampled - 1
        return max(0, min(self.draft_max, budget, left, self.n_ctx - len(slot.held) - 2))

    def _decode(self, plan: list[Planned]) -> int:
        batch = self._batch
        i = 0
        for part in plan:
            position = len(part.slot.held)
            complete = part.prefill and len(part.tokens) == len(part.slot.pending)
            for j, token in enumerate(part.tokens):
                batch.token[i] = token
                batch.pos[i] = position + j
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = part.slot.seq
                last = j == len(part.tokens) - 1
                batch.logits[i] = (not part.prefill) or (complete and last)
                i += 1
        batch.n_tokens = i
        return int(llama_cpp.llama_decode(self._llama._ctx.ctx, batch))

    def _advance(self, part: Planned) -> list[tuple[int, TokenEvent | Finished]]:
        slot = part.slot
        if part.prefill:
            self._hold(slot, part.tokens)
            del slot.pending[: len(part.tokens)]
            point = slot.freeze
            if point is not None and len(slot.held) == point.tokens:
                slot.freeze = None
                point.save(seq_state(self._llama._ctx.ctx, slot.seq), list(slot.held))
            if slot.pending:
                return []
            index = part.start + len(part.tokens) - 1
            return self._take(slot, [index], [])
        drafts = part.tokens[1:]
        slot.drafted += len(drafts)
        indexes = [part.start + j for j in range(len(part.tokens))]
        return self._take(slot, indexes, drafts, decoded=part.tokens)

    def _take(
        self,
        slot: Slot,
        indexes: list[int],
        drafts: list[int],
        decoded: list[int] | None = None,
    ) -> list[tuple[int, TokenEvent | Finished]]:
        """Sample at each batch index while the drafts agree; emit, and detect the end."""
        events: list[tuple[int, TokenEvent | Finished]] = []
        ctx = self._llama._ctx.ctx
        if slot.first is None:
            slot.first = time.perf_counter()
        sampled: list[int] = []
        for k, index in enumerate(indexes):
            if slot.grammar is None:
                token = int(llama_cpp.llama_sampler_sample(slot.sampler, ctx, index))
            else:
                token = self._candidates.sample(slot.sampler, slot.grammar, self._logits(index))
            sampled.append(token)
            if k >= len(drafts) or token != drafts[k]:
                break
        if decoded is not None:
            # The cells of `last` and of the confirmed drafts stay; the rejected ones go.
            keep = decoded[: len(sampled)]
            self._hold(slot, keep)
            if len(keep) < len(decoded):
                llama_cpp.llama_memory_seq_rm(self._memory, slot.seq, len(slot.held), -1)
            slot.accepted += len(sampled) - 1
            if drafts and slot.pacer is not None:
                slot.pacer.record(len(drafts), len(sampled) - 1)
        for k, token in enumerate(sampled):
            reason = self._emit(slot, token, indexes[k], events)
            if reason is not None:
                events.extend(self._finish(slot, reason))
                return events
        slot.last = sampled[-1]
        return events

    def _emit(
        self, slot: Slot, token: int, index: int, events: list[tuple[int, TokenEvent | Finished]]
    ) -> FinishReason | None:
        if llama_cpp.llama_vocab_is_eog(self._vocab, token):
            return "stop"
        slot.sampled += 1
        if slot.ngrams is not None:
            slot.ngrams.extend([token])
        meter = slot.meter
        if meter is not None and meter.observe(self._logits(index)) and meter.thresholds.stop:
            return "stop"
        if slot.params.logprobs is not None:
            slot.logprobs.append(self._logprob(token, index, slot.params.logprobs))
        text = slot.text.feed(self._piece(token))
        if text:
            carried, slot.logprobs = tuple(slot.logprobs), []
            events.append((slot.seq, TokenEvent(text, slot.sampled, carried)))
        if slot.text.stopped:
            return "stop"
        if slot.sampled >= slot.max_tokens:
            return "length"
        return None

    def _finish(self, slot: Slot, reason: FinishReason) -> list[tuple[int, TokenEvent | Finished]]:
        """Close the slot: the text held back for a possible stop string, then `Finished`."""
        events = finish_events(
            slot.seq,
            reason,
            slot.text,
            slot.meter,
            (slot.prompt_tokens, slot.sampled),
            (slot.opened, slot.first),
            (slot.drafted, slot.accepted),
            tuple(slot.logprobs),
        )
        self._close(slot)
        return events

    def _close(self, slot: Slot, keep: bool = True) -> None:
        """End `slot`'s generation. Its cells stay (`keep`), so a later prompt with the same
        start reuses them in place; the memory sequence's are the context's memory anyway."""
        self.slots.pop(slot.seq, None)
        _free_samplers(slot)
        if slot.seq != MEMORY_SEQ:
            if keep:
                self._idle[slot.seq] = slot.held
            else:
                self._drop(slot.seq)
            if self._drafter is not None:
                self._drafter.release(slot.seq)

    def _drop(self, seq: int) -> None:
        llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1)

    def _hold(self, slot: Slot, tokens: list[int]) -> None:
        start = len(slot.held)
        slot.held.extend(tokens)
        if slot.seq == MEMORY_SEQ:  # what `Llama` believes the context holds
            llama = self._llama
            llama.input_ids[start : start + len(tokens)] = tokens
            llama.n_tokens = len(slot.held)

    # --- text -----------------------------------------------------------------------------

    def _logits(self, index: int) -> npt.NDArray[np.float32]:
        pointer = llama_cpp.llama_get_logits_ith(self._llama._ctx.ctx, index)
        return np.ctypeslib.as_array(pointer, shape=(self._n_vocab,))

    def _logprob(self, token: int, index: int, alternatives: int) -> TokenLogprob:
        """`token`'s log-probability at batch `index`, and the `alternatives` most likely."""
        logits = self._logits(index).astype(np.float64)
        peak = float(logits.max())
        log_total = peak + float(np.log(np.exp(logits - peak).sum()))
        top: tuple[TokenLogprob, ...] = ()
        if alternatives > 0:
            best = np.argpartition(-logits, alternatives - 1)[:alternatives]
            best = best[np.argsort(-logits[best], kind="stable")]
            top = tuple(self._entry(int(t), float(logits[t]) - log_total) for t in best)
        return self._entry(token, float(logits[token]) - log_total, top)

    def _entry(
        self, token: int, logprob: float, top: tuple[TokenLogprob, ...] = ()
    ) -> TokenLogprob:
        piece = self._piece(token)
        return TokenLogprob(piece.decode("utf-8", errors="replace"), logprob, tuple(piece), top)

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            buffer = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, 64, 0, False)
            piece = buffer.raw[: max(0, n)]
            self._pieces[token] = piece
        return piece

    def _text(self, token: int) -> str:
        return self._piece(token).decode("utf-8", errors="ignore")


def seq_state(ctx: Any, seq: int) -> bytearray:
    """A copy of one sequence's raw state (its KV cells; llama.cpp's sequence state format)."""
    size = int(llama_cpp.llama_state_seq_get_size(ctx, seq))
    raw = bytearray(size)
    buffer = (ctypes.c_uint8 * size).from_buffer(raw)
    written = int(llama_cpp.llama_state_seq_get_data(ctx, buffer, size, seq))
    if written > size:
        raise EngineError("llama.cpp wrote more state than it announced")
    del buffer
    del raw[written:]
    return raw


def _free_samplers(slot: Slot) -> None:
    llama_cpp.llama_sampler_free(slot.sampler)
    if slot.grammar is not None:
        llama_cpp.llama_sampler_free(slot.grammar)
