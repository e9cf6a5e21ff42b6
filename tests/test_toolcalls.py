"""Tool calls out of generated text: content and calls are exactly what the model wrote, and a
streamed answer agrees with the whole-text parse however the text was cut into pieces."""

from __future__ import annotations

import json

import pytest

from clawctl.engines.base import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, ToolCall
from clawctl.serving.toolcalls import (
    MAX_CALL_CHARS,
    CallArguments,
    CallEnd,
    CallStart,
    ContentDelta,
    ParsedAnswer,
    ToolCallParser,
    ToolEvent,
    parse_tool_calls,
)

NAMES = frozenset({"read_file", "search", "get_time"})
READ = '<tool_call>\n{"name": "read_file", "arguments": {"path": "a.txt"}}\n</tool_call>'
SEARCH = '<tool_call>\n{"name": "search", "arguments": {"q": "café"}}\n</tool_call>'
BAD_JSON = '<tool_call>\n{"name": "read_file", "arguments": {"path": "a.txt"</tool_call>'
UNKNOWN = '<tool_call>\n{"name": "rm_rf", "arguments": {"path": "/"}}\n</tool_call>'

SAMPLES = [
    "Hello world, no calls here.",
    "if a < b and c <= d, use <tools> here: <tool_cal then <tool_call",
    READ,
    READ + "\n\n" + SEARCH + "\n",
    "Let me look.\n" + READ,
    '<tool_call>{"name": "search", "arguments": "{\\"q\\": \\"x\\"}"}</tool_call>',
    UNKNOWN,
    BAD_JSON,
    '<tool_call>\n{"name": "get_time", "arguments": {}}',
    '<tool_call>\n{"name": "get_time", "argu',
    "\n  " + READ + "\n" + BAD_JSON + "\n" + SEARCH + "\nDone.",
    '<tool_call>\n```json\n{"name": "get_time", "parameters": {"tz": "UTC"}}\n```\n</tool_call>',
    '<tool_call>{"name": "get_time"}</tool_',
    "  \n ",
    "<<tool_call>" + '{"name": "get_time"}' + "</tool_call><",
    ' {"name": "read_file", "arguments": {"path": "notes.txt"}}',
    '```json\n{"name": "get_time", "arguments": {}}\n```',
    '{"not": "a call"} and then ' + READ,
]


def _whole(
    text: str, names: frozenset[str] | None, prefix: str, stream: bool = False
) -> tuple[str, list[ToolCall]]:
    """(content, calls, a partial call included) of a whole text fed at once."""
    parser = ToolCallParser(names, prefix, stream)
    parser.feed(text)
    parser.finish()
    return parser.content, parser.calls + ([parser.partial] if parser.partial else [])


def test_the_whole_text_form_is_the_held_parse() -> None:
    for text in SAMPLES:
        parsed = parse_tool_calls(text, NAMES, "abc")
        assert (parsed.content, parsed.calls) == _whole(text, NAMES, "abc")


def _normalise(events: list[ToolEvent]) -> list[ToolEvent]:
    """Adjacent content deltas merged: where text is cut may only change how content is split."""
    out: list[ToolEvent] = []
    for event in events:
        if isinstance(event, ContentDelta) and out and isinstance(out[-1], ContentDelta):
            out[-1] = ContentDelta(out[-1].text + event.text)
        else:
            out.append(event)
    return out


def _run(pieces: list[str], stream: bool = False) -> tuple[ToolCallParser, list[ToolEvent]]:
    parser = ToolCallParser(NAMES, "abc", stream)
    events: list[ToolEvent] = []
    for piece in pieces:
        events += parser.feed(piece)
    events += parser.finish()
    return parser, events


