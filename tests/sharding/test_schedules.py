"""Pipeline schedules: each builds complete and deadlock-free, and the simulator's bubble and
activation counts match the published formulas."""
from __future__ import annotations

import math

import pytest

from sharding.errors import ShardingError
from sharding.schedules import (SCHEDULES, Action, Schedule, ScheduleError, bubble_formula, build, in_flight,
                                interleaved_1f1b, one_f_one_b, render, render_timeline, simulate, validate,
                                zb_h1)

SIZES = [(2, 4), (2, 8), (4, 4), (4, 8), (3, 5)]


def _schedule(name, p, m, ranks):
    """A hand-made schedule from rank strings like "F0 B0"."""
    actions = tuple(tuple(Action(word[0], int(word[1:])) for word in rank.split()) for rank in ranks)
    return Schedule(name, p, m, 1, actions)


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p, m", SIZES)
def test_gpipe_and_1f1b_bubble_is_p_minus_1_over_m_plus_p_minus_1(name, p, m):
    bubble = simulate(build(name, p, m), forward=1, backward=2).bubble
    assert math.isclose(bubble, (p - 1) / (m + p - 1))
    assert math.isclose(bubble, bubble_formula(name, p, m))


@pytest.mark.parametrize("p, m, v", [(2, 4, 2), (4, 8, 2), (4, 8, 3), (4, 12, 4), (2, 2, 4)])
def test_interleaved_bubble_shrinks_v_fold(p, m, v):
    bubble = simulate(build("interleaved_1f1b", p, m, v), forward=1, backward=2).bubble
    assert math.isclose(bubble, (p - 1) / (v * m + p - 1))
    assert bubble < simulate(build("1f1b", p, m)).bubble


@pytest.mark.parametrize("p, m", [(p, m) for p, m in SIZES if m % p == 0])
def test_interleaved_with_one_chunk_is_1f1b(p, m):
    assert interleaved_1f1b(p, m, 1).actions == one_f_one_b(p, m).actions


def test_interleaved_orders_chunks_in_groups_of_p():
    rank = interleaved_1f1b(2, 4, 2).actions[1]
    forwards = [(a.microbatch, a.chunk) for a in rank if a.kind == "F"]
    backwards = [(a.microbatch, a.chunk) for a in rank if a.kind == "B"]
    assert forwards == [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (3, 0), (2, 1), (3, 1)]
    assert backwards == [(0, 1), (1, 1), (0, 0), (1, 0), (2, 1), (3, 1), (2, 0), (3, 0)]


@pytest.mark.parametrize("p, m", SIZES + [(8, 16)])
def test_zb_h1_cuts_the_1f1b_bubble_to_a_third_at_1f1b_peak_memory(p, m):
    zb, baseline = build("zb_h1", p, m), build("1f1b", p, m)
    bubble = simulate(zb, forward=1, backward=2, weight=1).bubble
    assert bubble < simulate(baseline, forward=1, backward=2).bubble
    assert math.isclose(bubble, bubble_formula("zb_h1", p, m))  # (p-1)/(3m+p-1), the paper's third
    assert max(in_flight(zb)) == max(in_flight(baseline)) == p
    assert all(sum(a.kind == "W" for a in rank) == m for rank in zb.actions)


@pytest.mark.parametrize("p, m", SIZES)
def test_zb_h1_without_delayed_weights_keeps_1f1b_memory_per_rank(p, m):
    undelayed = zb_h1(p, m, delay_weights=False)
    validate(undelayed)
    assert in_flight(undelayed) == in_flight(one_f_one_b(p, m))
    bubble = simulate(undelayed, forward=1, backward=2, weight=1).bubble
    assert math.isclose(bubble, 2 * (p - 1) / (3 * m + 2 * (p - 1)))
    assert bubble < simulate(one_f_one_b(p, m)).bubble


def test_weight_defaults_to_half_the_backward():
    schedule = build("zb_h1", 4, 8)
    assert simulate(schedule, backward=3).makespan == simulate(schedule, backward=3, weight=1.5).makespan
    spans = simulate(schedule, forward=1, backward=3, weight=1).spans[0]
    assert {a.kind: end - start for a, start, end in spans} == {"F": 1, "B": 2, "W": 1}


@pytest.mark.parametrize("p, m", SIZES)
def test_in_flight_gpipe_holds_all_and_1f1b_holds_p_minus_r(p, m):
    assert in_flight(build("gpipe", p, m)) == [m] * p
    assert in_flight(build("1f1b", p, m)) == [p - r for r in range(p)]


