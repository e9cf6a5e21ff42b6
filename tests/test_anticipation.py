"""Anticipation: learning how a conversation's next call continues, and computing that prefix on
the idle model thread, in chunks a waiting job always interrupts (fake engine; the real model
is in tests/test_tool_calling.py)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

from clawctl.engines.base import ChatTurn, Prompt, SamplingParams, ToolCall, ToolSpec
from clawctl.runtime.anticipation import Anticipator, guessed_drop
from clawctl.runtime.fair_queue import FairQueue
from clawctl.runtime.jobs import Anticipation, Job, JobEvent
from clawctl.runtime.manager import ModelManager
from clawctl.runtime.worker import ANTICIPATE_CHUNK
from tests.fakes import FakeEngine, FakeLoader
from tests.test_scheduler import collect, manager

SYSTEM = ChatTurn("system", "You are an agent.")
TOOLS = (ToolSpec("read", "Read a file.", '{"type": "object"}'),)
CALL = ToolCall("call_1", "read", '{"path": "a.txt"}')


def _prompt(*turns: ChatTurn) -> Prompt:
    return Prompt(chat=(SYSTEM, *turns), tools=TOOLS)


def test_a_floating_context_turn_is_guessed_then_learned() -> None:
    ask, context = ChatTurn("user", "read a.txt"), ChatTurn("user", "(it is Monday)")
    anticipator = Anticipator()
    first = _prompt(ask, context)
    assert anticipator.learn("m", first) is None  # nothing before it
    assert guessed_drop(first.chat or ()) == 1
    expected = anticipator.expected("m", first, "", [CALL])
    assert expected is not None
    a, b = expected
    assert a.tools == TOOLS
    assert a.chat is not None
    assert b.chat is not None
    # the context turn left out, the call appended, then the unknown tool result
    assert a.chat[:3] == (SYSTEM, ask, ChatTurn("assistant", "", (CALL,)))
    assert a.chat[3].role == b.chat[3].role == "tool"
    assert a.chat[3].tool_call_id == "call_1"
    assert a.chat[3].content != b.chat[3].content

    answered = ChatTurn("assistant", "", (CALL,))
    second = _prompt(ask, answered, ChatTurn("tool", "42", tool_call_id="call_1"), context)
    assert anticipator.learn("m", second) == 1  # the context turn moved behind the new ones


def test_a_client_that_keeps_every_turn_is_learned() -> None:
    ask = ChatTurn("user", "hello")
    anticipator = Anticipator()
    anticipator.learn("m", _prompt(ask))
    answer = ChatTurn("assistant", "hi")
    follow_up = _prompt(ask, answer, ChatTurn("user", "and then?"), ChatTurn("user", "more"))
    assert anticipator.learn("m", follow_up) == 0
    expected = anticipator.expected("m", follow_up, "sure", [])
    assert expected is not None
    chat = expected[0].chat
    assert chat is not None
    # learned 0 beats the shape (two user turns last would guess 1)
    assert chat[:-1] == (*(follow_up.chat or ()), ChatTurn("assistant", "sure"))
    assert chat[-1].role == "user"


def test_conversations_are_told_apart_and_bounded() -> None:
    anticipator = Anticipator(capacity=2)
    first = _prompt(ChatTurn("user", "x"))
    anticipator.learn("m", first)
    anticipator.learn("other-model", first)  # another conversation
    anticipator.learn("m", Prompt(chat=(ChatTurn("system", "else"),)))  # forgets the first
    answered = _prompt(ChatTurn("user", "x"), ChatTurn("assistant", "y"), ChatTurn("user", "z"))
    assert anticipator.learn("m", answered) is None  # nothing remembered to compare with
    assert anticipator.expected("m", Prompt(text="raw"), "a", []) is None


def test_the_queue_offers_idle_work_only_when_no_job_waits() -> None:
    queue = FairQueue()
    old = Anticipation((Prompt(text="a"), Prompt(text="b")))
    new = Anticipation((Prompt(text="c"), Prompt(text="d")))
    queue.anticipate(old)
    queue.anticipate(new)  # replaces the older offer
    assert queue.take(wait=True) is None  # wakes the consumer for it
    assert queue.take_idle() is new
    assert queue.take_idle() is None
    job = Job(Prompt(text="x"), SamplingParams(), asyncio.new_event_loop(), asyncio.Queue())
    queue.put(job)
    queue.anticipate(old)  # offered while a job waits (it would not be, but to be sure)
    assert queue.has_jobs()
    assert queue.take_idle() is None  # a job waits: the idle work is dropped
    assert queue.take(wait=False) is job
    job.loop.close()


def _words(n: int, stem: str) -> str:
    return " ".join(f"{stem}{i}" for i in range(n))


def _wait(condition: object, what: str) -> None:
    assert callable(condition)
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _expected(history: str, answer_words: int) -> Anticipation:
    """The history, an answer of `answer_words` words, then an unknown turn ("p" or "q")."""
    turns = (ChatTurn("user", history), ChatTurn("assistant", _words(answer_words, "a")))
    first, second = (Prompt(chat=(*turns, ChatTurn("user", tail))) for tail in ("p", "q"))
    return Anticipation((first, second))


def test_the_worker_computes_the_expected_prefix_in_chunks() -> None:
    loader = FakeLoader()
    history = _words(80, "h")  # the fake engine: one token per word

    async def scenario() -> None:
        mgr = manager(loader, ["a"])
        await collect(mgr, "a", history, max_tokens=1)  # the memory sequence holds the history
        expected = _expected(history, 40)
        mgr.anticipate("a", expected)
        await asyncio.to_thread(
            _wait, lambda: mgr.loaded()[0].anticipated_tokens == 40, "the anticipation"
        )
        [engine] = loader.engines
        assert engine.prefills == [80 + ANTICIPATE_CHUNK, 120]  # "p"/"q" left out
        assert len(engine.threads) == 1  # on the model's own thread
        mgr.anticipate("missing", expected)
        assert [m.name for m in mgr.loaded()] == ["a"]  # never loads a model for it
        await mgr.stop()

    asyncio.run(scenario())


async def _holding(loader: FakeLoader, history: str) -> tuple[ModelManager, FakeEngine]:
    """Model "a" loaded, its memory sequence holding `history` (one token per word)."""
    mgr = manager(loader, ["a"])
    await collect(mgr, "a", history, max_tokens=1)
    [engine] = loader.engines
    return mgr, engine


def test_a_waiting_job_interrupts_the_anticipation() -> None:
    loader = FakeLoader()
    history = _words(80, "h")

    async def scenario() -> None:
        mgr, engine = await _holding(loader, history)
        loop = asyncio.get_running_loop()
        arrived: list[concurrent.futures.Future[list[JobEvent]]] = []

        def job_arrives() -> None:  # a request comes in while the first chunk is computed
            if not arrived:
                request = collect(mgr, "a", "new request", max_tokens=1)
                arrived.append(asyncio.run_coroutine_threadsafe(request, loop))
                _wait(lambda: mgr.loaded()[0].queued_requests > 0, "the request to queue")

        engine.on_prefill = job_arrives
        mgr.anticipate("a", _expected(history, 100))
        await asyncio.to_thread(_wait, lambda: bool(arrived), "the request")
        events = await asyncio.wrap_future(arrived[0])
        assert events
        assert engine.prefills == [80 + ANTICIPATE_CHUNK]  # stopped after one chunk
        assert mgr.loaded()[0].anticipated_tokens == ANTICIPATE_CHUNK
        await mgr.stop()

    asyncio.run(scenario())


def test_a_stop_interrupts_the_anticipation() -> None:
    """Unloading the model (or clawd stopping) does not wait for idle-time work to finish."""
    loader = FakeLoader()
    history = _words(80, "h")

    async def scenario() -> None:
        mgr, engine = await _holding(loader, history)
        worker = mgr._workers["a"]
        engine.on_prefill = worker.stop  # the stop comes while the first chunk is computed
        mgr.anticipate("a", _expected(history, 100))
        await asyncio.to_thread(_wait, lambda: not worker.is_alive(), "the model thread to end")
        assert engine.prefills == [80 + ANTICIPATE_CHUNK]  # no chunk after the stop
        assert engine.closed
        await mgr.stop()

    asyncio.run(scenario())


def test_idle_work_after_a_call_waits_for_the_next_request_first() -> None:
    """After an answer that calls tools the work is due only later: a job arriving meanwhile
    is taken first and outdates it; one that does not arrive leaves it to run once due."""
    queue = FairQueue()
    loop = asyncio.new_event_loop()
    prompts = (Prompt(text="a"), Prompt(text="b"))
    queue.anticipate(Anticipation(prompts, (), time.monotonic() + 60))
    assert queue.take_idle() is None  # not due: kept
    job = Job(Prompt(text="x"), SamplingParams(), loop, asyncio.Queue())
    threading.Timer(0.05, queue.put, (job,)).start()
    assert queue.take(wait=True) is job  # the request came back first
    assert queue._idle is None  # ...and outdated the work
    due = Anticipation(prompts, (), time.monotonic() + 0.05)
    queue.anticipate(due)
    assert queue.take(wait=True) is None  # woken once it is due
    assert queue.take_idle() is due
    loop.close()
