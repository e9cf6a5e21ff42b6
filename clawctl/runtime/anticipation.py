"""Anticipation: what an agent's next call will start with, so clawd computes it while the
agent runs its tool instead of while the agent waits.

An agent's next call re-sends the conversation with the answer just given appended, rendered by
the chat template from the message the client sends back (a tool call re-encoded from its
arguments, not the tokens the model sampled). Some clients also move a turn: OpenClaw keeps a
short context message last and re-appends it after the new turns on every call, so the model's
cells after that message are of no use to the next call. Either way, without anticipation the
next call computes the answer's tokens again, at the full depth of the context (~45 tokens of a
~135-token tool step at 12k tokens of depth), and with it they are computed while the client is
busy with the answer, on the otherwise idle model thread (`ModelWorker._anticipate`, offered
by `GenerationRun.anticipate` once the answer has gone out).

How many trailing turns the next call drops is learned per conversation from the calls it sent
(which of the previous call's turns reappeared before the answer it got); a conversation seen
once is guessed from its shape (two user turns last: the last one is a floating context message,
as OpenClaw sends). The expected prefix is found without knowing the template: the turns kept,
the answer, and a placeholder for the unknown next turn, rendered twice with different
placeholders; the rendered tokens the two share are the expected prefix.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from clawctl.engines.base import ChatTurn, Prompt, ToolCall

# After an answer that calls tools, the computing waits this long for the next call first: an
# agent's fast tool (OpenClaw's `read`) brings it back within a few hundred milliseconds, and a
# chunk at 12k tokens of depth the call would wait for costs it more than the chunk saves. A
# slower tool (a shell command, a web fetch) leaves the time; after a text answer, a person reads.
AFTER_CALLS_SECONDS = 0.5
# Conversations remembered (one fingerprint list each, a few KB at most): an agent's sessions
# come and go; the oldest are forgotten first.
CONVERSATIONS = 64


@dataclass(frozen=True)
class _Conversation:
    turns: tuple[str, ...]  # fingerprints of the last call's turns
    drop: int | None  # trailing turns the next call leaves out, once learned


def _fingerprint(turn: ChatTurn) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for part in (turn.role, turn.content, turn.tool_call_id or "", turn.name or ""):
        digest.update(part.encode("utf-8", "surrogatepass") + b"\0")
    for call in turn.tool_calls:
        digest.update(f"{call.name}\0{call.arguments}\0".encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def _key(model: str, prompt: Prompt, first: str) -> str:
    """A conversation: the model, its first turn and the tools it offers."""
    tools = "\0".join(t.name for t in prompt.tools)
    return hashlib.blake2b(f"{model}\0{first}\0{tools}".encode(), digest_size=16).hexdigest()


def guessed_drop(chat: Sequence[ChatTurn]) -> int:
    """Before a conversation has shown what it drops: a second user turn at the end is taken
    for a context message that floats behind the new turns (OpenClaw's), else nothing."""
    return 1 if len(chat) >= 2 and chat[-1].role == chat[-2].role == "user" else 0


class Anticipator:
    """Learns, per conversation, how its next call continues; says what to compute ahead."""

    def __init__(self, capacity: int = CONVERSATIONS) -> None:
        self._seen: OrderedDict[str, _Conversation] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def learn(self, model: str, prompt: Prompt) -> int | None:
        """Note a call of a conversation; returns how many trailing turns it dropped of the
        call before it (None: no call before it, or none that it continues)."""
        chat = prompt.chat
        if not chat:
            return None
        prints = tuple(_fingerprint(t) for t in chat)
        key = _key(model, prompt, prints[0])
        with self._lock:
            seen = self._seen.pop(key, None)
            drop = seen.drop if seen is not None else None
            learned = None
            if seen is not None:
                kept = 0
                for a, b in zip(seen.turns, prints, strict=False):
                    if a != b:
                        break
                    kept += 1
                if 0 < kept < len(chat) and chat[kept].role == "assistant":
                    learned = drop = len(seen.turns) - kept
            self._seen[key] = _Conversation(prints, drop)
            while len(self._seen) > self._capacity:
                self._seen.popitem(last=False)
        return learned

    def expected(
        self, model: str, prompt: Prompt, content: str, calls: Sequence[ToolCall]
    ) -> tuple[Prompt, Prompt] | None:
        """Two renderings of the expected next call with different unknown last turns (their
        shared tokens are what to compute), or None when there is nothing to expect."""
        chat = prompt.chat
        if not chat:
            return None
        key = _key(model, prompt, _fingerprint(chat[0]))
        with self._lock:
            seen = self._seen.get(key)
            drop = seen.drop if seen is not None and seen.drop is not None else guessed_drop(chat)
        if drop >= len(chat):
            return None
        answer = ChatTurn("assistant", content, tuple(calls))
        kept = (*chat[: len(chat) - drop], answer)
        if calls:  # the next turn answers the first call
            after = [ChatTurn("tool", text, tool_call_id=calls[0].id) for text in ("0", "1")]
        else:
            after = [ChatTurn("user", text) for text in ("0", "1")]
        first, second = (Prompt(chat=(*kept, turn), tools=prompt.tools) for turn in after)
        return first, second
