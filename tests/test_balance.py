"""Replica balancing, outlier ejection and retry decisions (issue 5), pure: fake clock, seeded random."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.routing.model import Deployment, Plane, Upstream
from gateway.upstream.balance import (
    OUTCOMES,
    TRANSITIONS,
    EjectionPolicy,
    Endpoint,
    EndpointSet,
    Event,
    Health,
    InvalidTransition,
    RetryBudget,
    deployment_key,
    replica_count,
    replica_layout,
    should_retry,
    transition,
)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class NoRandom(random.Random):
    """A Random that fails the test if a decision consults it."""

    def random(self) -> float:
        raise AssertionError("randomness used")

    def randrange(self, *args, **kwargs) -> int:  # type: ignore[override]
        raise AssertionError("randomness used")


def ups(n: int, first: int = 0) -> tuple[Upstream, ...]:
    return tuple(Upstream("http", f"10.0.0.{i}", 8000) for i in range(first, first + n))


def make(
    n: int, capacity: int | None = None, seed: int = 0, policy: EjectionPolicy | None = None
) -> tuple[EndpointSet, FakeClock]:
    clock = FakeClock()
    s = EndpointSet(
        ("m", "v1"), ups(n), capacity, clock=clock, rng=random.Random(seed), policy=policy or EjectionPolicy()
    )
    return s, clock


def run(s: EndpointSet, ep: Endpoint, outcome: str, times: int = 1) -> None:
    for _ in range(times):
        s.started(ep)
        s.finished(ep, outcome)  # type: ignore[arg-type]


def eject(s: EndpointSet, ep: Endpoint) -> float:
    """Eject `ep` by failures (one while PROBING, five while HEALTHY); returns its back-off."""
    now = s.clock()
    run(s, ep, "failure", 1 if ep.state is Health.PROBING else s.policy.consecutive_failures)
    assert ep.state is Health.EJECTED
    return ep.ejected_until - now


def snapshot(ep: Endpoint) -> tuple:
    return (ep.state, ep.failures, ep.ejections, ep.ejected_until, ep.capacity)


# -- the state machine as data --------------------------------------------------------------------


@pytest.mark.parametrize(("edge", "target"), list(TRANSITIONS.items()), ids=lambda v: getattr(v, "name", str(v)))
def test_valid_transitions(edge: tuple[Health, Event], target: Health) -> None:
    assert transition(*edge) is target


INVALID = [(s, e) for s in Health for e in Event if (s, e) not in TRANSITIONS]


@pytest.mark.parametrize(("state", "event"), INVALID, ids=[f"{s.name}-{e.name}" for s, e in INVALID])
def test_every_invalid_transition_raises(state: Health, event: Event) -> None:
    with pytest.raises(InvalidTransition, match=f"event {event.name} is invalid in state {state.name}"):
        transition(state, event)


def test_transition_table_shape() -> None:
    assert sorted(f"{s.name} {e.name}" for s, e in INVALID) == [
        "EJECTED FAILURE_THRESHOLD",  # failures of calls on an ejected endpoint are not counted
        "EJECTED SUCCESS",  # neither are successes of calls that started before the ejection
        "HEALTHY BACKOFF_EXPIRED",
        "HEALTHY CAP_RELEASE",
        "PROBING BACKOFF_EXPIRED",
        "PROBING CAP_RELEASE",
    ]
    # every state can be entered and left
    assert set(TRANSITIONS.values()) == set(Health)
    assert {state for (state, _), target in TRANSITIONS.items() if target is not state} == set(Health)


# -- power of two choices ---------------------------------------------------------------------------


def test_single_endpoint_uses_no_randomness() -> None:
    s = EndpointSet("k", ups(1), clock=FakeClock(), rng=NoRandom())
    assert s.pick() is s.endpoints[0]
    two = EndpointSet("k", ups(2), clock=FakeClock(), rng=NoRandom())
    assert two.pick(exclude=frozenset([two.endpoints[0]])) is two.endpoints[1]


@pytest.mark.parametrize("by", ["endpoint", "upstream"])
def test_pick_honours_exclude_and_returns_none_when_nothing_is_eligible(by: str) -> None:
    s, _ = make(3)
    keys = [ep if by == "endpoint" else ep.upstream for ep in s.endpoints]
    assert s.pick(exclude=frozenset(keys)) is None
    for _ in range(200):
        assert s.pick(exclude=frozenset(keys[:2])) is s.endpoints[2]
        assert s.pick(exclude=frozenset(keys[1:2])) in (s.endpoints[0], s.endpoints[2])


def test_pick_is_deterministic_for_a_seed() -> None:
    a, _ = make(5, seed=42)
    b, _ = make(5, seed=42)
    assert [a.endpoints.index(a.pick()) for _ in range(100)] == [b.endpoints.index(b.pick()) for _ in range(100)]


def test_equal_load_is_spread_uniformly() -> None:
    s, _ = make(4, capacity=8, seed=7)
    picks: Counter[int] = Counter()
    for _ in range(40_000):
        ep = s.pick()
        s.started(ep)
        s.finished(ep, "ok")
        picks[s.endpoints.index(ep)] += 1
    # binomial sd of a share here is 0.22 %; 1.5 % is a wide margin
    assert all(abs(picks[i] / 40_000 - 0.25) < 0.015 for i in range(4)), picks


def test_a_loaded_endpoint_is_picked_far_less() -> None:
    s, _ = make(4, capacity=4, seed=3)
    busy = s.endpoints[0]
    for _ in range(20):
        s.started(busy)
    picks = Counter(s.pick() for _ in range(10_000))
    assert picks[busy] < 100  # 1 %; P2C never prefers the strictly busiest endpoint
    assert all(picks[ep] > 2_500 for ep in s.endpoints[1:])


def test_load_is_compared_relative_to_capacity() -> None:
    s, _ = make(2, capacity=10, seed=1)
    big, small = s.endpoints
    big.capacity, small.capacity = 100, 10  # uneven capacities, set directly to test the comparison
    for _ in range(50):
        s.started(big)  # 50 % of its capacity
    for _ in range(6):
        s.started(small)  # 60 % of its capacity: busier, though fewer calls
    assert {s.pick() for _ in range(100)} == {big}


def test_unbounded_capacity_compares_raw_in_flight() -> None:
    s, _ = make(2, capacity=None, seed=1)
    s.started(s.endpoints[0])
    assert {s.pick() for _ in range(100)} == {s.endpoints[1]}


def test_accumulating_load_stays_balanced() -> None:
    s, _ = make(3, capacity=None, seed=11)
    for _ in range(3000):
        s.started(s.pick())
    loads = [ep.in_flight for ep in s.endpoints]
    assert sum(loads) == s.in_flight_total() == 3000
    assert max(loads) - min(loads) <= 10, loads


# -- passive outlier ejection ------------------------------------------------------------------------

# F = failure (5xx or broken), K = connect_failure, O = ok, C = cancelled
SEQUENCES = [
    ("FFFFF", Health.EJECTED),
    ("KKKKK", Health.EJECTED),
    ("FKFKF", Health.EJECTED),
    ("FFFF", Health.HEALTHY),
    ("FFFFOFFFF", Health.HEALTHY),
    ("FFFFOFFFFF", Health.EJECTED),
    ("FFFFCF", Health.EJECTED),
    ("CCCCCCCCCC", Health.HEALTHY),
    ("OOOOO", Health.HEALTHY),
]
LETTERS = {"F": "failure", "K": "connect_failure", "O": "ok", "C": "cancelled"}


@pytest.mark.parametrize(("sequence", "state"), SEQUENCES)
def test_ejection_after_consecutive_failures(sequence: str, state: Health) -> None:
    s, _ = make(2)
    ep = s.endpoints[0]
    for letter in sequence:
        run(s, ep, LETTERS[letter])
    assert ep.state is state
    assert s.ejected_count() == (state is Health.EJECTED)
    if state is Health.EJECTED:
        assert all(s.pick() is s.endpoints[1] for _ in range(50))


def test_backoff_doubles_and_is_capped() -> None:
    s, clock = make(2)
    ep = s.endpoints[0]
    backoffs = []
    for _ in range(9):
        backoffs.append(eject(s, ep))
        clock.advance(backoffs[-1])
        assert s.pick(exclude=frozenset([s.endpoints[1]])) is ep
        assert ep.state is Health.PROBING
    assert backoffs == [5, 10, 20, 40, 80, 160, 300, 300, 300]


def test_a_success_after_returning_resets_the_backoff() -> None:
    s, clock = make(2)
    ep = s.endpoints[0]
    for expected in (5, 10, 20):
        assert eject(s, ep) == expected
        clock.advance(expected)
        s.pick()
    assert ep.state is Health.PROBING and ep.ejections == 3
    run(s, ep, "ok")
    assert ep.state is Health.HEALTHY and ep.ejections == 0
    run(s, ep, "failure", 4)
    assert ep.state is Health.HEALTHY  # a HEALTHY endpoint needs the full threshold again
    assert eject(s, ep) == 5


def test_ejected_endpoint_returns_exactly_when_its_backoff_expires() -> None:
    s, clock = make(2)
    ep, other = s.endpoints
    eject(s, ep)
    clock.advance(5 - 1e-6)
    assert s.pick(exclude=frozenset([other])) is None
    assert repr(s) == "<EndpointSet 2 endpoints | 1 ejected | in-flight 0/0>"
    clock.advance(1e-6)
    assert s.ejected_count() == 0  # the clock says so before pick() moves the state
    assert s.pick(exclude=frozenset([other])) is ep
    assert ep.state is Health.PROBING


def test_outcomes_of_calls_finishing_on_an_ejected_endpoint_change_nothing() -> None:
    s, _ = make(2)
    ep = s.endpoints[0]
    for _ in range(3):
        s.started(ep)
    eject(s, ep)
    before = snapshot(ep)
    s.finished(ep, "ok")
    s.finished(ep, "failure")
    s.finished(ep, "connect_failure")
    assert snapshot(ep) == before and ep.in_flight == 0


@pytest.mark.parametrize("state", list(Health))
def test_cancelled_changes_nothing_but_in_flight(state: Health) -> None:
    s, clock = make(2)
    ep = s.endpoints[0]
    if state is not Health.HEALTHY:
        eject(s, ep)
    if state is Health.PROBING:
        clock.advance(5)
        s.pick()
    run(s, ep, "failure", 0 if state is Health.PROBING else 3)
    s.started(ep)
    s.started(ep)
    before = snapshot(ep)
    assert ep.state is state
    s.finished(ep, "cancelled")
    assert snapshot(ep) == before and ep.in_flight == 1


# -- the max_ejected_percent cap ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "percent", "most"),
    [
        (1, 50, 0),  # floor(0.5): the only endpoint is never ejected
        (2, 50, 1),
        (3, 50, 1),  # floor(1.5)
        (4, 50, 2),
        (5, 50, 2),
        (10, 50, 5),
        (3, 33, 0),  # floor(0.99)
        (3, 34, 1),  # floor(1.02)
        (4, 100, 4),
        (4, 0, 0),
    ],
)
def test_cap_rounds_down(n: int, percent: float, most: int) -> None:
    s, _ = make(n, policy=EjectionPolicy(max_ejected_percent=percent))
    for ep in s.endpoints:
        run(s, ep, "connect_failure", 5)
        s.health_result(ep, healthy=False)
    assert s.ejected_count() == most
    assert s.refused_ejections >= n - most
    assert sum(ep.state is Health.EJECTED for ep in s.endpoints) == most


def test_single_endpoint_is_never_ejected() -> None:
    s, clock = make(1)
    (ep,) = s.endpoints
    for i in range(200):
        run(s, ep, ("failure", "connect_failure")[i % 2], 5)
        s.health_result(ep, healthy=False)
        clock.advance(1)
        assert s.pick() is ep and ep.state is Health.HEALTHY


def test_a_refused_ejection_happens_at_the_next_failure_once_there_is_room() -> None:
    s, clock = make(2)
    a, b = s.endpoints
    eject(s, a)
    run(s, b, "failure", 5)
    assert b.state is Health.HEALTHY and s.refused_ejections == 1  # stays in rotation
    clock.advance(5)
    run(s, b, "failure")  # a is back (PROBING), so b may go now
    assert (a.state, b.state) == (Health.PROBING, Health.EJECTED)


# -- active health results -----------------------------------------------------------------------------


def test_health_results() -> None:
    s, clock = make(2)
    a, b = s.endpoints
    s.health_result(a, healthy=False)
    assert a.state is Health.EJECTED and a.ejected_until == clock() + 5
    clock.advance(3)
    s.health_result(a, healthy=False)  # still failing: the ejection is extended, not doubled
    assert a.ejected_until == clock() + 5 and a.ejections == 1
    s.health_result(b, healthy=False)  # the cap holds for health results too
    assert b.state is Health.HEALTHY
    s.health_result(a, healthy=True)
    assert a.state is Health.PROBING  # back in rotation at once
    s.health_result(a, healthy=True)
    assert a.state is Health.PROBING  # only real traffic confirms it
    run(s, a, "ok")
    assert (a.state, a.ejections) == (Health.HEALTHY, 0)
    s.health_result(a, healthy=True)
    assert a.state is Health.HEALTHY


def test_health_fail_while_probing_ejects_with_a_doubled_backoff() -> None:
    s, clock = make(2)
    a = s.endpoints[0]
    eject(s, a)
    clock.advance(5)
    s.pick()
    s.health_result(a, healthy=False)
    assert a.state is Health.EJECTED and a.ejected_until == clock() + 10


# -- table swaps -----------------------------------------------------------------------------------------


def test_updated_keeps_the_state_of_surviving_endpoints() -> None:
    s, clock = make(3, capacity=4)
    a, b, c = s.endpoints
    eject(s, a)
    run(s, b, "failure", 3)
    s.started(b)
    s.started(b)
    s.started(c)
    before = {ep: snapshot(ep) for ep in (a, b)}
    d_up = ups(1, first=9)[0]
    new = s.updated([b.upstream, a.upstream, d_up])
    assert new.endpoints[:2] == (b, a)  # the same objects, in the new order
    assert {ep: snapshot(ep) for ep in (a, b)} == before and b.in_flight == 2
    d = new.endpoints[2]
    assert (d.state, d.failures, d.in_flight, d.capacity) == (Health.HEALTHY, 0, 0, 4)
    assert repr(new) == "<EndpointSet 3 endpoints | 1 ejected | in-flight 2/0/0>"

    # the old reference forwards to the new set
    assert s.superseded and not new.superseded
    assert repr(s) == "<EndpointSet superseded -> 3 endpoints | 1 ejected | in-flight 2/0/0>"
    assert all(s.pick() in (b, d) for _ in range(50))
    s.finished(b, "failure")
    s.finished(b, "failure")  # b's fifth consecutive failure, counted on the new set
    assert b.state is Health.HEALTHY and s.refused_ejections == 1  # cap of 3 is 1, and a is out
    # a call on the removed endpoint finishes without effect
    s.finished(c, "failure")
    assert c.in_flight == 0 and new.in_flight_total() == 0
    s.health_result(c, healthy=False)
    assert c.state is Health.HEALTHY
    clock.advance(5)
    assert new.pick(exclude=frozenset([b, d])) is a


def test_updated_releases_ejections_over_the_new_cap_earliest_first() -> None:
    s, clock = make(4)
    a, b, c, d = s.endpoints
    eject(s, a)
    clock.advance(1)
    eject(s, b)
    new = s.updated([a.upstream, b.upstream, c.upstream])  # cap floor(1.5) = 1
    assert (a.state, b.state) == (Health.PROBING, Health.EJECTED)
    assert new.ejected_count() == 1


def test_updated_capacity() -> None:
    s, _ = make(2, capacity=4)
    assert s.capacity() == 8
    same = s.updated([u.upstream for u in s.endpoints])
    assert same.capacity() == 8
    more = same.updated([u.upstream for u in s.endpoints] + [ups(1, first=5)[0]], 6)
    assert more.capacity() == 18 and {ep.capacity for ep in more.endpoints} == {6}
    assert more.updated(ups(1), None).capacity() is None


# -- deployments, admission figures, reprs, errors ---------------------------------------------------------

PLANE = Plane("us-east-1", "us", Upstream("http", "plane.internal", 9001))


@pytest.mark.parametrize(
    ("endpoints", "replicas", "target", "addresses", "each", "total"),
    [
        (ups(3), None, 4, 3, 4, 12),
        (ups(3), 7, 4, 3, 4, 12),  # listed endpoints are one replica each
        ((), 3, 4, 1, 12, 12),  # the plane url stands for all replicas
        ((), None, 4, 1, 4, 4),
        (ups(2), None, None, 2, None, None),
        ((), 3, None, 1, None, None),
    ],
)
def test_replica_layout_and_capacity(endpoints, replicas, target, addresses, each, total) -> None:
    dep = Deployment("v1", "abc123", PLANE, endpoints=endpoints, replicas=replicas)
    upstreams, per = replica_layout(dep, target)
    assert len(upstreams) == addresses and per == each
    assert upstreams == (endpoints or (PLANE.url,))
    s = EndpointSet.for_deployment(dep, target, clock=FakeClock(), rng=random.Random(0))
    assert s.key == deployment_key(dep) == ("abc123", "v1")
    assert s.capacity() == total and s.in_flight_total() == 0


def test_reprs_show_real_state() -> None:
    s, clock = make(3, capacity=4)
    a, b, _ = s.endpoints
    for _ in range(4):
        s.started(a)
    s.started(b)
    s.started(b)
    s.health_result(b, healthy=False)
    assert repr(s) == "<EndpointSet 3 endpoints | 1 ejected | in-flight 4/2/0>"
    assert repr(b) == "<Endpoint http://10.0.0.1:8000 EJECTED until 1005 | in-flight 2/4 | failures 0 | ejections 1>"
    assert repr(make(1)[0]) == "<EndpointSet 1 endpoint | 0 ejected | in-flight 0>"


def test_usage_errors() -> None:
    s, _ = make(2)
    with pytest.raises(ValueError, match="unknown outcome 'timeout'"):
        s.finished(s.endpoints[0], "timeout")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="without started"):
        s.finished(s.endpoints[0], "ok")
    with pytest.raises(ValueError, match="at least one address"):
        EndpointSet("k", ())
    with pytest.raises(ValueError, match="duplicate"):
        EndpointSet("k", ups(1) * 2)
    with pytest.raises(ValueError, match="capacity"):
        EndpointSet("k", ups(1), 0)
    with pytest.raises(ValueError, match="concurrency_target"):
        replica_layout(Deployment("v1", "m", PLANE), 0)
    for bad in ({"consecutive_failures": 0}, {"max_ejected_percent": 101}, {"backoff_base_seconds": 400}):
        with pytest.raises(ValueError):
            EjectionPolicy(**bad)  # type: ignore[arg-type]


# -- property: the cap, eligibility and bookkeeping hold for any sequence -------------------------------------

OPS = st.one_of(
    st.tuples(st.just("run"), st.integers(0, 7), st.sampled_from(["failure", "connect_failure", "failure", "ok"])),
    st.tuples(st.just("start"), st.integers(0, 7)),
    st.tuples(st.just("finish"), st.integers(0, 63), st.sampled_from(sorted(OUTCOMES))),
    st.tuples(st.just("health"), st.integers(0, 7), st.booleans()),
    st.tuples(st.just("advance"), st.sampled_from([0.5, 1, 2.5, 5, 10, 60, 400])),
    st.tuples(st.just("pick"), st.integers(0, 255)),
    st.tuples(st.just("update"), st.integers(1, 255)),
)


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(1, 8),
    percent=st.sampled_from([0, 10, 25, 33, 34, 50, 75, 100]),
    threshold=st.integers(1, 3),
    ops=st.lists(OPS, min_size=20, max_size=120),
)
def test_property_cap_and_eligibility(n: int, percent: float, threshold: int, ops: list[tuple]) -> None:
    """Ejected endpoints never exceed floor(n * percent / 100); pick never returns an ejected or excluded one."""
    clock = FakeClock()
    policy = EjectionPolicy(consecutive_failures=threshold, max_ejected_percent=percent)
    s = EndpointSet("k", ups(n), 2, clock=clock, rng=random.Random(0), policy=policy)
    pool = ups(8)
    calls: list[Endpoint] = []  # attempts in flight, also on endpoints a swap removed
    for op in ops:
        eps = s.endpoints
        if op[0] == "run":
            run(s, eps[op[1] % len(eps)], op[2])
        elif op[0] == "start":
            ep = eps[op[1] % len(eps)]
            s.started(ep)
            calls.append(ep)
        elif op[0] == "finish" and calls:
            s.finished(calls.pop(op[1] % len(calls)), op[2])
        elif op[0] == "health":
            s.health_result(eps[op[1] % len(eps)], op[2])
        elif op[0] == "advance":
            clock.advance(op[1])
        elif op[0] == "pick":
            exclude = frozenset(ep for i, ep in enumerate(eps) if op[1] >> i & 1)
            got = s.pick(exclude)
            out = [ep for ep in eps if ep.state is Health.EJECTED]
            assert got is None or (got not in exclude and got.state is not Health.EJECTED)
            assert (got is None) == (len(set(eps) - exclude - set(out)) == 0)
        elif op[0] == "update":
            s = s.updated([u for i, u in enumerate(pool) if op[1] >> i & 1])
        eps = s.endpoints
        most = math.floor(len(eps) * percent / 100)
        assert s.ejected_count() <= sum(ep.state is Health.EJECTED for ep in eps) <= most
        if len(eps) == 1 and percent < 100:
            assert eps[0].state is not Health.EJECTED  # the only endpoint stays, whatever happens
        for ep in eps:
            assert ep.in_flight >= 0
            assert (ep.state is Health.HEALTHY) <= (ep.ejections == 0)
            if ep.state is Health.EJECTED:
                assert ep.ejections >= 1 and ep.ejected_until <= clock() + 300
    assert sum(ep.in_flight for ep in set(calls)) <= len(calls)


# -- retries ----------------------------------------------------------------------------------------------------

RETRY_ARGS = ("bytes_sent", "streaming", "protocol", "attempt", "max_attempts", "outcome")


COMBINATIONS = list(
    itertools.product(
        [0, 1, 4096], [False, True], ["http", "websocket", "grpc"], [1, 2, 3], [1, 2, 3], sorted(OUTCOMES)
    )
)


@pytest.mark.parametrize(RETRY_ARGS, COMBINATIONS)
def test_should_retry_every_combination(bytes_sent, streaming, protocol, attempt, max_attempts, outcome) -> None:
    got = should_retry(
        bytes_sent=bytes_sent,
        streaming=streaming,
        protocol=protocol,
        attempt=attempt,
        max_attempts=max_attempts,
        outcome=outcome,
    )
    safe = outcome == "connect_failure" and bytes_sent == 0 and not streaming and protocol == "http"
    assert got is (safe and attempt < max_attempts)


def test_should_retry_allows_exactly_the_unsent_http_connect_failures() -> None:
    allowed = [c for c in COMBINATIONS if should_retry(**dict(zip(RETRY_ARGS, c, strict=True)))]
    assert allowed == [(0, False, "http", a, m, "connect_failure") for a, m in [(1, 2), (1, 3), (2, 3)]]
    base = {"bytes_sent": 0, "streaming": False, "protocol": "http", "outcome": "connect_failure"}
    assert should_retry(**base, attempt=1) is True  # default max_attempts = 2: one retry
    assert should_retry(**base, attempt=2) is False


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("outcome", "timeout", "unknown outcome"),
        ("protocol", "h2", "unknown protocol"),
        ("bytes_sent", -1, "bytes_sent"),
        ("attempt", 0, "attempt"),
        ("max_attempts", 0, "max_attempts"),
    ],
)
def test_should_retry_refuses_bad_input(field: str, value: object, message: str) -> None:
    args: dict = {"bytes_sent": 0, "streaming": False, "protocol": "http", "attempt": 1, "outcome": "connect_failure"}
    args[field] = value
    with pytest.raises(ValueError, match=message):
        should_retry(**args)


def take(budget: RetryBudget) -> int:
    """Retry until the budget says no; returns how many were allowed."""
    n = 0
    while budget.can_retry():
        budget.record_retry()
        n += 1
    return n


def test_budget_floor_is_min_per_second_times_window() -> None:
    budget = RetryBudget(clock=FakeClock(0))
    assert take(budget) == 100  # 10/s x 10 s, with no requests at all
    assert repr(budget) == "<RetryBudget 100 retries / 0 requests in 10 s | limit 100>"


def test_budget_ratio_of_requests_in_window() -> None:
    clock = FakeClock(0)
    budget = RetryBudget(ratio=0.2, min_per_second=10, window_seconds=10, clock=clock)
    for _ in range(1000):
        budget.record_request()
    assert budget.can_retry() and budget.can_retry()  # asking does not spend
    assert take(budget) == 200
    ratio_only = RetryBudget(ratio=0.2, min_per_second=0, clock=clock)
    assert take(ratio_only) == 0
    for _ in range(12):
        ratio_only.record_request()
    assert take(ratio_only) == 2  # 0.2 x 12 = 2.4: two retries fit


def test_budget_refills_as_the_window_slides() -> None:
    clock = FakeClock(0)
    budget = RetryBudget(ratio=0, min_per_second=1, window_seconds=10, clock=clock)  # 10 per window
    assert take(budget) == 10
    clock.now = 5
    assert take(budget) == 0
    clock.now = 9.999  # the slot of t=0 still counts
    assert take(budget) == 0
    clock.now = 10  # it dropped out
    assert take(budget) == 10
    clock.now = 19.5  # the 10 retries at t=10 still count; at 20 they go
    assert take(budget) == 0
    clock.now = 20
    assert take(budget) == 10


def live(times: list[float], now: float) -> int:
    """Events whose 1 s slot is one of the 10 up to and including now's."""
    return sum(1 for t in times if math.floor(t) > math.floor(now) - 10)