def _events(pieces: list[str], stream: bool = False) -> list[ToolEvent]:
    parser, events = _run(pieces, stream)
    # The content property and the calls list are exactly what the events said.
    assert parser.content == "".join(e.text for e in events if isinstance(e, ContentDelta))
    starts = [e for e in events if isinstance(e, CallStart)]
    made = parser.calls + ([parser.partial] if parser.partial else [])
    assert [(c.id, c.name) for c in made] == [(s.id, s.name) for s in starts]
    for call in made:  # each call's pieces join to its arguments
        index = int(call.id.rsplit("_", 1)[1])
        pieces_of = [e.text for e in events if isinstance(e, CallArguments) and e.index == index]
        assert "".join(pieces_of) == call.arguments
    return _normalise(events)


def test_plain_text_is_all_content() -> None:
    text = "Hello world, no calls here."
    assert _whole(text, NAMES, "abc") == (text, [])
    assert _events([text]) == [ContentDelta(text)]


def test_angle_brackets_that_are_not_calls_are_content() -> None:
    text = "if a < b and c <= d, use <tools> here: <tool_cal then <tool_call"
    assert _whole(text, NAMES, "abc") == (text, [])


def test_only_a_possible_open_tag_is_held_back() -> None:
    parser = ToolCallParser(NAMES, "abc")
    assert parser.feed("Hello <to") == [ContentDelta("Hello ")]
    assert parser.feed("ol") == []
    assert parser.feed("s> and <") == [ContentDelta("<tools> and ")]
    assert parser.feed("b>") == [ContentDelta("<b>")]
    assert parser.feed(" <tool_call") == [ContentDelta(" ")]
    assert parser.finish() == [ContentDelta("<tool_call")]
    assert parser.content == "Hello <tools> and <b> <tool_call"


def test_one_call() -> None:
    content, calls = _whole(READ, NAMES, "abc")
    assert content == ""
    assert calls == [ToolCall("call_abc_0", "read_file", '{"path": "a.txt"}')]
    assert _events([READ]) == [
        CallStart(0, "call_abc_0", "read_file"),
        CallArguments(0, '{"path": "a.txt"}'),
        CallEnd(0),
    ]


def test_parallel_calls_drop_the_whitespace_between_and_after() -> None:
    text = READ + "\n\n" + SEARCH + "\n"
    content, calls = _whole(text, NAMES, "r1")
    assert content == ""
    assert [(c.id, c.name, json.loads(c.arguments)) for c in calls] == [
        ("call_r1_0", "read_file", {"path": "a.txt"}),
        ("call_r1_1", "search", {"q": "café"}),
    ]
    assert [type(e) for e in _events([text])] == [CallStart, CallArguments, CallEnd] * 2


def test_content_then_a_call() -> None:
    text = "Let me look.\n" + READ
    content, calls = _whole(text, NAMES, "abc")
    assert content == "Let me look.\n"
    assert [c.name for c in calls] == ["read_file"]
    assert _events([text])[0] == ContentDelta("Let me look.\n")


def test_whitespace_before_the_first_call_is_dropped_but_a_blank_answer_is_kept() -> None:
    assert _whole("\n  " + READ, NAMES, "abc")[0] == ""
    assert _whole("  \n ", NAMES, "abc") == ("  \n ", [])


def test_arguments_as_a_json_string() -> None:
    text = '<tool_call>{"name": "search", "arguments": "{\\"q\\": \\"x\\"}"}</tool_call>'
    assert _whole(text, NAMES, "abc") == (
        "",
        [ToolCall("call_abc_0", "search", '{"q": "x"}')],
    )


@pytest.mark.parametrize(
    ("body", "arguments"),
    [
        ('{"name": "get_time"}', "{}"),
        ('{"name": "get_time", "arguments": null}', "{}"),
        ('{"name": "get_time", "parameters": {"tz": "UTC"}}', '{"tz": "UTC"}'),
        ('```json\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n```', '{"tz": "UTC"}'),
        ('\n  {"name":"get_time","arguments":{"a":[1,2]}}  \n', '{"a":[1,2]}'),  # as written
        ('{"name": "get_time", "arguments": {"b": 1}, "x": 2}', '{"b": 1}'),  # another key
    ],
)
def test_accepted_call_shapes(body: str, arguments: str) -> None:
    text = TOOL_CALL_OPEN + body + TOOL_CALL_CLOSE
    assert _whole(text, NAMES, "p") == (
        "",
        [ToolCall("call_p_0", "get_time", arguments)],
    )


