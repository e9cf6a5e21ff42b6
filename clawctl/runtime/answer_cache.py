"""The answer cache: finished answers reused for the same question, exactly or by meaning.

A request's key has two parts. The *scope* is everything that must be identical for an answer to
carry over: endpoint, model or policy, adapters, sampling settings, JSON mode, and for a chat
every turn but the last. The *text* is the last message (or the completion prompt): an identical
text is an exact hit; otherwise the embedding of the text is compared with the stored texts of the
same scope, and a cosine similarity at or above the threshold is a semantic hit - provided both
texts hold the same numbers, since "what is 17 times 3" and "what is 17 times 4" embed almost
alike but must not share an answer.

Entries live in memory, least recently used first out, within a count, a byte budget and a time
to live. Everything runs on the daemon's event loop thread, so nothing here locks.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from clawctl.engines.base import ChatTurn, FinishReason, Prompt, SamplingParams
from clawctl.schemas.openai import ClawInfo

if TYPE_CHECKING:
    import numpy as np

ENTRY_OVERHEAD = 512  # bytes of bookkeeping counted per entry besides its text and vector
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


@dataclass(frozen=True)
class CacheKey:
    scope: str  # digest of what must match exactly
    exact: str  # digest of scope and text
    text: str  # compared by meaning

    @property
    def numbers(self) -> tuple[str, ...]:
        return tuple(sorted(_NUMBER.findall(self.text)))


def request_key(
    endpoint: str,
    model: str,
    prompt: Prompt,
    params: SamplingParams,
    adapters: tuple[tuple[str, float], ...],
    json_mode: bool,
    routing: tuple[str | int | None, ...] = (),
) -> CacheKey:
    """The cache key of a generation request (see the module docstring). `routing` holds what
    a policy's rules may match besides the prompt (impact, app, uid): for a request routed by a
    policy these choose tiers, adapters and sampling, so they are part of the scope."""
    if prompt.chat is not None:
        *context, last = prompt.chat
        text = last.content
        turns = [_turn_key(t) for t in context] + [
            [last.role] if last.tool_call_id is None else [last.role, last.tool_call_id]
        ]
    else:
        text = prompt.text if prompt.text is not None else json.dumps(list(prompt.tokens or ()))
        turns = []
    settings = asdict(params)
    settings.pop("speculative", None)  # drafting does not change greedy output
    scope = {
        "endpoint": endpoint,
        "model": model,
        "adapters": [list(a) for a in adapters],  # (digest or name, scale)
        "json": json_mode,
        "params": settings,
        "turns": turns,
        "tokens": prompt.tokens is not None,
        "tools": [asdict(tool) for tool in prompt.tools],
        "routing": list(routing),
    }
    scope_digest = _digest(json.dumps(scope, sort_keys=True, default=str))
    return CacheKey(scope_digest, _digest(scope_digest + "\0" + text), text)


def _turn_key(turn: ChatTurn) -> list[object]:
    """A context turn as the key sees it: calls and the call a result answers change the
    prompt the template renders, so they are part of the scope."""
    key: list[object] = [turn.role, turn.content]
    if turn.tool_calls or turn.tool_call_id is not None:
        key += [[asdict(call) for call in turn.tool_calls], turn.tool_call_id]
    return key


def deterministic(params: SamplingParams) -> bool:
    """Greedy or seeded: the same request gives the same answer, so it may be shared."""
    return params.temperature == 0 or params.seed is not None


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class StoredAnswer:
    """What a hit answers with: the original's text, ending, token counts and `claw` info."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    info: ClawInfo
    request_id: str
    tier: str | None  # the `x-claw-tier` of the original, if routed


@dataclass(frozen=True)
class Hit:
    answer: StoredAnswer
    kind: str  # "exact" or "semantic"
    similarity: float


@dataclass
class _Entry:
    key: CacheKey
    answer: StoredAnswer
    vector: np.ndarray | None
    expires: float
    size: int


@dataclass
class CacheStats:
    exact_hits: int = 0
    semantic_hits: int = 0
    misses: int = 0
    near_misses: int = 0  # similar enough, but the numbers differed
    evictions: int = 0


@dataclass
class AnswerCache:
    max_entries: int
    max_bytes: int
    ttl_seconds: float
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self) -> None:
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._scopes: dict[str, dict[str, _Entry]] = {}
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _now(self) -> float:
        return self.clock()

    def get(self, key: CacheKey) -> Hit | None:
        """An exact hit, freshened as most recently used."""
        entry = self._entries.get(key.exact)
        if entry is None or self._expired(entry):
            return None
        self._entries.move_to_end(key.exact)
        self.stats.exact_hits += 1
        return Hit(entry.answer, "exact", 1.0)

    def has_scope(self, key: CacheKey) -> bool:
        """Whether any stored text could match semantically (else embedding is pointless)."""
        return bool(self._scopes.get(key.scope))

    def nearest(self, key: CacheKey, vector: np.ndarray, threshold: float) -> Hit | None:
        """The most similar stored text of the key's scope at or above `threshold` with the
        same numbers, or None (counted as a miss)."""
        import numpy as np

        stored = list(self._scopes.get(key.scope, {}).values())
        candidates = [e for e in stored if e.vector is not None and not self._expired(e)]
        if candidates:
            matrix = np.stack([e.vector for e in candidates if e.vector is not None])
            sims = matrix @ vector.astype(np.float32)
            for index in np.argsort(-sims):
                similarity = float(sims[index])
                if similarity < threshold:
                    break
                entry = candidates[int(index)]
                if entry.key.numbers != key.numbers:
                    self.stats.near_misses += 1
                    continue
                self._entries.move_to_end(entry.key.exact)
                self.stats.semantic_hits += 1
                return Hit(entry.answer, "semantic", similarity)
        self.stats.misses += 1
        return None

    def miss(self) -> None:
        self.stats.misses += 1

    def put(self, key: CacheKey, answer: StoredAnswer, vector: np.ndarray | None) -> None:
        self._drop(key.exact)
        size = ENTRY_OVERHEAD + len(answer.text.encode()) + len(key.text.encode())
        size += 0 if vector is None else int(vector.nbytes)
        if size > self.max_bytes:
            return
        entry = _Entry(key, answer, vector, self._now() + self.ttl_seconds, size)
        self._entries[key.exact] = entry
        self._scopes.setdefault(key.scope, {})[key.exact] = entry
        self.bytes += size
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            oldest = next(iter(self._entries))
            self._drop(oldest)
            self.stats.evictions += 1

    def _expired(self, entry: _Entry) -> bool:
        if entry.expires > self._now():
            return False
        self._drop(entry.key.exact)
        return True

    def _drop(self, exact: str) -> None:
        entry = self._entries.pop(exact, None)
        if entry is None:
            return
        self.bytes -= entry.size
        scope = self._scopes.get(entry.key.scope)
        if scope is not None:
            scope.pop(exact, None)
            if not scope:
                del self._scopes[entry.key.scope]

    def clear(self) -> int:
        count = len(self._entries)
        self._entries.clear()
        self._scopes.clear()
        self.bytes = 0
        return count