@settings(max_examples=200, deadline=None)
@given(
    ratio=st.sampled_from([0.0, 0.1, 0.2, 0.5]),
    floor=st.sampled_from([0, 1, 10]),
    steps=st.lists(st.tuples(st.floats(0, 6), st.integers(0, 30), st.integers(0, 30)), max_size=30),
)
def test_budget_matches_a_reference_with_every_timestamp(ratio, floor, steps) -> None:
    """The 10-slot budget equals counting every event whose 1 s slot is among the last 10."""
    clock = FakeClock(0)
    budget = RetryBudget(ratio=ratio, min_per_second=floor, window_seconds=10, clock=clock)
    requests: list[float] = []
    retries: list[float] = []
    for advance, new_requests, wanted in steps:
        clock.advance(advance)
        for _ in range(new_requests):
            budget.record_request()
            requests.append(clock())
        for _ in range(wanted):
            expected = live(retries, clock()) + 1 <= max(floor * 10, ratio * live(requests, clock()))
            assert budget.can_retry() is expected
            if expected:
                budget.record_retry()
                retries.append(clock())


def test_pick_or_least_loaded_tries_an_ejected_endpoint_rather_than_none() -> None:
    a, b = ups(2)
    s = EndpointSet("k", [a, b], clock=FakeClock(), rng=random.Random(1))
    ep_a = next(e for e in s.endpoints if e.upstream == a)
    for _ in range(5):  # eject a (the 50% cap allows one of two)
        s.started(ep_a)
        s.finished(ep_a, "connect_failure")
    assert ep_a.state is Health.EJECTED
    assert s.pick(exclude=frozenset({b})) is None
    assert s.pick_or_least_loaded(exclude=frozenset({b})) is ep_a  # panic mode: try it anyway
    assert s.pick_or_least_loaded(exclude=frozenset({a, b})) is None
    assert s.pick_or_least_loaded().upstream == b  # a healthy choice still wins


