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


def test_ngram_draft_proposes_what_followed_the_tail_last_time() -> None:
    index = NgramIndex(n_min=2, n_max=3)
    index.extend([1, 2, 3, 4, 5, 9, 1, 2, 3])
    assert index.draft(3) == [4, 5, 9]  # "1 2 3" was followed by 4 5 9
    assert index.draft(1) == [4]
    index.extend([7])
    assert index.draft(4) == []  # "3 7" never occurred before


def test_ngram_draft_prefers_the_longest_match_and_the_latest_occurrence() -> None:
    index = NgramIndex(n_min=2, n_max=3)
    index.extend([5, 6, 1, 8, 8, 6, 1, 9, 0, 7, 6, 1])
    # "7 6 1" never occurred; "6 1" occurred twice, the latest was followed by 9 0
    assert index.draft(2) == [9, 0]
    index.extend([9])
    assert index.draft(5) == [0, 7, 6, 1, 9]  # "6 1 9" (n=3) again, up to the tail itself


def test_ngram_never_matches_the_tail_itself() -> None:
    index = NgramIndex(n_min=1, n_max=2)
    index.extend([4, 4])
    assert index.draft(3) == [4]  # "4" ended at 0 and was followed by the 4 at 1
    fresh = NgramIndex()
    fresh.extend([1, 2])
    assert fresh.draft(3) == []