BUILDABLE = [(name, p, m, v) for name in SCHEDULES
             for p, m, v in [(1, 1, 1), (1, 3, 1), (2, 2, 1), (4, 8, 1), (4, 3, 1), (4, 8, 2), (3, 6, 3)]
             if (v == 1 or name == "interleaved_1f1b") and (m % p == 0 or name != "interleaved_1f1b")]


@pytest.mark.parametrize("name, p, m, v", BUILDABLE)
def test_every_built_schedule_validates(name, p, m, v):
    schedule = build(name, p, m, v)
    validate(schedule)
    assert (schedule.stages, schedule.microbatches, schedule.virtual) == (p, m, v)
    assert schedule.splits_backward == (name == "zb_h1")


def test_backward_before_its_forward_deadlocks_naming_the_action():
    schedule = _schedule("bad", 2, 2, ["F0 F1 B0 B1", "B0 F0 F1 B1"])
    with pytest.raises(ScheduleError, match=r"rank 1 next runs B0 but waits for F0 of stage 1 \(rank 1\)"):
        validate(schedule)


def test_two_ranks_waiting_on_each_other_deadlock():
    # rank 0's B0 needs rank 1's B0, which comes after rank 1's F1, which needs rank 0's F1.
    schedule = _schedule("crossed", 2, 2, ["F0 B0 F1 B1", "F1 F0 B0 B1"])
    with pytest.raises(ScheduleError) as error:
        simulate(schedule)
    assert "rank 0 next runs B0 but waits for B0 of stage 1" in str(error.value)
    assert "rank 1 next runs F1 but waits for F1 of stage 0" in str(error.value)


def test_missing_and_repeated_actions_are_named():
    with pytest.raises(ScheduleError, match="rank 0: missing B1"):
        validate(_schedule("short", 2, 2, ["F0 F1 B0", "F0 B0 F1 B1"]))
    with pytest.raises(ScheduleError, match="rank 1: missing B1; unexpected or repeated B0"):
        validate(_schedule("twice", 2, 2, ["F0 F1 B0 B1", "F0 B0 F1 B0"]))
    split = build("zb_h1", 2, 2)
    partial = Schedule("partial", 2, 2, 1, (split.actions[0], tuple(a for a in split.actions[1] if a != Action("W", 1))))
    with pytest.raises(ScheduleError, match="rank 1: missing W1"):
        validate(partial)


def test_bad_names_and_sizes_raise_schedule_errors():
    with pytest.raises(ScheduleError, match="gpipe, 1f1b, interleaved_1f1b, zb_h1") as error:
        build("pipedream", 2, 4)
    assert isinstance(error.value, ShardingError) and isinstance(error.value, ValueError)
    with pytest.raises(ScheduleError, match="divisible.*m=6, p=4: use m=8"):
        build("interleaved_1f1b", 4, 6, 2)
    with pytest.raises(ScheduleError, match="virtual=2"):
        build("1f1b", 2, 4, 2)
    with pytest.raises(ScheduleError, match="microbatches must be a positive int, got 0"):
        build("gpipe", 2, 0)
    with pytest.raises(ScheduleError, match="expected one of"):
        bubble_formula("pipedream", 2, 4)


def test_actions_print_compactly():
    assert [str(a) for a in (Action("F", 3), Action("B", 0), Action("W", 2, 1))] == ["F3", "B0", "W2.1"]
    assert sorted([Action("F", 1), Action("B", 2), Action("F", 0)])[0] == Action("B", 2)


def test_render_lists_each_rank_in_order():
    text = render(build("1f1b", 2, 3))
    assert text.splitlines() == ["1f1b p=2 m=3 v=1", "rank 0: F0 F1 B0 F2 B1 B2", "rank 1: F0 B0 F1 B1 F2 B2"]
    assert "rank 1: F0.0 F1.0 F0.1 B0.1 F1.1 B1.1 F2.0 B0.0" in render(build("interleaved_1f1b", 2, 4, 2))


def test_render_timeline_marks_idle_time():
    timeline = simulate(build("1f1b", 2, 2), forward=1, backward=2)
    assert timeline.makespan == 9
    assert render_timeline(timeline, width=9).splitlines() == [
        "1f1b p=2 m=2 v=1: makespan 9, bubble 0.333", "rank 0 |FF..BB.BB|", "rank 1 |.FBBFBB..|"]
