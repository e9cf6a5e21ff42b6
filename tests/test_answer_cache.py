"""The answer cache's rules without a daemon: keys, exact and semantic hits, the numbers guard,
LRU, byte budget and time to live."""

from __future__ import annotations

import numpy as np

from clawctl.engines.base import ChatTurn, Prompt, SamplingParams
from clawctl.runtime.answer_cache import (
    AnswerCache,
    CacheKey,
    StoredAnswer,
    deterministic,
    request_key,
)
from clawctl.schemas.openai import ClawInfo, Timings

GREEDY = SamplingParams(temperature=0.0, max_tokens=32)


def _chat(*turns: tuple[str, str]) -> Prompt:
    return Prompt(chat=tuple(ChatTurn(role, content) for role, content in turns))


def _key(text: str, **changes: object) -> CacheKey:
    params = changes.pop("params", GREEDY)
    assert isinstance(params, SamplingParams)
    model = str(changes.pop("model", "smollm2-135m"))
    system = str(changes.pop("system", "You are terse."))
    return request_key("chat", model, _chat(("system", system), ("user", text)), params, (), False)


def _answer(text: str, request_id: str = "r1") -> StoredAnswer:
    timings = Timings(
        queue_ms=0,
        load_ms=0,
        prompt_ms=1,
        decode_ms=1,
        total_ms=2,
        prompt_tokens_per_s=None,
        decode_tokens_per_s=None,
    )
    info = ClawInfo(
        model="smollm2-135m", digest=None, profile="x", request_id=request_id, timings=timings
    )
    return StoredAnswer(text, "stop", 10, 5, info, request_id, None)


def _unit(seed: int, near: np.ndarray | None = None, noise: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vector = rng.normal(size=384).astype(np.float32) if near is None else near.copy()
    vector += noise * rng.normal(size=384).astype(np.float32)
    return vector / np.linalg.norm(vector)


def test_scope_separates_what_must_match_exactly() -> None:
    base = _key("What is the capital of France?")
    assert base == _key("What is the capital of France?")
    assert base.text == "What is the capital of France?"
    for other in (
        _key("What is the capital of France?", model="qwen2.5-coder-0.5b"),
        _key("What is the capital of France?", system="You are verbose."),
        _key("What is the capital of France?", params=SamplingParams(temperature=0.0)),
    ):
        assert other.scope != base.scope
        assert other.exact != base.exact
    paraphrase = _key("Which city is the capital of France?")
    assert paraphrase.scope == base.scope
    assert paraphrase.exact != base.exact
    drafting_off = request_key(
        "chat",
        "smollm2-135m",
        _chat(("system", "You are terse."), ("user", "What is the capital of France?")),
        SamplingParams(temperature=0.0, max_tokens=32, speculative=False),
        (),
        False,
    )
    assert drafting_off == base  # prompt lookup does not change a greedy answer


def test_deterministic_means_greedy_or_seeded() -> None:
    assert deterministic(GREEDY)
    assert deterministic(SamplingParams(temperature=0.7, seed=3))
    assert not deterministic(SamplingParams(temperature=0.7))


def test_exact_then_semantic_hits_and_the_numbers_guard() -> None:
    cache = AnswerCache(max_entries=10, max_bytes=1 << 20, ttl_seconds=60)
    stored = _key("What is 17 times 3?")
    vector = _unit(1)
    cache.put(stored, _answer("51"), vector)
    hit = cache.get(stored)
    assert hit is not None
    assert hit.kind == "exact"
    assert hit.answer.text == "51"

    reworded = _key("what is 17 times 3 ?")
    assert cache.get(reworded) is None
    close = _unit(2, near=vector, noise=0.002)
    assert float(close @ vector) > 0.998
    hit = cache.nearest(reworded, close, 0.998)
    assert hit is not None
    assert hit.kind == "semantic"
    assert hit.similarity > 0.998

    other_number = _key("What is 17 times 4?")
    assert cache.nearest(other_number, close, 0.998) is None  # same meaning, other number
    assert cache.stats.near_misses == 1

    far = _unit(3, near=vector, noise=0.2)
    assert cache.nearest(reworded, far, 0.998) is None
    assert cache.stats.exact_hits == 1
    assert cache.stats.semantic_hits == 1


def test_semantic_lookup_stays_in_scope() -> None:
    cache = AnswerCache(max_entries=10, max_bytes=1 << 20, ttl_seconds=60)
    vector = _unit(4)
    cache.put(_key("Name a prime number."), _answer("7"), vector)
    other_model = _key("Name a prime number!", model="qwen2.5-coder-0.5b")
    assert not cache.has_scope(other_model)
    assert cache.nearest(other_model, vector, 0.5) is None


def test_lru_count_and_byte_budgets() -> None:
    cache = AnswerCache(max_entries=2, max_bytes=1 << 20, ttl_seconds=60)
    keys = [_key(f"question {name}") for name in ("a", "b", "c")]
    cache.put(keys[0], _answer("A"), None)
    cache.put(keys[1], _answer("B"), None)
    assert cache.get(keys[0]) is not None  # a is now the most recently used
    cache.put(keys[2], _answer("C"), None)
    assert cache.get(keys[1]) is None
    assert cache.get(keys[0]) is not None
    assert len(cache) == 2
    assert cache.stats.evictions == 1

    small = AnswerCache(max_entries=100, max_bytes=4096, ttl_seconds=60)
    for index in range(10):
        small.put(_key(f"q{index}"), _answer("x" * 1000), None)
    assert small.bytes <= 4096
    assert 0 < len(small) < 10
    small.put(_key("huge"), _answer("y" * 10_000), None)  # larger than the whole budget
    assert small.get(_key("huge")) is None
    assert small.bytes <= 4096


def test_entries_expire() -> None:
    now = [100.0]
    cache = AnswerCache(max_entries=10, max_bytes=1 << 20, ttl_seconds=5, clock=lambda: now[0])
    key = _key("How long do entries live?")
    cache.put(key, _answer("5 s"), _unit(5))
    assert cache.get(key) is not None
    now[0] += 6
    assert cache.get(key) is None
    assert not cache.has_scope(key)
    assert cache.bytes == 0
