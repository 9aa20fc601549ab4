"""Fleet-wide rate limits (SPEC §13, issue 14), the pure part: each member's share of a limit
(`gateway.calls.fleetshare`), the limiter's counters fitted to it, the store gone stale
(`fleet_failure`), and the table's rules. No process, no database: views are built by hand or
from other limiters' reports, and the clock is a number the test moves."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.calls.fleetshare import SPARE, FleetView, Usage, part, shares, slots
from gateway.calls.ratelimit import Limiter
from gateway.errors import RateLimited
from gateway.metrics import Metrics
from gateway.routing.loader import compile_table
from gateway.routing.model import RateLimit
from tests.support import loader_problems
from tests.test_ratelimit import Clock, doc_with

MEMBERS = ("a", "b", "c")
KEY = ("key", "acme", "ci")


def ci_key(table):  # noqa: ANN001, ANN201
    return next(k for k in table.api_keys.values() if k.name == "ci")


def admitted(limiter: Limiter, table, key) -> bool:  # noqa: ANN001
    try:
        limiter.admit(table, key)
    except RateLimited:
        return False
    return True


# -- shares ----------------------------------------------------------------------------------------------


def test_without_demand_the_limit_is_split_equally() -> None:
    assert shares(dict.fromkeys(MEMBERS, 0.0), 30.0) == {m: pytest.approx(1 / 3) for m in MEMBERS}
    assert shares({"a": 0.0}, None) == {"a": 1.0}


def test_below_the_limit_each_gets_its_demand_and_an_equal_part_of_the_room_left() -> None:
    got = shares({"a": 6.0, "b": 3.0, "c": 0.0}, 30.0)  # 9 of 30 used: 21 left, 7 each
    assert got == {"a": pytest.approx(13 / 30), "b": pytest.approx(10 / 30), "c": pytest.approx(7 / 30)}


def test_past_the_limit_the_rate_follows_the_demand_and_the_spare_is_split_equally() -> None:
    got = shares({"a": 90.0, "b": 10.0, "c": 0.0}, 30.0)
    assert got == {"a": pytest.approx(0.9 * 0.9 + SPARE / 3), "b": pytest.approx(0.9 * 0.1 + SPARE / 3),
                   "c": pytest.approx(SPARE / 3)}  # fmt: skip
    assert got["c"] > 0  # a member that starts to see calls has some at once


@given(st.dictionaries(st.text(min_size=1, max_size=3), st.floats(0, 1e6), min_size=1, max_size=8),
       st.one_of(st.none(), st.floats(0.01, 1e6)))  # fmt: skip
def test_shares_are_positive_and_sum_to_one(demands: dict[str, float], rate: float | None) -> None:
    got = shares(demands, rate)
    assert set(got) == set(demands)
    assert all(s > 0 for s in got.values())
    assert sum(got.values()) == pytest.approx(1.0)


# -- concurrency slots -------------------------------------------------------------------------------------


@given(st.integers(-1000, 1000), st.lists(st.floats(0.001, 1.0), min_size=1, max_size=8))
def test_each_member_gets_its_part_of_the_free_slots_rounded_up(free: int, raw: list[float]) -> None:
    weights = [w / sum(raw) for w in raw]
    dealt = [slots(free, w) for w in weights]
    assert all(abs(n - free * w) < 1 + 1e-6 for n, w in zip(dealt, weights))
    if free > 0:  # while a slot is free every member may open a call; the fleet at most one a member past
        assert all(n >= 1 for n in dealt) and free <= sum(dealt) <= free + len(raw) - 1
    else:
        assert all(n <= 0 for n in dealt) and sum(dealt) <= free


def test_an_exact_part_is_not_rounded_up_by_the_float() -> None:
    assert [slots(3, 1 / 3), slots(6, 1 / 3), slots(-3, 1 / 3), slots(0, 0.5)] == [1, 2, -1, 0]


def test_past_the_cap_each_member_gives_back_its_part() -> None:
    spec = RateLimit(max_concurrent=4)
    view = FleetView("a", MEMBERS, {KEY: {"b": Usage(1.0, 3), "c": Usage(1.0, 2)}})
    assert part(view, KEY, spec, Usage(1.0, 1)).cap == 0  # 6 open of 4: a's one call must end first


def views_of(opened: dict[str, int], demand: float) -> dict[str, FleetView]:
    usage = {m: Usage(demand, n) for m, n in opened.items()}
    return {m: FleetView(m, MEMBERS, {KEY: {o: u for o, u in usage.items() if o != m}}) for m in MEMBERS}


@pytest.mark.parametrize(("opened", "caps"), [
    ({"a": 0, "b": 0, "c": 0}, {"a": 2, "b": 2, "c": 2}),  # 5 free over 3: 1.67 each, rounded up
    ({"a": 2, "b": 0, "c": 1}, {"a": 3, "b": 1, "c": 2}),  # 2 free: one more each
    ({"a": 0, "b": 5, "c": 0}, {"a": 0, "b": 5, "c": 0}),  # none free: nobody opens more
    ({"a": 1, "b": 5, "c": 0}, {"a": 0, "b": 4, "c": 0}),  # one past: each gives back its part, rounded up
])  # fmt: skip
def test_the_members_caps_of_one_view(opened: dict[str, int], caps: dict[str, int]) -> None:
    spec = RateLimit(max_concurrent=5)
    views = views_of(opened, 2.0)
    assert {m: part(views[m], KEY, spec, Usage(2.0, opened[m])).cap for m in MEMBERS} == caps


def test_a_member_the_others_do_not_report_still_counts_in_the_split() -> None:
    view = FleetView("a", MEMBERS, {KEY: {"b": Usage(0.0, 0)}})  # c is live but never saw the key
    assert part(view, KEY, RateLimit(30.0, 30), Usage(0.0, 0)).share == pytest.approx(1 / 3)
    alone = FleetView("a", ("a",))
    assert part(alone, KEY, RateLimit(30.0, 30, 4), Usage(0.0, 0)) == (1.0, 4)


# -- the limiter's counters fitted to their parts ----------------------------------------------------------


def test_a_counter_in_a_fleet_of_three_holds_a_third_of_the_rate_and_burst() -> None:
    table = compile_table(doc_with({"requests_per_second": 30, "burst": 30, "max_concurrent": 6}))
    clock = Clock()
    limiter = Limiter(Metrics(), clock)
    limiter.place(FleetView("a", MEMBERS))
    key = ci_key(table)
    # The permits are kept open: the cap's part (6 over 3 members: 2) refuses before the bucket's (10).
    assert sum(admitted(limiter, table, key) for _ in range(20)) == 2
    c = limiter.counters[KEY]
    assert (c.bucket.rate, c.bucket.burst, c.cap) == (pytest.approx(10.0), pytest.approx(10.0), 2)  # type: ignore[union-attr]
    assert repr(c).startswith("<Counter key 'ci' 2 open share 0.33 |")
    limiter.place(FleetView("a", MEMBERS))  # the gauge shows the parts as of the last exchange
    assert limiter.metrics.rate_limit_share.values == {("key", "ci"): pytest.approx(1 / 3)}


def test_fleet_wide_the_members_admit_about_the_limit_not_three_times_it() -> None:
    """Three limiters exchange their reports every 0.2 s, calls go round-robin at 300/s for 10 s
    against a key of 30 rps burst 30: the fleet admits about R*T + B, never 3 x that."""
    table = compile_table(doc_with({"requests_per_second": 30, "burst": 30}))
    key = ci_key(table)
    clock = Clock()
    fleet = {m: Limiter(Metrics(), clock) for m in MEMBERS}
    for m, limiter in fleet.items():
        limiter.place(FleetView(m, MEMBERS))
    total, seconds, step = 0, 10.0, 1 / 300
    for i in range(int(seconds / step)):
        clock.now += step
        total += admitted(fleet[MEMBERS[i % 3]], table, key)
        if i % 60 == 59:  # every 0.2 s: each reports, then each reads the others' reports
            reports = {m: dict(limiter.report()) for m, limiter in fleet.items()}
            for m, limiter in fleet.items():
                others = {o: r[KEY] for o, r in reports.items() if o != m and KEY in r}
                limiter.place(FleetView(m, MEMBERS, {KEY: others}))
    bound = 30 * seconds + 30 + len(MEMBERS)
    print(f"admitted {total} in {seconds:g} s (bound {bound:g}, per-member limits would admit {3 * (300 + 30)})")
    assert 30 * seconds <= total <= bound


def test_a_stale_store_fails_open_to_the_whole_limit_and_closed_to_refusals() -> None:
    table = compile_table(doc_with({"requests_per_second": 30, "burst": 30, "fleet_failure": "open"},
                                   {"max_concurrent": 50, "fleet_failure": "closed"}))  # fmt: skip
    key = ci_key(table)
    limiter = Limiter(Metrics(), Clock())
    limiter.place(FleetView("a", MEMBERS))
    assert admitted(limiter, table, key)
    limiter.place(None)  # the store went stale
    with pytest.raises(RateLimited) as refused:
        limiter.admit(table, key)
    error = refused.value
    assert error.status == 429 and error.error_code == "rate_limited"
    assert "team 'acme' has fleet-wide limits with fleet_failure: closed" in error.message
    assert dict(error.headers)["retry-after"] == "2"
    assert limiter.metrics.rate_limited.values == {("team", "acme", "store"): 1}
    key_counter = limiter.counters[KEY]
    assert (key_counter.share, key_counter.bucket.burst) == (1.0, 30.0)  # type: ignore[union-attr]
    assert limiter.metrics.rate_limit_share.values == {("key", "ci"): 1.0, ("team", "acme"): 0.0}
    limiter.place(FleetView("a", MEMBERS))  # the store answers again: fleet-wide parts
    assert admitted(limiter, table, key)
    assert key_counter.bucket.burst == pytest.approx(10.0)  # type: ignore[union-attr]


def test_a_counter_made_while_the_store_is_stale_starts_as_its_fleet_failure_says() -> None:
    table = compile_table(doc_with({"max_concurrent": 3, "fleet_failure": "closed"}))
    limiter = Limiter(Metrics(), Clock())
    limiter.place(None)
    assert not admitted(limiter, table, ci_key(table))
    assert limiter.metrics.rate_limited.values == {("key", "ci", "store"): 1}


def test_without_a_database_store_nothing_changes() -> None:
    table = compile_table(doc_with({"requests_per_second": 5, "burst": 5, "fleet_failure": "closed"}))
    limiter = Limiter(Metrics(), Clock())  # never placed: per worker, the whole limit, never closed
    assert [admitted(limiter, table, ci_key(table)) for _ in range(6)] == [True] * 5 + [False]
    assert limiter.metrics.rate_limit_share.values == {}


# -- the table ---------------------------------------------------------------------------------------------


def test_the_table_refuses_a_bad_fleet_failure_by_path() -> None:
    doc = doc_with({"requests_per_second": 5, "fleet_failure": "maybe"}, {"fleet_failure": "closed"})
    assert loader_problems(doc) == [
        "api_keys[3].rate_limit.fleet_failure: 'maybe' is not one of: open, closed",
        "teams.acme.rate_limit.fleet_failure: fleet_failure needs requests_per_second or max_concurrent "
        "(a limit to apply)",
    ]


def test_fleet_failure_is_open_unless_the_table_says_closed() -> None:
    table = compile_table(doc_with({"requests_per_second": 5}, {"max_concurrent": 2, "fleet_failure": "closed"}))
    assert ci_key(table).rate_limit == RateLimit(5.0, None, None, "open")
    assert table.teams["acme"].rate_limit == RateLimit(None, None, 2, "closed")
