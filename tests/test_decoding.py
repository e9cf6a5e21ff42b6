"""Streaming text across token boundaries and prompt-lookup drafting, without a model."""

from __future__ import annotations

from clawctl.engines.decoding import NgramIndex, TextStream


def stream(pieces: list[bytes], stops: tuple[str, ...] = ()) -> tuple[list[str], str, bool]:
    text = TextStream(stops)
    emitted = [text.feed(p) for p in pieces]
    return emitted, text.flush(), text.stopped


def test_utf8_split_across_tokens_is_emitted_whole() -> None:
    euro = "€".encode()
    emitted, tail, stopped = stream([b"a", euro[:1], euro[1:], b"b"])
    assert emitted == ["a", "", "€", "b"]
    assert (tail, stopped) == ("", False)


def test_stop_string_cuts_the_text_and_is_not_emitted() -> None:
    emitted, tail, stopped = stream([b"Hello ", b"wor", b"ld!", b" more"], stops=("world",))
    assert "".join(emitted) + tail == "Hello "
    assert stopped
    assert emitted[-1] == ""  # nothing after the stop


def test_text_that_may_begin_a_stop_is_held_back_then_released() -> None:
    emitted, tail, stopped = stream([b"a </", b"b>", b" c"], stops=("</s>",))
    assert emitted == ["a ", "</b>", " c"]
    assert not stopped
    emitted, tail, stopped = stream([b"x </"], stops=("</s>",))
    assert emitted == ["x "]
    assert tail == "</"  # the end of the generation releases it


def test_stop_spanning_pieces_and_earliest_of_several() -> None:
    emitted, tail, stopped = stream([b"1, 2", b", STO", b"P 3 END"], stops=("END", "STOP"))
    assert "".join(emitted) + tail == "1, 2, "
    assert stopped


def test_ngram_draft_follows_a_long_tail_seen_once() -> None:
    index = NgramIndex(n_min=2, n_max=3, trusted_n=3)
    index.extend([1, 2, 3, 4, 5, 9, 1, 2, 3])
    assert index.draft(3) == [4, 5, 9]  # "1 2 3" was followed by 4, then "2 3 4" by 5, ...
    assert index.draft(1) == [4]
    index.extend([7])
    assert index.draft(4) == []  # "3 7" never occurred before


def test_ngram_short_tail_needs_a_second_agreeing_occurrence() -> None:
    index = NgramIndex(n_min=2, n_max=4, trusted_n=4)
    index.extend([8, 1, 2, 5, 9, 1, 2])
    assert index.draft(2) == []  # "1 2" -> 5 seen once, and only a 2-token tail matches
    index.extend([5, 7, 1, 2])
    assert index.draft(1) == [5]  # "1 2" -> 5 twice now


def test_ngram_draft_stops_where_continuations_vary() -> None:
    # JSON-like records: `key` `:` then a value that changes each time, then `,` `next`.
    key, colon, comma, other = 10, 11, 12, 13
    records = [[key, colon, value, comma, other] for value in (100, 101, 102)]
    index = NgramIndex(n_min=2, n_max=3, trusted_n=3)
    for record in records:
        index.extend(record)
    index.extend([key])
    assert index.draft(5) == [colon]  # "other key" -> ":" always; ": value" varies
    index.extend([colon, 103])
    assert index.draft(5) == []  # "colon 103" is new, and "103" alone is below n_min
    index.extend([comma])
    assert index.draft(5) == []  # "103 ," is new
    index.extend([other])
    assert index.draft(5) == [key, colon]  # ", other" -> key -> ":" repeat; the value varies


def test_ngram_never_matches_the_tail_itself() -> None:
    index = NgramIndex(n_min=1, n_max=2, trusted_n=1)
    index.extend([4, 4])
    assert index.draft(1) == [4]  # "4" was followed by 4 once
    fresh = NgramIndex()
    fresh.extend([1, 2])
    assert fresh.draft(3) == []
