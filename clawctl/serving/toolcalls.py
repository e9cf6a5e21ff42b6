"""Tool calls out of generated text: the `<tool_call>{json}</tool_call>` markup a model writes
(Hermes / Qwen2.5 syntax) turned into content text and structured calls.

Pure text processing, shared by the OpenAI face and the Ollama face, so it knows nothing of
HTTP or wire shapes. `ToolCallParser` is the streaming form and `parse_tool_calls` the
whole-text form; they are the same machine, so a streamed answer and the same answer returned at
once always agree, however the text was cut into pieces.

Rules, in the order a reader of the output meets them:

- Text outside a call is content, released as soon as it cannot be the start of `<tool_call>`:
  only the longest suffix that is a proper prefix of the open tag (say "<to") is held back.
- A content *segment* is the text between two calls (or the start / the end and a call). A
  segment that is only whitespace is dropped when a call is next to it, so the newlines a model
  puts around its calls never become content; a whitespace-only answer without calls is kept.
  While a segment is still all whitespace it is held back, since a call may follow it. A
  segment with any other text is kept verbatim, its own whitespace included.
- A call that does not parse (bad JSON, unknown name, wrong types) is content, markup included,
  so nothing the model wrote is lost; it is not counted and does not end its segment.
- At `finish()` an unterminated call (token limit, or a stop string that ate the close tag) is
  a call if its body alone is a valid call, else content.
- A body with no close tag within `MAX_CALL_CHARS` characters is given up as content, so the
  buffer stays bounded whatever the model writes.
- An answer that starts with `{` or a code fence is held whole: small models (Qwen2.5-Coder-0.5B
  among them) often write a call as a bare `{"name": ..., "arguments": ...}` object without the
  tags when nothing constrains them (`tool_choice: auto`). If the whole answer is one valid call
  it is that call, else it is parsed by the rules above, as llama.cpp's Hermes parser does.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, TypeAlias

from clawctl.engines.base import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, ToolCall

MAX_CALL_CHARS = 1_000_000  # longest body between the tags before it is given up as content

# A fenced body; the opening fence may be missing: a bare call that began the answer is
# constrained from its `{` on, and the grammar then lets it close the fence it may have opened.
_FENCE = re.compile(r"\A(?:```[A-Za-z0-9_-]*[ \t]*\r?\n?)?(.*?)\s*```\Z", re.DOTALL)


@dataclass(frozen=True)
class ContentDelta:
    """Ordinary text, for the client's `content`."""

    text: str