@pytest.mark.parametrize(
    "body",
    [
        '{"name": "read_file", "arguments": {"path": "a.txt"}',  # malformed JSON
        '["read_file", {"path": "a.txt"}]',  # not an object
        '{"arguments": {}}',  # no name
        '{"name": 3, "arguments": {}}',  # name not a string
        '{"name": "get_time", "arguments": [1]}',  # arguments not an object
        '{"name": "get_time", "arguments": "not json"}',  # a string that is no object
        '{"name": "get_time", "arguments": "[1]"}',
        '{"name": "get_time", "arguments": {"x": NaN}}',  # NaN would not re-serialise as JSON
        "",
    ],
)
def test_rejected_calls_are_content_verbatim(body: str) -> None:
    text = "Sure. " + TOOL_CALL_OPEN + body + TOOL_CALL_CLOSE + " ok"
    assert _whole(text, NAMES, "abc") == (text, [])


def test_unknown_name_is_content_only_when_names_are_given() -> None:
    assert _whole(UNKNOWN, NAMES, "abc") == (UNKNOWN, [])
    assert _whole(UNKNOWN, frozenset(), "abc") == (UNKNOWN, [])
    content, calls = _whole(UNKNOWN, None, "abc")
    assert (content, [c.name for c in calls]) == ("", ["rm_rf"])


def test_a_bad_call_between_good_ones_keeps_its_text_and_does_not_count() -> None:
    text = "\n  " + READ + "\n" + BAD_JSON + "\n" + SEARCH + "\nDone."
    content, calls = _whole(text, NAMES, "abc")
    assert content == "\n" + BAD_JSON + "\n" + "\nDone."
    assert [(c.id, c.name) for c in calls] == [
        ("call_abc_0", "read_file"),
        ("call_abc_1", "search"),
    ]


def test_unterminated_valid_call_at_finish_is_a_call() -> None:
    text = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n'
    assert _whole(text, NAMES, "abc") == (
        "",
        [ToolCall("call_abc_0", "get_time", '{"tz": "UTC"}')],
    )
    # The close tag cut part way by the token limit.
    cut = '<tool_call>{"name": "get_time"}</tool_'
    assert _whole(cut, NAMES, "abc") == ("", [ToolCall("call_abc_0", "get_time", "{}")])


def test_unterminated_invalid_call_at_finish_is_content() -> None:
    text = 'Checking.\n<tool_call>\n{"name": "get_time", "argu'
    assert _whole(text, NAMES, "abc") == (text, [])
    parser = ToolCallParser(NAMES, "abc")
    assert parser.feed(text) == [ContentDelta("Checking.\n")]
    assert parser.finish() == [ContentDelta(text.removeprefix("Checking.\n"))]


def test_non_ascii_arguments_are_not_escaped() -> None:
    _, calls = _whole(SEARCH, NAMES, "abc")
    assert calls[0].arguments == '{"q": "café"}'
    assert "\\u" not in calls[0].arguments


def test_markup_is_never_content_of_a_good_call() -> None:
    text = "<<tool_call>" + '{"name": "get_time"}' + "</tool_call><"
    assert _whole(text, NAMES, "abc") == (
        "<<",
        [ToolCall("call_abc_0", "get_time", "{}")],
    )


