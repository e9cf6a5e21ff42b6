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
- A call written in the shape the tool-call grammar produces, `{"name": NAME, "arguments":
  {...}}`, keeps its arguments as the model wrote them (the text between the braces, spacing
  included), so the streamed pieces of a call always join to its final arguments.
- With `stream_arguments` (the text comes from a tier that decodes under the tool-call grammar,
  which guarantees every call's shape) a call starts as soon as its name is known and its
  arguments stream as they are written, as OpenAI streams them; a call the text ends inside
  (the token limit) is left `partial`. Without it (text nothing constrained: a remote tier's
  content, a stored answer) a call is decided whole at its close tag, and:
- A call that does not parse (bad JSON, unknown name, wrong types) is content, markup included,
  so nothing the model wrote is lost; it is not counted and does not end its segment.
- At `finish()` an unterminated call (token limit, or a stop string that ate the close tag) is
  a call if its body alone is a valid call, else content.
- A body with no close tag within `MAX_CALL_CHARS` characters is given up as content, so the
  buffer stays bounded whatever the model writes.
- An answer that starts with `{` or a code fence may be a bare call: small models (Qwen2.5-Coder-
  0.5B among them) often write a call as a bare `{"name": ..., "arguments": ...}` object without
  the tags when nothing constrains them (`tool_choice: auto`). Held whole, it is that call if
  the whole answer is one valid call, else it is parsed by the rules above, as llama.cpp's
  Hermes parser does; streamed, it is a call once its name is known.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from clawctl.engines.base import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, ToolCall

MAX_CALL_CHARS = 1_000_000  # longest body between the tags before it is given up as content

# A fenced body; the opening fence may be missing: a bare call that began the answer is
# constrained from its `{` on, and the grammar then lets it close the fence it may have opened.
_FENCE = re.compile(r"\A(?:```[A-Za-z0-9_-]*[ \t]*\r?\n?)?(.*?)\s*```\Z", re.DOTALL)
_FENCE_MARK = "```"

# The start of a call in the grammar's shape, up to (not including) the arguments' `{`.
_HEAD = r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*(?=\{)'
_CALL_HEAD = re.compile(_HEAD)
_BARE_HEAD = re.compile(r"\s*(?:```[A-Za-z0-9_-]*[ \t]*\r?\n?)?" + _HEAD)
_HEAD_CHARS = 512  # a head is looked for only this far into a body (plus the names' lengths)
# After the arguments: the call object's own `}`, before the close tag or the fence.
_TAIL = re.compile(r"\s*(?:\}\s*)?")


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
    """The next piece of the arguments JSON text of call `index`."""

    index: int
    text: str


@dataclass(frozen=True)
class CallEnd:
    """Call `index` is whole: `ToolCallParser.calls[index]` holds it (Ollama sends calls whole)."""

    index: int


ToolEvent: TypeAlias = ContentDelta | CallStart | CallArguments | CallEnd


def _reject_constant(value: str) -> Any:
    """NaN and Infinity are not JSON: arguments re-serialised with them would not parse."""
    raise ValueError(f"not JSON: {value}")


def _load(text: str) -> Any:
    # strict=False: models write raw newlines and tabs inside strings; accept what they meant.
    return json.loads(text, strict=False, parse_constant=_reject_constant)


class _ObjectEnd:
    """Finds where a JSON object that began with `{` ends, fed piece by piece: brackets are
    counted outside strings, so a `}` or a close tag inside an argument never ends it."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escaped = False

    def scan(self, text: str) -> int:
        """The index just past the object's last `}` in `text`, or -1 if it goes on."""
        for i, ch in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
        return -1


def _name(literal: str, names: frozenset[str] | None) -> str | None:
    """The tool name a JSON string literal holds, if it is one we accept."""
    try:
        name = _load(literal)
    except ValueError:
        return None
    if not isinstance(name, str) or not name or (names is not None and name not in names):
        return None
    return name


def _shaped_arguments(text: str, names: frozenset[str] | None) -> tuple[str, str] | None:
    """(name, arguments as written) of a body in the grammar's shape with valid arguments."""
    head = _CALL_HEAD.match(text)
    if head is None:
        return None
    name = _name(head.group(1), names)
    if name is None:
        return None
    end = _ObjectEnd().scan(text[head.end() :])
    if end < 0:
        return None
    arguments = text[head.end() : head.end() + end]
    rest = text[head.end() + end :]
    if _TAIL.fullmatch(rest) is None or not rest.strip().startswith("}"):
        return None
    try:
        valid = isinstance(_load(arguments), dict)
    except (ValueError, RecursionError):
        return None
    return (name, arguments) if valid else None


def _parse_body(body: str, names: frozenset[str] | None) -> tuple[str, str] | None:
    """(name, arguments JSON) of a call body, or None when it is not a call we accept."""
    text = body.strip()
    fenced = _FENCE.match(text)
    if fenced is not None:
        text = fenced.group(1).strip()
    shaped = _shaped_arguments(text, names)
    if shaped is not None:
        return shaped
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


@dataclass
class _OpenCall:
    """A streamed call whose arguments are still being written."""

    index: int
    id: str
    name: str
    bare: bool  # began the answer without tags: ends at its `}` (and perhaps a fence)
    end: _ObjectEnd = field(default_factory=_ObjectEnd)
    arguments: list[str] = field(default_factory=list)


_Mode: TypeAlias = Literal["text", "body", "arguments", "tail"]


class ToolCallParser:
    """Streaming: feed() the generated text piece by piece, then finish() once.

    Events are returned in output order: a call's `CallStart`, then its `CallArguments` pieces,
    then its `CallEnd`. `names` (None: any name) limits the calls accepted to the tools offered;
    `stream_arguments` says the text was decoded under the tool-call grammar (see the module).
    """

    def __init__(
        self, names: frozenset[str] | None, id_prefix: str, stream_arguments: bool = False
    ) -> None:
        self.names = names
        self.id_prefix = id_prefix
        self.stream_arguments = stream_arguments
        self.calls: list[ToolCall] = []  # every whole call so far
        self.partial: ToolCall | None = None  # a streamed call the text ended inside
        self._mode: _Mode = "text"
        self._buf = ""  # text: the held-back prefix of the open tag; body: the body so far
        self._search_from = 0  # body: no close tag starts before this index of the body
        self._call: _OpenCall | None = None  # arguments, tail: the streamed call
        self._pending_ws = ""  # the current segment so far, while it is all whitespace
        self._segment_has_text = False
        self._content: list[str] = []
        self._finished = False
        self._bare: bool | None = None  # the answer may be a bare call (None: not known yet)
        self._head = ""  # the answer's start while `_bare` is not False
        longest = max((len(n) for n in names), default=64) if names is not None else 64
        self._head_chars = _HEAD_CHARS + 6 * longest  # a name may be \\u-escaped

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
                return self._bare_call()
            self._bare, text, self._head = False, self._head, ""
        return self._run(text)

    def _bare_call(self) -> list[ToolEvent]:
        """Streaming: start the bare call once its head is there; else keep the answer held."""
        if not self.stream_arguments or len(self._head) > self._head_chars:
            return []
        events: list[ToolEvent] = []
        rest = self._open(self._head, _BARE_HEAD, bare=True, events=events)
        if rest is None:
            return []
        self._bare, self._head = False, ""
        return events + self._run(rest)

    def _open(
        self, text: str, head: re.Pattern[str], *, bare: bool, events: list[ToolEvent]
    ) -> str | None:
        """Start a streamed call if `text` begins with a call's head; return the text after it."""
        found = head.match(text)
        if found is None:
            return None
        name = _name(found.group(1), self.names)
        if name is None:
            return None
        index = len(self.calls)
        self._call = _OpenCall(index, f"call_{self.id_prefix}_{index}", name, bare)
        self._mode = "arguments"
        self._pending_ws, self._segment_has_text = "", False  # whitespace beside a call: dropped
        events.append(CallStart(index, self._call.id, name))
        return text[found.end() :]

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
        if self._mode == "body":
            body = self._buf
            # The stop string or the token limit may have cut the close tag part way.
            trimmed = body.rstrip()
            trimmed = trimmed[: len(trimmed) - _held_prefix_len(trimmed, TOOL_CALL_CLOSE)]
            if not self._try_call(trimmed, events):
                self._text(TOOL_CALL_OPEN + body, events)
        elif self._mode == "arguments":
            call = self._call
            assert call is not None
            self.partial = ToolCall(call.id, call.name, "".join(call.arguments))
        elif self._mode == "tail":
            rest = self._after_tail()
            if not self._end_mark().startswith(rest):
                self._text(rest, events)
        else:
            self._text(self._buf, events)
        self._buf = ""
        if not self._segment_has_text and not self.calls and self.partial is None:
            self._emit(self._pending_ws, events)  # a whitespace-only answer, no call beside it
        self._pending_ws = ""
        return events

    def _end_mark(self) -> str:
        """What closes the streamed call after its object: the close tag, or a bare call's
        optional fence."""
        assert self._call is not None
        return _FENCE_MARK if self._call.bare else TOOL_CALL_CLOSE

    def _step(self, events: list[ToolEvent]) -> bool:
        """Decide what the buffer allows; True when the state changed and there may be more."""
        if self._mode == "text":
            return self._step_text(events)
        if self._mode == "body":
            return self._step_body(events)
        if self._mode == "arguments":
            return self._step_arguments(events)
        return self._step_tail()

    def _step_text(self, events: list[ToolEvent]) -> bool:
        start = self._buf.find(TOOL_CALL_OPEN)
        if start < 0:
            keep = _held_prefix_len(self._buf, TOOL_CALL_OPEN)
            self._text(self._buf[: len(self._buf) - keep], events)
            self._buf = self._buf[len(self._buf) - keep :]
            return False
        self._text(self._buf[:start], events)
        self._buf = self._buf[start + len(TOOL_CALL_OPEN) :]
        self._mode, self._search_from = "body", 0
        return True

    def _step_body(self, events: list[ToolEvent]) -> bool:
        if self.stream_arguments and len(self._buf) <= self._head_chars:
            rest = self._open(self._buf, _CALL_HEAD, bare=False, events=events)
            if rest is not None:
                self._buf = rest
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
            self._mode = "text"
            return True
        if len(self._buf) >= MAX_CALL_CHARS + len(TOOL_CALL_CLOSE):
            self._text(TOOL_CALL_OPEN + self._buf[:MAX_CALL_CHARS], events)
            self._buf = self._buf[MAX_CALL_CHARS:]
            self._mode = "text"
            return True
        self._search_from = max(0, len(self._buf) - len(TOOL_CALL_CLOSE) + 1)
        return False

    def _step_arguments(self, events: list[ToolEvent]) -> bool:
        call = self._call
        assert call is not None
        end = call.end.scan(self._buf)
        piece = self._buf if end < 0 else self._buf[:end]
        self._buf = "" if end < 0 else self._buf[end:]
        if piece:
            call.arguments.append(piece)
            events.append(CallArguments(call.index, piece))
        if end < 0:
            return False
        self.calls.append(ToolCall(call.id, call.name, "".join(call.arguments)))
        events.append(CallEnd(call.index))
        self._mode = "tail"
        return True

    def _step_tail(self) -> bool:
        """Skip the call's closing markup; anything else after it is text again."""
        mark = self._end_mark()
        rest = self._after_tail()
        if rest.startswith(mark):
            rest = rest[len(mark) :]
        elif mark.startswith(rest):
            return False  # the mark may still come (`rest` may be empty)
        self._buf, self._mode, self._call = rest, "text", None
        return True

    def _after_tail(self) -> str:
        """The buffer after the call object's own `}` and the whitespace around it."""
        tail = _TAIL.match(self._buf)
        assert tail is not None  # every part of the pattern is optional
        return self._buf[tail.end() :]

    def _try_call(self, body: str, events: list[ToolEvent]) -> bool:
        """Emit the call in `body` and end the segment before it; False if it is no call."""
        parsed = _parse_body(body, self.names)
        if parsed is None:
            return False
        name, arguments = parsed
        index = len(self.calls)
        call_id = f"call_{self.id_prefix}_{index}"
        self.calls.append(ToolCall(id=call_id, name=name, arguments=arguments))
        events += [CallStart(index, call_id, name), CallArguments(index, arguments), CallEnd(index)]
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


@dataclass(frozen=True)
class ParsedAnswer:
    """A whole answer's content and the calls in it, each checked whole."""

    content: str
    calls: list[ToolCall]


def parse_tool_calls(text: str, names: frozenset[str] | None, id_prefix: str) -> ParsedAnswer:
    """Whole-text form (unstreamed responses): the streaming machine without
    `stream_arguments`, so every call returned parsed whole and a cut call stays text."""
    parser = ToolCallParser(names, id_prefix)
    parser.feed(text)
    parser.finish()
    return ParsedAnswer(parser.content, parser.calls)
