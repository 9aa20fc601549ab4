"""The promotion state machine (SPEC §6), as data in the manner of h11's `_state.py`.

Pure and synchronous: no event loop, no store, no clock. `step(state, event, percent)` is the
whole decision; the runner (`promotion.Promotions`) and the admin calls only carry it out.

    RELEASING    the candidate is woken (if scaled to zero) and smoke-checked; no traffic yet
    RAMPING_UP   the candidate's share grows 10, 20, ... 100 %, one stage per duration/10
    PAUSED       the share holds; resume continues the stage where it stopped
    RAMPING_DOWN after a cancel: the share walks back down the same stages to 0
    SUCCEEDED    the candidate is the environment's deployment; the previous one is demoted
    FAILED       wake timeout, smoke check, or rollback: the candidate's share is 0 at once
    CANCELED     cancelled (after ramping down)

    RELEASING  --RAMP--> RAMPING_UP (first stage)        RELEASING --SWITCH--> SUCCEEDED (100 %)
    RAMPING_UP --STAGE_ELAPSED--> RAMPING_UP (+1 stage), at 100 %: SUCCEEDED
    RAMPING_UP --PAUSE--> PAUSED --RESUME--> RAMPING_UP
    RELEASING / RAMPING_UP / PAUSED --CANCEL--> RAMPING_DOWN, or CANCELED when no traffic moved yet
    RAMPING_DOWN --STAGE_ELAPSED--> RAMPING_DOWN (-1 stage), at the last stage: CANCELED (0 %)
    any running state --FORCE_CANCEL--> CANCELED (0 % at once, no ramp down)
    RAMPING_UP / PAUSED / RAMPING_DOWN --FORCE_ROLL_FORWARD--> SUCCEEDED (100 % at once); not from
        RELEASING: the candidate is not yet woken and smoke-checked
    any running state --FAIL--> FAILED (0 %)

Which edge an event takes may depend on the share (`Level`: none, the last stage, some, all), so
the table is keyed by (state, event, level); a `None` level is "any share".
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

STAGES = 10
STAGE_PERCENT = 100 // STAGES


class State(enum.Enum):
    RELEASING = "RELEASING"
    RAMPING_UP = "RAMPING_UP"
    PAUSED = "PAUSED"
    RAMPING_DOWN = "RAMPING_DOWN"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"


class Event(enum.Enum):
    RAMP = "ramp"  # released (woken, smoke-checked) with a ramp: the first stage starts
    SWITCH = "switch"  # released without a ramp: the candidate takes every call at once
    STAGE_ELAPSED = "stage_elapsed"  # the current stage's time is over
    PAUSE = "pause"  # admin call
    RESUME = "resume"  # admin call
    CANCEL = "cancel"  # admin call
    FORCE_CANCEL = "force_cancel"  # admin call: back to the previous deployment at once
    FORCE_ROLL_FORWARD = "force_roll_forward"  # admin call: the candidate takes every call at once
    FAIL = "fail"  # wake timeout, smoke check, rollback rule, the candidate or its model gone


class Level(enum.Enum):
    """The candidate's share, as far as the table cares."""

    NONE = "0 %"
    LAST = "one stage"  # ramping down from here ends the ramp
    SOME = "between"
    ALL = "100 %"


class Share(enum.Enum):
    """What an edge does to the candidate's share."""

    KEEP = "keep"
    ZERO = "0 %"
    FIRST = "first stage"
    UP = "+1 stage"
    DOWN = "-1 stage"
    ALL = "100 %"

    def apply(self, percent: int) -> int:
        match self:
            case Share.KEEP:
                return percent
            case Share.ZERO:
                return 0
            case Share.FIRST:
                return STAGE_PERCENT
            case Share.UP:
                return min(100, percent + STAGE_PERCENT)
            case Share.DOWN:
                return max(0, percent - STAGE_PERCENT)
            case Share.ALL:
                return 100


@dataclass(frozen=True, slots=True)
class Edge:
    to: State
    share: Share


