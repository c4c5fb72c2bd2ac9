"""PhaseTimer: exclusive phase times that add up to the step's wall time, on a fake clock."""

from __future__ import annotations

import pytest

import distill.phases as phases_module
from distill.phases import PHASES, PhaseTimer


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    """A clock the test advances by hand: `clock[0]` is what time.perf_counter returns."""
    now = [0.0]
    monkeypatch.setattr(phases_module.time, "perf_counter", lambda: now[0])
    return now


def test_nested_phases_are_exclusive_and_add_up_to_the_step(clock):
    timer = PhaseTimer(enabled=True)
    for batch in timer.timed(iter([1, 2]), "data"):
        clock[0] += 1.0  # after the fetch: 0 s in "data" on this clock, 1 s in no phase
        with timer.phase("student_forward"):
            clock[0] += 2.0
            with timer.phase("teacher_decoder"):  # pauses student_forward
                clock[0] += 4.0
            clock[0] += 8.0
        with timer.phase("optimizer"):
            clock[0] += 16.0 * batch
        timer.end_step()
    first, second = timer.steps
    assert set(first) == {*PHASES, "other", "total"}
    assert (first["student_forward"], first["teacher_decoder"], first["optimizer"]) == (10.0, 4.0, 16.0)
    assert (first["other"], first["total"], second["optimizer"], second["total"]) == (1.0, 31.0, 32.0, 47.0)
    assert first["total"] == sum(first[name] for name in (*PHASES, "other"))


def test_a_disabled_timer_records_nothing_and_unknown_phases_are_named(clock):
    timer = PhaseTimer()
    with timer.phase("anything"):  # disabled: not even checked
        clock[0] += 1.0
    timer.end_step()
    assert timer.steps == []
    with pytest.raises(ValueError, match="unknown phase 'decoder'; phases are data, prompt_sampling"):
        with PhaseTimer(enabled=True).phase("decoder"):
            pass