@pytest.mark.parametrize("stream", [False, True], ids=["held", "streamed"])
@pytest.mark.parametrize("text", SAMPLES)
def test_same_result_whatever_the_chunking(text: str, stream: bool) -> None:
    whole = _events([text], stream)
    content, calls = _whole(text, NAMES, "abc", stream)
    assert "".join(e.text for e in whole if isinstance(e, ContentDelta)) == content
    for cut in range(len(text) + 1):
        parser, _ = _run([text[:cut], text[cut:]], stream)
        made = parser.calls + ([parser.partial] if parser.partial else [])
        assert (parser.content, made) == (content, calls), cut
        assert _merged(_events([text[:cut], text[cut:]], stream)) == _merged(whole), cut
    assert _merged(_events(list(text), stream)) == _merged(whole)
    # And every call is its start, then only its argument pieces, then its end (a partial call
    # has none: the text ended inside it).
    parser, _ = _run([text], stream)
    for i, event in enumerate(whole):
        if isinstance(event, CallStart):
            ends = [j for j, e in enumerate(whole) if e == CallEnd(event.index)]
            stop = ends[0] if ends else len(whole)
            assert ends or (parser.partial is not None and parser.partial.id == event.id)
            pieces = whole[i + 1 : stop]
            assert pieces
            assert all(isinstance(e, CallArguments) and e.index == event.index for e in pieces)


def _merged(events: list[ToolEvent]) -> list[ToolEvent]:
    """Adjacent argument pieces of a call joined too: streamed, where the text was cut may
    split the arguments differently, never change them."""
    out: list[ToolEvent] = []
    for event in _normalise(events):
        last = out[-1] if out else None
        if isinstance(event, CallArguments) and isinstance(last, CallArguments):
            out[-1] = CallArguments(event.index, last.text + event.text)
        else:
            out.append(event)
    return out


def test_a_body_without_close_tag_is_given_up_and_the_buffer_stays_bounded() -> None:
    parser = ToolCallParser(NAMES, "abc")
    chunk = "x" * 100_000
    assert parser.feed(TOOL_CALL_OPEN) == []
    for _ in range(MAX_CALL_CHARS // len(chunk)):
        assert parser.feed(chunk) == []  # still possibly a call
    released = parser.feed(chunk)  # now past the limit
    assert "".join(e.text for e in released if isinstance(e, ContentDelta)) == (
        TOOL_CALL_OPEN + "x" * (MAX_CALL_CHARS + len(chunk))
    )
    assert parser.feed("yz") == [ContentDelta("yz")]  # plain content again, not buffered
    assert parser.finish() == []
    assert parser.calls == []


def test_a_close_tag_past_the_limit_does_not_make_a_call() -> None:
    over = '{"name": "get_time", "arguments": {"s": "' + "x" * MAX_CALL_CHARS + '"}}'
    text = TOOL_CALL_OPEN + over + TOOL_CALL_CLOSE
    assert _whole(text, NAMES, "abc") == (text, [])
    within = '{"name": "get_time", "arguments": {"s": "' + "x" * 1000 + '"}}'
    assert len(_whole(TOOL_CALL_OPEN + within + TOOL_CALL_CLOSE, NAMES, "abc")[1]) == 1


def test_feed_after_finish_is_an_error() -> None:
    parser = ToolCallParser(NAMES, "abc")
    parser.finish()
    with pytest.raises(RuntimeError, match="after finish"):
        parser.feed("x")


def test_a_bare_call_is_a_call() -> None:
    """Qwen2.5-Coder-0.5B under tool_choice auto writes the call without its tags."""
    content, calls = _whole(
        ' {"name": "read_file", "arguments": {"path": "notes.txt"}}\n', NAMES, "abc"
    )
    assert content == ""
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("read_file", {"path": "notes.txt"})
    ]


@pytest.mark.parametrize(
    "answer",
    [
        '```json\n{"name": "read_file", "arguments": {"path": "notes.txt"}}\n```',
        # The lazy grammar starts at the `{` and may close a fence it never saw opened
        # (measured: Qwen2.5-Coder-0.5B under OpenClaw, after a tool's error).
        '{"name": "read_file", "arguments": {"path": "notes.txt"}}\n```',
    ],
)
def test_a_fenced_bare_call_is_a_call(answer: str) -> None:
    content, calls = _whole(answer, NAMES, "abc")
    assert content == ""
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("read_file", {"path": "notes.txt"})
    ]
    parser = ToolCallParser(NAMES, "abc")  # the same, streamed a character at a time
    events = [e for ch in answer for e in parser.feed(ch)] + parser.finish()
    assert not [e for e in events if isinstance(e, ContentDelta)]
    assert [c.name for c in parser.calls] == ["read_file"]