S, E, L = State, Event, Level
_MOVED = (L.LAST, L.SOME, L.ALL)  # some traffic already went to the candidate
TRANSITIONS: Mapping[tuple[State, Event, Level | None], Edge] = MappingProxyType(
    {
        (S.RELEASING, E.RAMP, None): Edge(S.RAMPING_UP, Share.FIRST),
        (S.RELEASING, E.SWITCH, None): Edge(S.SUCCEEDED, Share.ALL),
        (S.RELEASING, E.CANCEL, None): Edge(S.CANCELED, Share.ZERO),
        (S.RELEASING, E.FAIL, None): Edge(S.FAILED, Share.ZERO),
        (S.RAMPING_UP, E.STAGE_ELAPSED, L.NONE): Edge(S.RAMPING_UP, Share.UP),
        (S.RAMPING_UP, E.STAGE_ELAPSED, L.LAST): Edge(S.RAMPING_UP, Share.UP),
        (S.RAMPING_UP, E.STAGE_ELAPSED, L.SOME): Edge(S.RAMPING_UP, Share.UP),
        (S.RAMPING_UP, E.STAGE_ELAPSED, L.ALL): Edge(S.SUCCEEDED, Share.ALL),
        (S.RAMPING_UP, E.PAUSE, None): Edge(S.PAUSED, Share.KEEP),
        (S.RAMPING_UP, E.CANCEL, L.NONE): Edge(S.CANCELED, Share.ZERO),
        **{(S.RAMPING_UP, E.CANCEL, level): Edge(S.RAMPING_DOWN, Share.KEEP) for level in _MOVED},
        (S.RAMPING_UP, E.FAIL, None): Edge(S.FAILED, Share.ZERO),
        (S.PAUSED, E.RESUME, None): Edge(S.RAMPING_UP, Share.KEEP),
        (S.PAUSED, E.CANCEL, L.NONE): Edge(S.CANCELED, Share.ZERO),
        **{(S.PAUSED, E.CANCEL, level): Edge(S.RAMPING_DOWN, Share.KEEP) for level in _MOVED},
        (S.PAUSED, E.FAIL, None): Edge(S.FAILED, Share.ZERO),
        (S.RAMPING_DOWN, E.STAGE_ELAPSED, L.NONE): Edge(S.CANCELED, Share.ZERO),
        (S.RAMPING_DOWN, E.STAGE_ELAPSED, L.LAST): Edge(S.CANCELED, Share.ZERO),
        (S.RAMPING_DOWN, E.STAGE_ELAPSED, L.SOME): Edge(S.RAMPING_DOWN, Share.DOWN),
        (S.RAMPING_DOWN, E.STAGE_ELAPSED, L.ALL): Edge(S.RAMPING_DOWN, Share.DOWN),
        (S.RAMPING_DOWN, E.FAIL, None): Edge(S.FAILED, Share.ZERO),
        **{
            (state, E.FORCE_CANCEL, None): Edge(S.CANCELED, Share.ZERO)
            for state in (S.RELEASING, S.RAMPING_UP, S.PAUSED, S.RAMPING_DOWN)
        },
        **{
            (state, E.FORCE_ROLL_FORWARD, None): Edge(S.SUCCEEDED, Share.ALL)
            for state in (S.RAMPING_UP, S.PAUSED, S.RAMPING_DOWN)
        },
    }
)
del S, E, L

RUNNING: frozenset[State] = frozenset(state for state, _, _ in TRANSITIONS)  # states with a way out
TERMINAL: frozenset[State] = frozenset(State) - RUNNING
WATCHED: frozenset[State] = frozenset({State.RAMPING_UP, State.PAUSED})  # the rollback rule applies


class InvalidTransition(ValueError):
    """An event that a promotion does not accept in its state (an admin call gets 409 for it)."""

    def __init__(self, state: State, event: Event, percent: int) -> None:
        valid = valid_events(state, percent)
        names = ", ".join(e.name for e in valid) or "none: the promotion has ended"
        super().__init__(
            f"promotion: event {event.name} is invalid in state {state.name} at {percent}% (valid: {names})"
        )
        self.state = state
        self.event = event
        self.valid = valid


def level(percent: int) -> Level:
    if percent <= 0:
        return Level.NONE
    if percent >= 100:
        return Level.ALL
    return Level.LAST if percent <= STAGE_PERCENT else Level.SOME


def _edge(state: State, event: Event, percent: int) -> Edge | None:
    return TRANSITIONS.get((state, event, level(percent))) or TRANSITIONS.get((state, event, None))


def valid_events(state: State, percent: int) -> tuple[Event, ...]:
    """The events `state` accepts at this share, in the order `Event` declares them."""
    return tuple(event for event in Event if _edge(state, event, percent) is not None)


def step(state: State, event: Event, percent: int) -> tuple[State, int]:
    """The state and share after `event`; raises `InvalidTransition` (listing the valid events) when there is no edge."""
    edge = _edge(state, event, percent)
    if edge is None:
        raise InvalidTransition(state, event, percent)
    return edge.to, edge.share.apply(percent)


# -- the record -------------------------------------------------------------------------------


def stage_seconds(record: Mapping[str, Any]) -> float:
    """How long one stage of this promotion's ramp lasts."""
    return float(record.get("ramp_up_duration_seconds") or 0) / STAGES


def advance(record: Mapping[str, Any], event: Event, now: float) -> dict[str, Any]:
    """A promotion record (as persisted, SPEC §6) after `event` at wall-clock time `now`: the state and
    share from `step`, and the stage timing an edge carries (a new stage starts, a pause keeps what is
    left of the stage, a resume continues it). Raises `InvalidTransition`."""
    state, percent = State(record["status"]), int(record["percent"])
    to, share = step(state, event, percent)
    out = {**record, "status": to.value, "percent": share}
    if event is Event.PAUSE:
        out["paused_remaining"] = max(0.0, stage_seconds(record) - (now - record["stage_started_at"]))
    elif event is Event.RESUME:
        out["stage_started_at"] = now - (stage_seconds(record) - (record.get("paused_remaining") or 0.0))
        out["paused_remaining"] = None
    elif to in (State.RAMPING_UP, State.RAMPING_DOWN):
        out["stage_started_at"] = now  # the first stage, the next one, or the first stage down
    return out


def describe(record: Mapping[str, Any]) -> str:
    """A few words for the log and the table's change reason: "stage 3", "ramping down", ..."""
    state = State(record["status"])
    if state is State.RAMPING_UP:
        return f"stage {int(record['percent']) // STAGE_PERCENT}"
    return {State.RAMPING_DOWN: "ramping down", State.CANCELED: "ramped down"}.get(state, state.value.lower())
