"""Draft-model speculative decoding: a smaller model with the same vocabulary proposes tokens.

The draft model has its own llama.cpp context with one KV stream per sequence of the target's
context (same sequence ids). Before a step, each sequence that wants drafts is brought up to the
target's history (the prompt on first use, then the tokens the target confirmed), and the draft
model decodes greedily, batched across sequences, until it has `limit` tokens or its own top
token is less likely than `p_min` (a draft it is unsure of is mostly rejected, and a rejected
draft costs the target nearly a whole step on a small CPU). The target verifies the drafts in its
own batched decode (llama_slots.py); what the target rejects is dropped from the draft's cells on
the next call, which compares histories rather than trusting bookkeeping.

Runs on the target model's thread (one thread per model: see scheduler.py).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import llama_cpp
import numpy as np

from clawctl.engines.base import EngineSettings
from clawctl.engines.decoding import DraftRequest
from clawctl.engines.llama.load import load_llama
from clawctl.errors import EngineError

# The draft stops where its own top token is less likely than this (llama.cpp's --draft-p-min).
P_MIN = 0.75


def vocabulary_mismatch(target: llama_cpp.Llama, draft: llama_cpp.Llama) -> str | None:
    """Why `draft` cannot draft for `target`, or None: token ids must mean the same text."""
    a, b = target._model.vocab, draft._model.vocab
    n_a, n_b = int(target.n_vocab()), int(draft.n_vocab())
    if n_a != n_b:
        return f"{n_b} tokens vs {n_a}"
    if llama_cpp.llama_vocab_type(a) != llama_cpp.llama_vocab_type(b):
        return "a different tokenizer type"
    for token in range(n_a):
        if llama_cpp.llama_vocab_get_text(a, token) != llama_cpp.llama_vocab_get_text(b, token):
            return f"token {token} differs"
    return None


class DraftModel:
    """A draft model's context, one sequence per target sequence."""

    def __init__(self, path: Path, target: llama_cpp.Llama, settings: EngineSettings) -> None:
        self._check_vocabulary(path, target)
        self._llama = load_llama(path, settings, "the draft model ([drafts] in clawd.toml)")
        self._ctx = self._llama._ctx.ctx
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._n_vocab = int(self._llama.n_vocab())
        self.n_batch = settings.n_batch
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._held: dict[int, list[int]] = {}  # per sequence: tokens whose cells it holds
        # The last `draft` call's seconds per drafting step (one token per sequence; catching
        # up with a prompt excluded), None if it drafted past no first token.
        self.step_seconds: float | None = None

    @staticmethod
    def _check_vocabulary(path: Path, target: llama_cpp.Llama) -> None:
        """Refuse a draft whose token ids mean other text, before its weights are loaded."""
        try:
            vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise EngineError(
                f"llama.cpp could not read the draft model ([drafts] in clawd.toml): {exc}"
            ) from None
        try:
            mismatch = vocabulary_mismatch(target, vocab)
        finally:
            vocab.close()
        if mismatch is not None:
            raise EngineError(
                f"the draft model ([drafts] in clawd.toml) does not share this model's vocabulary "
                f"({mismatch})"
            )

    @property
    def llama(self) -> llama_cpp.Llama:
        return self._llama

    def close(self) -> None:
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        with contextlib.suppress(Exception):
            self._llama.close()

    def release(self, seq: int) -> None:
        """The target's sequence ended: free its cells."""
        llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1)
        self._held.pop(seq, None)

    def reset(self) -> None:
        """Forget every sequence (after a failed step, or when the target context was replaced)."""
        llama_cpp.llama_memory_clear(self._memory, True)
        self._held.clear()

    def draft(self, requests: list[DraftRequest]) -> dict[int, list[int]]:
        """Greedy drafts for each request, decoded together."""
        drafts: dict[int, list[int]] = {r.seq: [] for r in requests}
        limits = {r.seq: r.limit for r in requests}
        pending = {r.seq: self._sync(r.seq, r.history) for r in requests}
        # Catch up with the target (a new prompt, or the tokens confirmed since the last call);
        # the last token of each history is decoded with logits: the first draft follows it.
        firsts = self._decode_pending(pending)
        going = self._accept(firsts, drafts, limits)
        started, steps = time.perf_counter(), 0
        while going:
            tokens = {seq: [drafts[seq][-1]] for seq in going}
            going = self._accept(self._decode_pending(tokens), drafts, limits)
            steps += 1
        self.step_seconds = (time.perf_counter() - started) / steps if steps else None
        return drafts

    def _sync(self, seq: int, history: list[int]) -> list[int]:
        """Cut `seq`'s cells to the prefix it shares with `history`; what is left to decode."""
        held = self._held.setdefault(seq, [])
        common = 0
        limit = min(len(held), len(history) - 1)  # the last token is always decoded
        if held[:limit] == history[:limit]:
            common = limit
        else:
            while common < limit and held[common] == history[common]:
                common += 1
        if common < len(held):
            llama_cpp.llama_memory_seq_rm(self._memory, seq, common, -1)
            del held[common:]
        return history[common:]

    def _decode_pending(self, pending: dict[int, list[int]]) -> dict[int, int]:
        """Decode each sequence's pending tokens (in n_batch chunks); per sequence, the batch
        index of its last token's logits in the final decode that held it -> read right away."""
        out: dict[int, int] = {}
        queue = {seq: list(tokens) for seq, tokens in pending.items() if tokens}
        batch = self._batch
        while queue:
            i = 0
            last_index: dict[int, int] = {}
            for seq in list(queue):
                room = self.n_batch - i
                if room <= 0:
                    break
                chunk, queue[seq] = queue[seq][:room], queue[seq][room:]
                held = self._held[seq]
                for j, token in enumerate(chunk):
                    batch.token[i] = token
                    batch.pos[i] = len(held) + j
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = seq
                    batch.logits[i] = False
                    i += 1
                held.extend(chunk)
                if not queue[seq]:
                    del queue[seq]
                    batch.logits[i - 1] = True
                    last_index[seq] = i - 1
            batch.n_tokens = i
            if (code := llama_cpp.llama_decode(self._ctx, batch)) != 0:
                raise EngineError(f"llama_decode failed on the draft model ({code})")
            for seq, index in last_index.items():
                out[seq] = self._top(index)
        return out

    def _top(self, index: int) -> int:
        """The draft's greedy token at `index`, or -1 when it is less likely than P_MIN."""
        pointer = llama_cpp.llama_get_logits_ith(self._ctx, index)
        logits = np.ctypeslib.as_array(pointer, shape=(self._n_vocab,))
        best = int(np.argmax(logits))
        probability = 1.0 / float(np.exp(logits - logits[best]).sum())
        return best if probability >= P_MIN else -1

    def _accept(
        self, tops: dict[int, int], drafts: dict[int, list[int]], limits: dict[int, int]
    ) -> list[int]:
        """Add each sequence's new draft token; the sequences that draft on."""
        going = []
        for seq, token in tops.items():
            if token < 0 or llama_cpp.llama_vocab_is_eog(self._llama._model.vocab, token):
                continue
            drafts[seq].append(token)
            if len(drafts[seq]) < limits[seq]:
                going.append(seq)
        return going