def test_an_answer_starting_with_an_object_that_is_no_call_is_content() -> None:
    text = '{"city": "Paris"} is the JSON you asked for.'
    assert _whole(text, NAMES, "abc") == (text, [])
    content, calls = _whole('{"name": "nope", "arguments": {}}', NAMES, "abc")
    assert content == '{"name": "nope", "arguments": {}}'
    assert calls == []


# --- streamed arguments (text decoded under the tool-call grammar) ---------------------------


def test_a_streamed_call_starts_when_its_name_is_known_and_its_arguments_come_as_written() -> None:
    parser = ToolCallParser(NAMES, "abc", stream_arguments=True)
    assert parser.feed('<tool_call>\n{"name": "read_fi') == []
    assert parser.feed('le", "arguments": ') == []  # the arguments' `{` not yet seen
    assert parser.feed('{"pa') == [
        CallStart(0, "call_abc_0", "read_file"),
        CallArguments(0, '{"pa'),
    ]
    assert parser.feed('th": "a.txt"') == [CallArguments(0, 'th": "a.txt"')]
    assert parser.feed("}}\n</tool") == [CallArguments(0, "}"), CallEnd(0)]
    assert parser.calls == [ToolCall("call_abc_0", "read_file", '{"path": "a.txt"}')]
    assert parser.feed("_call>") == []
    assert parser.finish() == []
    assert parser.content == ""
    assert parser.partial is None


def test_brackets_and_a_close_tag_inside_an_argument_do_not_end_a_streamed_call() -> None:
    value = 'x}]} </tool_call> \\" {['
    arguments = json.dumps({"q": value})
    text = f'<tool_call>\n{{"name": "search", "arguments": {arguments}}}\n</tool_call>'
    assert _whole(text, NAMES, "abc", True) == (
        "",
        [ToolCall("call_abc_0", "search", arguments)],
    )
    assert json.loads(_whole(text, NAMES, "abc", True)[1][0].arguments) == {"q": value}
    # Held (nothing constrained the text), the first close tag ends the body, as before.
    assert _whole(text, NAMES, "abc") == (text, [])


def test_a_streamed_call_the_text_ends_inside_is_partial_not_a_call() -> None:
    text = 'Let me see.\n<tool_call>\n{"name": "read_file", "arguments": {"path": "a.t'
    parser = ToolCallParser(NAMES, "abc", stream_arguments=True)
    parser.feed(text)
    parser.finish()
    assert (parser.content, parser.calls) == ("Let me see.\n", [])
    assert parser.partial == ToolCall("call_abc_0", "read_file", '{"path": "a.t')
    # Held, the same text is content: nothing was sent before the call was whole.
    assert parse_tool_calls(text, NAMES, "abc") == ParsedAnswer(text, [])


def test_a_streamed_bare_call_and_the_text_after_it() -> None:
    answer = '```json\n{"name": "read_file", "arguments": {"path": "notes.txt"}}\n```\nDone.'
    parser = ToolCallParser(NAMES, "abc", stream_arguments=True)
    events = [e for ch in answer for e in parser.feed(ch)] + parser.finish()
    first_piece = next(i for i, e in enumerate(events) if isinstance(e, CallArguments))
    assert events[first_piece - 1] == CallStart(0, "call_abc_0", "read_file")
    assert [c.arguments for c in parser.calls] == ['{"path": "notes.txt"}']
    assert parser.content == "\nDone."


def test_a_streamed_head_with_an_unknown_name_is_held_and_becomes_content() -> None:
    for text in (UNKNOWN, '{"name": "nope", "arguments": {}}'):
        parser = ToolCallParser(NAMES, "abc", stream_arguments=True)
        events = [e for ch in text for e in parser.feed(ch)] + parser.finish()
        assert _normalise(events) == [ContentDelta(text)]  # held whole, then text
        assert parser.calls == []
