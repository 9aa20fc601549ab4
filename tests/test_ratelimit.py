"""Rate limits per API key and per team (issue 13, SPEC §12 `rate_limit`): the pure decision, the
token bucket, the RateLimit fields, the worker's counters, and the table's rules. No process: the
clock is a number the test moves."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.calls.ratelimit import Counter, Limiter, Refusal, TokenBucket, decide, fields, limits_of
from gateway.errors import RateLimited
from gateway.metrics import Metrics
from gateway.routing.loader import compile_table
from tests.support import example_doc, loader_problems

SECRET = "ci-secret-key-value"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def doc_with(key_limit: dict | None = None, team_limit: dict | None = None) -> dict:
    doc = example_doc("http://127.0.0.1:9", "http://127.0.0.1:9")
    digest = hashlib.sha256(SECRET.encode()).hexdigest()
    doc["api_keys"].append({"name": "ci", "team": "acme", "sha256": digest})
    if key_limit is not None:
        doc["api_keys"][-1]["rate_limit"] = key_limit
    if team_limit is not None:
        doc["teams"]["acme"]["rate_limit"] = team_limit
    return doc


def keys(table):  # noqa: ANN001, ANN201
    by_name = {k.name: k for k in table.api_keys.values()}
    return by_name["ci"], by_name["demo"]


def statuses(limiter: Limiter, table, key, n: int) -> list[str]:  # noqa: ANN001
    """`n` calls of `key` now: 'ok' or the refusal's kind; permits are kept open."""
    out = []
    for _ in range(n):
        try:
            limiter.admit(table, key)
            out.append("ok")
        except RateLimited as error:
            out.append(error.message)
    return out


# -- the token bucket ----------------------------------------------------------------------------------


def test_a_bucket_gives_its_burst_then_refills_at_its_rate_never_above_the_burst() -> None:
    bucket = TokenBucket(5.0, 5, 0.0)
    assert [bucket.take(0.0) for _ in range(6)] == [True] * 5 + [False]
    assert bucket.wait(0.0) == pytest.approx(0.2)
    assert bucket.take(0.2) and not bucket.take(0.2)
    assert [bucket.take(1000.0) for _ in range(6)] == [True] * 5 + [False]


@given(st.lists(st.floats(min_value=0.0, max_value=0.5), min_size=1, max_size=200))
def test_a_bucket_never_admits_more_than_its_burst_plus_its_rate_over_any_span(gaps: list[float]) -> None:
    rate, burst = 4.0, 3
    bucket, now, admitted = TokenBucket(rate, burst, 0.0), 0.0, []
    for gap in gaps:
        now += gap
        if bucket.take(now):
            admitted.append(now)
    for i, start in enumerate(admitted):
        for j in range(i, len(admitted)):
            assert j - i + 1 <= burst + (admitted[j] - start) * rate + 1e-9


# -- the decision (pure) ---------------------------------------------------------------------------------


def counter(limit: str, rps: float | None = None, burst: int | None = None, cap: int | None = None) -> Counter:
    from gateway.routing.model import RateLimit

    return Counter(limit, "n", RateLimit(rps, burst, cap), 0.0)


def test_decide_names_the_first_limit_passed_key_before_team_rate_before_concurrency() -> None:
    key, team = counter("key", 5.0, 1, cap=1), counter("team", 5.0, 5)
    assert decide(0.0, [key, team]) is None
    key.bucket.take(0.0)  # type: ignore[union-attr]
    assert decide(0.0, [key, team]) == Refusal("key", "n", "rate", 1)
    key.in_flight = 1
    assert decide(0.5, [key, team]) == Refusal("key", "n", "concurrency", 1)  # a token again, but no slot
    key.in_flight = 0
    for _ in range(5):
        team.bucket.take(0.5)  # type: ignore[union-attr]
    assert decide(0.5, [key, team]) == Refusal("team", "n", "rate", 1)