@dataclass(frozen=True)
class CallStart:
    """A new call: OpenAI streaming sends {index, id, type, function.name} before arguments."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class CallArguments:
    """(Part of) the arguments JSON text of call `index`; today always all of it at once."""

    index: int
    text: str


ToolEvent: TypeAlias = ContentDelta | CallStart | CallArguments


def _reject_constant(value: str) -> Any:
    """NaN and Infinity are not JSON: arguments re-serialised with them would not parse."""
    raise ValueError(f"not JSON: {value}")


def _load(text: str) -> Any:
    # strict=False: models write raw newlines and tabs inside strings; accept what they meant.
    return json.loads(text, strict=False, parse_constant=_reject_constant)


def _parse_body(body: str, names: frozenset[str] | None) -> tuple[str, str] | None:
    """(name, arguments JSON) of a call body, or None when it is not a call we accept."""
    text = body.strip()
    fenced = _FENCE.match(text)
    if fenced is not None:
        text = fenced.group(1).strip()
    try:
        obj = _load(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name or (names is not None and name not in names):
        return None
    args = obj["arguments"] if "arguments" in obj else obj.get("parameters")
    if args is None:  # missing, or an explicit null: a call without arguments
        args = {}
    elif isinstance(args, str):  # some models double-encode; accept when it holds an object
        try:
            args = _load(args)
        except (ValueError, RecursionError):
            return None
    if not isinstance(args, dict):
        return None
    try:
        return name, json.dumps(args, ensure_ascii=False)
    except RecursionError:
        return None


def _held_prefix_len(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ToolCallParser:
    """Streaming: feed() the generated text piece by piece, then finish() once.

    Events are returned in output order; a call's `CallStart` always comes just before its
    `CallArguments`. `names` (None: any name) limits the calls accepted to the tools offered.
    """

    def __init__(self, names: frozenset[str] | None, id_prefix: str) -> None:
        self.names = names
        self.id_prefix = id_prefix
        self.calls: list[ToolCall] = []  # every call parsed so far
        self._buf = ""  # outside: the held-back prefix of the open tag; inside: the body so far
        self._inside = False
        self._search_from = 0  # inside: no close tag starts before this index of the body
        self._pending_ws = ""  # the current segment so far, while it is all whitespace
        self._segment_has_text = False
        self._content: list[str] = []
        self._finished = False
        self._bare: bool | None = None  # the answer may be a bare call (None: not known yet)
        self._head = ""  # the answer's start while `_bare` is not False

    @property
    def content(self) -> str:
        """All `ContentDelta` text emitted so far, joined."""
        return "".join(self._content)

    def feed(self, text: str) -> list[ToolEvent]:
        """Take the next piece of generated text; return the events it decides."""
        if self._finished:
            raise RuntimeError("ToolCallParser.feed() after finish()")
        if self._bare is not False:
            self._head += text
            start = self._head.lstrip()
            if not start:
                return []  # only whitespace yet: the answer's first character decides
            if start[0] in "{`" and len(self._head) <= MAX_CALL_CHARS:
                self._bare = True
                return []
            self._bare, text, self._head = False, self._head, ""
        return self._run(text)

    def _run(self, text: str) -> list[ToolEvent]:
        events: list[ToolEvent] = []
        self._buf += text
        while self._step(events):
            pass
        return events

    def finish(self) -> list[ToolEvent]:
        """The text has ended: decide everything still held back."""
        if self._bare is not False:
            head, self._head, self._bare = self._head, "", False
            events: list[ToolEvent] = []
            if head.strip() and self._try_call(head.strip(), events):
                self._finished = True
                return events
            events = self._run(head)
            return events + self._finish_rest()
        return self._finish_rest()

    def _finish_rest(self) -> list[ToolEvent]:
        if self._finished:
            return []
        self._finished = True
        events: list[ToolEvent] = []
        if self._inside:
            body = self._buf
            # The stop string or the token limit may have cut the close tag part way.
            trimmed = body.rstrip()
            trimmed = trimmed[: len(trimmed) - _held_prefix_len(trimmed, TOOL_CALL_CLOSE)]
            if not self._try_call(trimmed, events):
                self._text(TOOL_CALL_OPEN + body, events)
        else:
            self._text(self._buf, events)
        self._buf = ""
        if not self._segment_has_text and not self.calls:
            self._emit(self._pending_ws, events)  # a whitespace-only answer, no call beside it
        self._pending_ws = ""
        return events

    def _step(self, events: list[ToolEvent]) -> bool:
        """Decide what the buffer allows; True when the state changed and there may be more."""
        if not self._inside:
            start = self._buf.find(TOOL_CALL_OPEN)
            if start < 0:
                keep = _held_prefix_len(self._buf, TOOL_CALL_OPEN)
                self._text(self._buf[: len(self._buf) - keep], events)
                self._buf = self._buf[len(self._buf) - keep :]
                return False
            self._text(self._buf[:start], events)
            self._buf = self._buf[start + len(TOOL_CALL_OPEN) :]
            self._inside, self._search_from = True, 0
            return True
        # Only a close tag starting within MAX_CALL_CHARS counts, so that where the text was cut
        # never changes which calls are given up.
        end = self._buf.find(
            TOOL_CALL_CLOSE, self._search_from, MAX_CALL_CHARS + len(TOOL_CALL_CLOSE)
        )
        if end >= 0:
            body, raw_end = self._buf[:end], end + len(TOOL_CALL_CLOSE)
            if not self._try_call(body, events):
                self._text(TOOL_CALL_OPEN + self._buf[:raw_end], events)
            self._buf = self._buf[raw_end:]
            self._inside = False
            return True
        if len(self._buf) >= MAX_CALL_CHARS + len(TOOL_CALL_CLOSE):
            self._text(TOOL_CALL_OPEN + self._buf[:MAX_CALL_CHARS], events)
            self._buf = self._buf[MAX_CALL_CHARS:]
            self._inside = False
            return True
        self._search_from = max(0, len(self._buf) - len(TOOL_CALL_CLOSE) + 1)
        return False

    def _try_call(self, body: str, events: list[ToolEvent]) -> bool:
        """Emit the call in `body` and end the segment before it; False if it is no call."""
        parsed = _parse_body(body, self.names)
        if parsed is None:
            return False
        name, arguments = parsed
        index = len(self.calls)
        call_id = f"call_{self.id_prefix}_{index}"
        self.calls.append(ToolCall(id=call_id, name=name, arguments=arguments))
        events += [CallStart(index, call_id, name), CallArguments(index, arguments)]
        self._pending_ws, self._segment_has_text = "", False  # whitespace beside a call: dropped
        return True

    def _text(self, text: str, events: list[ToolEvent]) -> None:
        """Decided content text of the current segment: emitted unless all whitespace so far."""
        if self._segment_has_text:
            self._emit(text, events)
        elif text.isspace() or not text:
            self._pending_ws += text
        else:
            self._segment_has_text = True
            self._emit(self._pending_ws + text, events)
            self._pending_ws = ""

    def _emit(self, text: str, events: list[ToolEvent]) -> None:
        if text:
            self._content.append(text)
            events.append(ContentDelta(text))


def parse_tool_calls(
    text: str, names: frozenset[str] | None, id_prefix: str
) -> tuple[str, list[ToolCall]]:
    """Whole-text form (non-streaming responses): (content, calls)."""
    parser = ToolCallParser(names, id_prefix)
    parser.feed(text)
    parser.finish()
    return parser.content, parser.calls
