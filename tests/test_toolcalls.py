"""Tool calls out of generated text: content and calls are exactly what the model wrote, and a
streamed answer agrees with the whole-text parse however the text was cut into pieces."""

from __future__ import annotations

import json

import pytest

from clawctl.engines.base import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, ToolCall
from clawctl.serving.toolcalls import (
    MAX_CALL_CHARS,
    CallArguments,
    CallStart,
    ContentDelta,
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


def _normalise(events: list[ToolEvent]) -> list[ToolEvent]:
    """Adjacent content deltas merged: where text is cut may only change how content is split."""
    out: list[ToolEvent] = []
    for event in events:
        if isinstance(event, ContentDelta) and out and isinstance(out[-1], ContentDelta):
            out[-1] = ContentDelta(out[-1].text + event.text)
        else:
            out.append(event)
    return out


def _run(pieces: list[str]) -> tuple[ToolCallParser, list[ToolEvent]]:
    parser = ToolCallParser(NAMES, "abc")
    events: list[ToolEvent] = []
    for piece in pieces:
        events += parser.feed(piece)
    events += parser.finish()
    return parser, events


def _events(pieces: list[str]) -> list[ToolEvent]:
    parser, events = _run(pieces)
    # The content property and the calls list are exactly what the events said.
    assert parser.content == "".join(e.text for e in events if isinstance(e, ContentDelta))
    starts = [e for e in events if isinstance(e, CallStart)]
    assert [(c.id, c.name) for c in parser.calls] == [(s.id, s.name) for s in starts]
    return _normalise(events)


def test_plain_text_is_all_content() -> None:
    text = "Hello world, no calls here."
    assert parse_tool_calls(text, NAMES, "abc") == (text, [])
    assert _events([text]) == [ContentDelta(text)]


def test_angle_brackets_that_are_not_calls_are_content() -> None:
    text = "if a < b and c <= d, use <tools> here: <tool_cal then <tool_call"
    assert parse_tool_calls(text, NAMES, "abc") == (text, [])


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
    content, calls = parse_tool_calls(READ, NAMES, "abc")
    assert content == ""
    assert calls == [ToolCall("call_abc_0", "read_file", '{"path": "a.txt"}')]
    assert _events([READ]) == [
        CallStart(0, "call_abc_0", "read_file"),
        CallArguments(0, '{"path": "a.txt"}'),
    ]


def test_parallel_calls_drop_the_whitespace_between_and_after() -> None:
    text = READ + "\n\n" + SEARCH + "\n"
    content, calls = parse_tool_calls(text, NAMES, "r1")
    assert content == ""
    assert [(c.id, c.name, json.loads(c.arguments)) for c in calls] == [
        ("call_r1_0", "read_file", {"path": "a.txt"}),
        ("call_r1_1", "search", {"q": "café"}),
    ]
    assert [type(e) for e in _events([text])] == [CallStart, CallArguments] * 2


def test_content_then_a_call() -> None:
    text = "Let me look.\n" + READ
    content, calls = parse_tool_calls(text, NAMES, "abc")
    assert content == "Let me look.\n"
    assert [c.name for c in calls] == ["read_file"]
    assert _events([text])[0] == ContentDelta("Let me look.\n")


def test_whitespace_before_the_first_call_is_dropped_but_a_blank_answer_is_kept() -> None:
    assert parse_tool_calls("\n  " + READ, NAMES, "abc")[0] == ""
    assert parse_tool_calls("  \n ", NAMES, "abc") == ("  \n ", [])


def test_arguments_as_a_json_string() -> None:
    text = '<tool_call>{"name": "search", "arguments": "{\\"q\\": \\"x\\"}"}</tool_call>'
    assert parse_tool_calls(text, NAMES, "abc") == (
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
        ('\n  {"name":"get_time","arguments":{"a":[1,2]}}  \n', '{"a": [1, 2]}'),
    ],
)
def test_accepted_call_shapes(body: str, arguments: str) -> None:
    text = TOOL_CALL_OPEN + body + TOOL_CALL_CLOSE
    assert parse_tool_calls(text, NAMES, "p") == (
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
    assert parse_tool_calls(text, NAMES, "abc") == (text, [])


def test_unknown_name_is_content_only_when_names_are_given() -> None:
    assert parse_tool_calls(UNKNOWN, NAMES, "abc") == (UNKNOWN, [])
    assert parse_tool_calls(UNKNOWN, frozenset(), "abc") == (UNKNOWN, [])
    content, calls = parse_tool_calls(UNKNOWN, None, "abc")
    assert (content, [c.name for c in calls]) == ("", ["rm_rf"])


def test_a_bad_call_between_good_ones_keeps_its_text_and_does_not_count() -> None:
    text = "\n  " + READ + "\n" + BAD_JSON + "\n" + SEARCH + "\nDone."
    content, calls = parse_tool_calls(text, NAMES, "abc")
    assert content == "\n" + BAD_JSON + "\n" + "\nDone."
    assert [(c.id, c.name) for c in calls] == [
        ("call_abc_0", "read_file"),
        ("call_abc_1", "search"),
    ]


def test_unterminated_valid_call_at_finish_is_a_call() -> None:
    text = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n'
    assert parse_tool_calls(text, NAMES, "abc") == (
        "",
        [ToolCall("call_abc_0", "get_time", '{"tz": "UTC"}')],
    )
    # The close tag cut part way by the token limit.
    cut = '<tool_call>{"name": "get_time"}</tool_'
    assert parse_tool_calls(cut, NAMES, "abc") == ("", [ToolCall("call_abc_0", "get_time", "{}")])


def test_unterminated_invalid_call_at_finish_is_content() -> None:
    text = 'Checking.\n<tool_call>\n{"name": "get_time", "argu'
    assert parse_tool_calls(text, NAMES, "abc") == (text, [])
    parser = ToolCallParser(NAMES, "abc")
    assert parser.feed(text) == [ContentDelta("Checking.\n")]
    assert parser.finish() == [ContentDelta(text.removeprefix("Checking.\n"))]


def test_non_ascii_arguments_are_not_escaped() -> None:
    _, calls = parse_tool_calls(SEARCH, NAMES, "abc")
    assert calls[0].arguments == '{"q": "café"}'
    assert "\\u" not in calls[0].arguments


def test_markup_is_never_content_of_a_good_call() -> None:
    text = "<<tool_call>" + '{"name": "get_time"}' + "</tool_call><"
    assert parse_tool_calls(text, NAMES, "abc") == (
        "<<",
        [ToolCall("call_abc_0", "get_time", "{}")],
    )


@pytest.mark.parametrize("text", SAMPLES)
def test_same_result_whatever_the_chunking(text: str) -> None:
    whole = _events([text])
    content, calls = parse_tool_calls(text, NAMES, "abc")
    assert "".join(e.text for e in whole if isinstance(e, ContentDelta)) == content
    for cut in range(len(text) + 1):
        parser, _ = _run([text[:cut], text[cut:]])
        assert (parser.content, parser.calls) == (content, calls), cut
        assert _events([text[:cut], text[cut:]]) == whole, cut
    assert _events(list(text)) == whole
    # And every call's CallStart comes straight before its CallArguments.
    for i, event in enumerate(whole):
        if isinstance(event, CallStart):
            assert whole[i + 1] == CallArguments(event.index, calls[event.index].arguments)


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
    assert parse_tool_calls(text, NAMES, "abc") == (text, [])
    within = '{"name": "get_time", "arguments": {"s": "' + "x" * 1000 + '"}}'
    assert len(parse_tool_calls(TOOL_CALL_OPEN + within + TOOL_CALL_CLOSE, NAMES, "abc")[1]) == 1


def test_feed_after_finish_is_an_error() -> None:
    parser = ToolCallParser(NAMES, "abc")
    parser.finish()
    with pytest.raises(RuntimeError, match="after finish"):
        parser.feed("x")


def test_a_bare_call_is_a_call() -> None:
    """Qwen2.5-Coder-0.5B under tool_choice auto writes the call without its tags."""
    content, calls = parse_tool_calls(
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
    content, calls = parse_tool_calls(answer, NAMES, "abc")
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
    assert parse_tool_calls(text, NAMES, "abc") == (text, [])
    content, calls = parse_tool_calls('{"name": "nope", "arguments": {}}', NAMES, "abc")
    assert content == '{"name": "nope", "arguments": {}}'
    assert calls == []