def test_the_retry_after_is_whole_seconds_until_a_token() -> None:
    slow = counter("key", 0.25, 1)
    slow.bucket.take(0.0)  # type: ignore[union-attr]
    assert decide(0.0, [slow]) == Refusal("key", "n", "rate", 4)
    assert decide(3.5, [slow]) == Refusal("key", "n", "rate", 1)
    assert decide(4.0, [slow]) is None


def test_the_ietf_fields_list_every_limit_with_what_is_left() -> None:
    key, team = counter("key", 5.0, 5, cap=2), counter("team", 10.0, 20)
    key.bucket.take(0.0)  # type: ignore[union-attr]
    key.in_flight = 1
    assert dict(fields(0.0, [key, team])) == {
        "ratelimit-policy": '"key";q=5;w=1, "key-concurrency";q=2;qu="concurrency", "team";q=20;w=2',
        "ratelimit": '"key";r=4;t=1, "key-concurrency";r=1, "team";r=20;t=0',
    }


# -- the worker's counters -------------------------------------------------------------------------------


def test_a_key_with_5_rps_burst_5_gets_5_calls_then_429_then_recovers() -> None:
    table = compile_table(doc_with({"requests_per_second": 5, "burst": 5}))
    clock, metrics = Clock(), Metrics()
    limiter = Limiter(metrics, clock)
    ci, _ = keys(table)
    for _ in range(5):
        limiter.admit(table, ci).release()
    with pytest.raises(RateLimited) as refused:
        limiter.admit(table, ci)
    headers = dict(refused.value.headers)
    assert refused.value.status == 429 and refused.value.error_code == "rate_limited"
    assert headers == {"retry-after": "1", "ratelimit-policy": '"key";q=5;w=1', "ratelimit": '"key";r=0;t=1'}
    assert "'ci'" in refused.value.message and SECRET not in refused.value.message
    assert metrics.rate_limited.values == {("key", "ci", "rate"): 1}
    clock.now += 0.2
    limiter.admit(table, ci)  # one token back
    assert repr(limiter) == "<Limiter 1 counters | 1 open>"  # that last call is still open


def test_a_team_limit_is_shared_by_its_keys_and_a_refused_call_takes_nothing() -> None:
    table = compile_table(doc_with({"requests_per_second": 0.001, "burst": 3}, {"requests_per_second": 1, "burst": 3}))
    clock = Clock()
    limiter = Limiter(Metrics(), clock)
    ci, demo = keys(table)
    assert statuses(limiter, table, ci, 2) == ["ok", "ok"]
    assert statuses(limiter, table, demo, 2) == ["ok", "team 'acme' is past its rate limit; retry in 1 s"]
    assert statuses(limiter, table, ci, 1) == ["team 'acme' is past its rate limit; retry in 1 s"]
    # The team refused it: the key's own bucket was not charged for it (one token of three left).
    assert limiter.counters[("key", "acme", "ci")].bucket.tokens == pytest.approx(1.0)  # type: ignore[union-attr]
    clock.now += 1.0
    assert statuses(limiter, table, ci, 2) == ["ok", "API key 'ci' is past its rate limit; retry in 1000 s"]


def test_max_concurrent_counts_open_calls_and_a_release_counts_once() -> None:
    table = compile_table(doc_with({"max_concurrent": 2}, {"max_concurrent": 3}))
    limiter = Limiter(Metrics(), Clock())
    ci, demo = keys(table)
    first, second = limiter.admit(table, ci), limiter.admit(table, ci)
    with pytest.raises(RateLimited) as refused:
        limiter.admit(table, ci)
    assert dict(refused.value.headers)["ratelimit"] == '"key-concurrency";r=0, "team-concurrency";r=1'
    third = limiter.admit(table, demo)  # the team's third slot
    assert "team 'acme' has its max_concurrent" in statuses(limiter, table, demo, 1)[0]
    first.release()
    first.release()  # a second release gives nothing back
    assert limiter.counters[("key", "acme", "ci")].in_flight == 1
    fourth = limiter.admit(table, ci)  # the slot freed, once
    assert "team 'acme' has its max_concurrent" in statuses(limiter, table, demo, 1)[0]
    assert statuses(limiter, table, ci, 1) == ["API key 'ci' has its max_concurrent calls open; retry once one ends"]
    for permit in (second, third, fourth):
        permit.release()
    assert {k: c.in_flight for k, c in limiter.counters.items()} == {
        ("key", "acme", "ci"): 0,
        ("team", "acme", "acme"): 0,
    }


