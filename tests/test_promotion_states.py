"""The promotion state machine (SPEC §6) as a table: every edge, every refusal, the record's timing.

Pure: no process, no event loop, no clock (times are given).
"""

from __future__ import annotations

import pytest

from gateway.environments import overlay
from gateway.environments.promotion import STATES
from gateway.environments.promotion_states import (
    RUNNING,
    STAGE_PERCENT,
    TERMINAL,
    TRANSITIONS,
    Event,
    InvalidTransition,
    State,
    advance,
    describe,
    level,
    step,
    valid_events,
)

S, E = State, Event


@pytest.mark.parametrize(
    ("state", "event", "percent", "after"),
    [
        (S.RELEASING, E.RAMP, 0, (S.RAMPING_UP, 10)),
        (S.RELEASING, E.SWITCH, 0, (S.SUCCEEDED, 100)),
        (S.RELEASING, E.CANCEL, 0, (S.CANCELED, 0)),
        (S.RELEASING, E.FAIL, 0, (S.FAILED, 0)),
        (S.RAMPING_UP, E.STAGE_ELAPSED, 10, (S.RAMPING_UP, 20)),
        (S.RAMPING_UP, E.STAGE_ELAPSED, 90, (S.RAMPING_UP, 100)),
        (S.RAMPING_UP, E.STAGE_ELAPSED, 100, (S.SUCCEEDED, 100)),  # the last stage is served in full first
        (S.RAMPING_UP, E.PAUSE, 40, (S.PAUSED, 40)),
        (S.RAMPING_UP, E.CANCEL, 40, (S.RAMPING_DOWN, 40)),
        (S.RAMPING_UP, E.CANCEL, 0, (S.CANCELED, 0)),
        (S.RAMPING_UP, E.FAIL, 70, (S.FAILED, 0)),
        (S.PAUSED, E.RESUME, 30, (S.RAMPING_UP, 30)),
        (S.PAUSED, E.CANCEL, 30, (S.RAMPING_DOWN, 30)),
        (S.PAUSED, E.CANCEL, 100, (S.RAMPING_DOWN, 100)),
        (S.PAUSED, E.FAIL, 30, (S.FAILED, 0)),
        (S.RAMPING_DOWN, E.STAGE_ELAPSED, 100, (S.RAMPING_DOWN, 90)),
        (S.RAMPING_DOWN, E.STAGE_ELAPSED, 20, (S.RAMPING_DOWN, 10)),
        (S.RAMPING_DOWN, E.STAGE_ELAPSED, 10, (S.CANCELED, 0)),
        (S.RAMPING_DOWN, E.FAIL, 50, (S.FAILED, 0)),
        (S.RELEASING, E.FORCE_CANCEL, 0, (S.CANCELED, 0)),
        (S.RAMPING_UP, E.FORCE_CANCEL, 50, (S.CANCELED, 0)),
        (S.RAMPING_DOWN, E.FORCE_CANCEL, 30, (S.CANCELED, 0)),
        (S.PAUSED, E.FORCE_ROLL_FORWARD, 20, (S.SUCCEEDED, 100)),
        (S.RAMPING_DOWN, E.FORCE_ROLL_FORWARD, 40, (S.SUCCEEDED, 100)),
    ],
)
def test_step(state: State, event: Event, percent: int, after: tuple[State, int]) -> None:
    assert step(state, event, percent) == after


@pytest.mark.parametrize(
    ("state", "event", "percent", "valid"),
    [
        (S.RELEASING, E.PAUSE, 0, "RAMP, SWITCH, CANCEL, FORCE_CANCEL, FAIL"),
        (S.RELEASING, E.STAGE_ELAPSED, 0, "RAMP, SWITCH, CANCEL, FORCE_CANCEL, FAIL"),
        (S.RAMPING_UP, E.RESUME, 50, "STAGE_ELAPSED, PAUSE, CANCEL, FORCE_CANCEL, FORCE_ROLL_FORWARD, FAIL"),
        (S.RAMPING_UP, E.RAMP, 50, "STAGE_ELAPSED, PAUSE, CANCEL, FORCE_CANCEL, FORCE_ROLL_FORWARD, FAIL"),
        (S.PAUSED, E.PAUSE, 50, "RESUME, CANCEL, FORCE_CANCEL, FORCE_ROLL_FORWARD, FAIL"),
        (S.PAUSED, E.STAGE_ELAPSED, 50, "RESUME, CANCEL, FORCE_CANCEL, FORCE_ROLL_FORWARD, FAIL"),
        (S.RAMPING_DOWN, E.CANCEL, 50, "STAGE_ELAPSED, FORCE_CANCEL, FORCE_ROLL_FORWARD, FAIL"),
        (S.RAMPING_DOWN, E.PAUSE, 50, "STAGE_ELAPSED, FORCE_CANCEL, FORCE_ROLL_FORWARD, FAIL"),
        (S.SUCCEEDED, E.CANCEL, 100, "none: the promotion has ended"),
        (S.FAILED, E.RESUME, 0, "none: the promotion has ended"),
        (S.CANCELED, E.FAIL, 0, "none: the promotion has ended"),
    ],
)
def test_an_invalid_event_names_the_valid_ones(state: State, event: Event, percent: int, valid: str) -> None:
    with pytest.raises(InvalidTransition) as caught:
        step(state, event, percent)
    assert str(caught.value) == (
        f"promotion: event {event.name} is invalid in state {state.name} at {percent}% (valid: {valid})"
    )
    assert caught.value.state is state and caught.value.event is event


