"""Streaming text across token boundaries and prompt-lookup drafting, without a model."""

from __future__ import annotations

from clawctl.engines.decoding import DraftPacer, NgramIndex, StepCosts, TextStream


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


def measured(one: float, per_extra: float, depth: int = 0, longest: int = 9) -> StepCosts:
    """Step costs as a box would measure them: `one` second for a step of one token and
    `per_extra` for each further token in the step."""
    costs = StepCosts()
    for n in range(1, longest + 1):
        costs.observe(depth, n, one + per_extra * (n - 1))
    return costs


def test_step_costs_are_measured_per_depth_and_fall_back_to_the_prior() -> None:
    costs = measured(0.1, 0.01, depth=12_000)
    assert abs(costs.ratio(12_000, 5) - 1.4) < 1e-9
    assert costs.ratio(100, 5) == 3.05  # nothing measured that shallow: the prior curve
    assert costs.ratio(100, 3) > costs.ratio(100, 2) > 1.0
    assert costs.ratio(12_000, 1) == 1.0
    costs.observe(12_000, 5, 0.05)  # a noisy step cannot make drafts cheaper than free
    costs.observe(12_000, 5, 0.05)
    assert costs.ratio(12_000, 5) >= 1.0


def test_cheap_verify_steps_draft_long_and_compute_bound_ones_draft_nothing_unproven() -> None:
    flat = DraftPacer(measured(0.1, 0.002))  # memory-bound: a 9-token step costs 1.16 steps
    assert flat.length(0, 8) == 8
    linear = DraftPacer(measured(0.1, 0.1))  # every token costs a whole step: never pays
    assert linear.length(0, 8) == 0


def test_misses_stop_drafting_and_probes_back_off() -> None:
    pacer = DraftPacer(StepCosts())  # the prior curve: a compute-bound small CPU
    assert pacer.length(0, 8) > 0
    probes = []
    for _ in range(6):
        steps = 0
        while (length := pacer.length(0, 8)) == 0:
            steps += 1
            assert steps < 1000
        probes.append(steps)
        pacer.record(length, 0)  # free text: the draft never holds
    assert probes[0] == 0
    assert probes[1:] == sorted(probes[1:])
    assert probes[-1] >= 4 * probes[1] > 0


def next_draft(pacer: DraftPacer) -> int:
    """The length of the next step that drafts (steps that do not are skipped)."""
    for _ in range(1000):
        if length := pacer.length(0, 8):
            return length
    raise AssertionError("the pacer never drafts again")


def test_drafts_that_hold_grow_and_a_held_probe_resumes_drafting() -> None:
    pacer = DraftPacer(StepCosts())
    for _ in range(3):
        pacer.record(next_draft(pacer), 0)
    probe = next_draft(pacer)
    assert probe == DraftPacer.PROBE
    lengths = []
    for _ in range(6):  # copying the context: every draft holds
        length = pacer.length(0, 8)
        lengths.append(length)
        pacer.record(length, length)
    assert all(n > 0 for n in lengths)
    assert lengths[-1] == 8
    assert pacer.acceptance > 0.9


def test_a_draft_model_as_costly_as_its_target_is_not_worth_drafting_with() -> None:
    costs = measured(0.1, 0.002)  # verify steps nearly free (memory-bound)
    pacer = DraftPacer(costs)
    assert pacer.length(0, 8, by_model=True) == 8  # the draft model's cost not timed yet
    costs.observe_draft(0.1)  # as slow per token as the target
    assert pacer.length(0, 8, by_model=True) == 0
    assert pacer.length(0, 8) == 8  # prompt-lookup drafts cost nothing to make
    cheap = measured(0.1, 0.002)
    cheap.observe_draft(0.01)  # a draft model ten times faster per token
    assert DraftPacer(cheap).length(0, 8, by_model=True) > 0


def test_a_generation_that_always_drafts_still_weighs_its_draft_model() -> None:
    costs = StepCosts()
    costs.observe(0, 5, 0.305)  # only verify steps timed: one token would take ~0.1 s
    costs.observe_draft(0.1)
    assert 0.9 < costs.draft_ratio(0) < 1.1