def test_a_reload_keeps_an_unchanged_bucket_and_retunes_a_changed_one() -> None:
    doc = doc_with({"requests_per_second": 1, "burst": 3, "max_concurrent": 5})
    table = compile_table(doc)
    clock = Clock()
    limiter = Limiter(Metrics(), clock)
    ci, _ = keys(table)
    open_call = limiter.admit(table, ci)
    limiter.admit(table, ci).release()
    doc["api_keys"][0]["rate_limit"] = {"max_concurrent": 1}  # another key's limit changes
    reloaded = compile_table(doc)
    limiter.prune()
    assert statuses(limiter, reloaded, keys(reloaded)[0], 2)[0] == "ok"  # 1 token left of 3: not refilled
    assert "rate limit" in statuses(limiter, reloaded, keys(reloaded)[0], 1)[0]
    doc["api_keys"][-1]["rate_limit"] = {"requests_per_second": 1, "burst": 10, "max_concurrent": 2}
    changed = compile_table(doc)
    # The open calls are kept (1 from the first table + 1 above); the bucket is not refilled by a change.
    assert "rate limit" in statuses(limiter, changed, keys(changed)[0], 1)[0]
    clock.now += 1.0
    assert statuses(limiter, changed, keys(changed)[0], 1) == [
        "API key 'ci' has its max_concurrent calls open; retry once one ends"
    ]
    open_call.release()
    assert statuses(limiter, changed, keys(changed)[0], 1) == ["ok"]


def test_idle_counters_are_forgotten_busy_ones_kept() -> None:
    table = compile_table(doc_with({"requests_per_second": 10, "burst": 1}, {"max_concurrent": 4}))
    clock = Clock()
    limiter = Limiter(Metrics(), clock)
    ci, demo = keys(table)
    limiter.admit(table, ci).release()
    busy = limiter.admit(table, demo)
    clock.now += 1.0
    limiter.prune()
    assert sorted(limiter.counters) == [("team", "acme", "acme")]
    busy.release()
    limiter.prune()
    assert limiter.counters == {}


def test_a_key_or_team_without_limits_costs_nothing() -> None:
    table = compile_table(doc_with())
    limiter = Limiter(Metrics(), Clock())
    ci, _ = keys(table)
    assert limits_of(table, ci) == []
    for _ in range(1000):
        limiter.admit(table, ci)
    assert limiter.counters == {}


# -- the table -------------------------------------------------------------------------------------------


def test_the_table_refuses_bad_limits_by_path() -> None:
    doc = doc_with({"requests_per_second": 0, "burst": 0, "max_concurrent": 1.5, "per_minute": 3}, {"burst": 2})
    assert loader_problems(doc) == [
        "api_keys[3].rate_limit.burst: must be at least 1, got 0",
        "api_keys[3].rate_limit.max_concurrent: expected an integer, got the number 1.5",
        "api_keys[3].rate_limit.per_minute: unknown key 'per_minute' (allowed: requests_per_second, burst, "
        "max_concurrent, fleet_failure)",
        "api_keys[3].rate_limit.requests_per_second: must be greater than 0, got 0",
        "teams.acme.rate_limit.burst: a burst needs requests_per_second (it is the depth of that rate's bucket)",
    ]


def test_a_rate_without_a_burst_gets_one_seconds_worth() -> None:
    table = compile_table(doc_with({"requests_per_second": 2.5}, {}))
    ci, _ = keys(table)
    assert ci.rate_limit is not None and ci.rate_limit.burst is None
    assert table.teams["acme"].rate_limit is None  # an empty rate_limit limits nothing
    limiter = Limiter(Metrics(), Clock())
    assert statuses(limiter, table, ci, 4)[:3] == ["ok"] * 3
    assert "rate limit" in statuses(limiter, table, ci, 1)[0]