# -- discovered (SRV) deployments: empty sets and replica counts ------------------------------------------


def test_an_srv_deployment_starts_empty_with_a_reason_and_counts_discovered_replicas() -> None:
    dep = Deployment("v1", "abc123", PLANE, endpoints_srv="_http._tcp.v1.test")
    assert replica_layout(dep, 4) == ((), 4)
    s = EndpointSet.for_deployment(dep, 4, clock=FakeClock(), rng=NoRandom())
    assert s.pick() is None and s.pick_or_least_loaded() is None
    assert s.replica_count() == 0 and s.capacity() == 0 and replica_count(dep) == 0
    assert s.unavailable == "replicas of deployment 'v1' not discovered yet (SRV '_http._tcp.v1.test')"
    assert repr(s) == f"<EndpointSet no endpoints | unavailable: {s.unavailable}>"
    found = s.updated(ups(3), replicas=3)
    assert found.unavailable is None and found.replica_count() == 3 and found.capacity() == 12
    gone = found.updated((), unavailable="no replicas: NXDOMAIN")
    assert gone.replica_count() == 0 and gone.capacity() == 0 and gone.pick() is None
    assert s.replica_count() == 0 and s.superseded  # the first reference forwards to the newest set
    with pytest.raises(ValueError, match="at least one address"):
        gone.updated(())  # empty needs a reason


@pytest.mark.parametrize(
    ("endpoints", "replicas", "expected"), [(ups(3), None, 3), (ups(2), 7, 2), ((), 3, 3), ((), None, 1)]
)
def test_replica_count_for_listed_and_plane_deployments(endpoints, replicas, expected) -> None:
    dep = Deployment("v1", "abc123", PLANE, endpoints=endpoints, replicas=replicas)
    assert replica_count(dep) == expected
    assert EndpointSet.for_deployment(dep, None).replica_count() == expected