def test_a_full_ramp_and_a_ramp_down_walk_the_ten_stages() -> None:
    state, percent = step(S.RELEASING, E.RAMP, 0)
    seen = [percent]
    while state is S.RAMPING_UP:
        state, percent = step(state, E.STAGE_ELAPSED, percent)
        seen.append(percent)
    assert state is S.SUCCEEDED and seen == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 100]
    state, percent = step(S.RAMPING_UP, E.CANCEL, 70)
    down = [percent]
    while state is S.RAMPING_DOWN:
        state, percent = step(state, E.STAGE_ELAPSED, percent)
        down.append(percent)
    assert state is S.CANCELED and down == [70, 60, 50, 40, 30, 20, 10, 0]


def test_the_table_is_closed_and_agrees_with_the_overlay() -> None:
    assert {edge.to for edge in TRANSITIONS.values()} | {s for s, _, _ in TRANSITIONS} == set(State)
    assert TERMINAL == {S.SUCCEEDED, S.FAILED, S.CANCELED}
    assert {s.value for s in RUNNING} == overlay.RUNNING  # what the overlay treats as running (409 on promote)
    assert STATES == tuple(s.value for s in State)  # the metric's label values
    for state in RUNNING:
        assert E.FAIL in valid_events(state, 50)  # a running promotion can always fail


@pytest.mark.parametrize(("percent", "name"), [(0, "NONE"), (10, "LAST"), (11, "SOME"), (90, "SOME"), (100, "ALL")])
def test_levels(percent: int, name: str) -> None:
    assert level(percent).name == name and STAGE_PERCENT == 10


RECORD = {"status": "RAMPING_UP", "percent": 30, "ramp_up_duration_seconds": 100, "stage_started_at": 1000.0,
          "paused_remaining": None, "deployment_id": "v2"}  # fmt: skip


def test_advance_carries_the_stage_timing() -> None:
    paused = advance(RECORD, E.PAUSE, now=1004.0)  # 4 s into a 10 s stage
    assert (paused["status"], paused["percent"], paused["paused_remaining"]) == ("PAUSED", 30, 6.0)
    resumed = advance(paused, E.RESUME, now=2000.0)  # the stage continues with its 6 s left
    assert (resumed["status"], resumed["stage_started_at"], resumed["paused_remaining"]) == ("RAMPING_UP", 1996.0, None)
    nxt = advance(RECORD, E.STAGE_ELAPSED, now=1010.0)
    assert (nxt["percent"], nxt["stage_started_at"]) == (40, 1010.0)
    down = advance(RECORD, E.CANCEL, now=1003.0)
    assert (down["status"], down["percent"], down["stage_started_at"]) == ("RAMPING_DOWN", 30, 1003.0)
    assert advance(RECORD, E.FAIL, now=1003.0)["stage_started_at"] == 1000.0  # only the state and share move
    assert RECORD["status"] == "RAMPING_UP"  # the record given is never changed


@pytest.mark.parametrize(
    ("status", "percent", "words"),
    [("RAMPING_UP", 10, "stage 1"), ("RAMPING_UP", 100, "stage 10"), ("RAMPING_DOWN", 50, "ramping down"),
     ("CANCELED", 0, "ramped down"), ("FAILED", 0, "failed"), ("SUCCEEDED", 100, "succeeded")],
)  # fmt: skip
def test_describe(status: str, percent: int, words: str) -> None:
    assert describe({"status": status, "percent": percent}) == words
