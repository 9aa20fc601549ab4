"""The async queue stores (SPEC §10, §13; issue 14): the embedded SQLite file and a region's PostgreSQL
database, held to one contract by the same tests (each test runs over both), plus what only the
database has: claims from two gateways at once (SKIP LOCKED), a database that cannot be reached,
its migrations and its region tag. Real PostgreSQL (tests/fleet.py), a fresh database per test.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from gateway.asyncq.pgstore import PgRegionStore
from gateway.asyncq.request import AsyncRequest, Retry
from gateway.asyncq.store import LEASE_SECONDS, RegionStore
from gateway.environments.store import StoreError
from gateway.stores.db import StoreUnavailable
from gateway.stores.migrate import QUEUE
from tests.fleet import fresh_database, fresh_queue_database, run_cli

Store = RegionStore | PgRegionStore
FOREIGN_A = "host-a.example:101:1"  # owners on other hosts: only a lease that passed hands a claim on
FOREIGN_B = "host-b.example:202:2"


@pytest.fixture(params=["sqlite", "postgres"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator:
    """Opens stores of one region's queue (every store opened shares it); closed afterwards."""
    opened: list[Store] = []
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            path = tmp_path / "async-queue-us.sqlite3"

            def open_one() -> Store:
                opened.append(RegionStore(path, "us"))
                return opened[-1]
        else:
            url = stack.enter_context(fresh_queue_database("us"))

            def open_one() -> Store:
                opened.append(PgRegionStore(url, "us"))
                return opened[-1]

        yield open_one
        for store in opened:
            store.close()


def request(n: int = 0, *, priority: int = 0, webhook: bool = False, created: float | None = None,
            team: str = "t1", model: str = "m1", max_queue: int = 600) -> AsyncRequest:  # fmt: skip
    now = time.time() if created is None else created
    return AsyncRequest(
        request_id=uuid.uuid4().hex, team=team, region="us", model_id=model, kind="model", environment="production",
        deployment_id="d1", caller="k", priority=priority, max_time_in_queue_seconds=max_queue, retry=Retry(),
        webhook_endpoint="https://hooks.example/h" if webhook else None, body=f'{{"n": {n}}}'.encode(),
        created_at=now, next_at=now,
    )  # fmt: skip


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(coro)


def test_a_request_round_trips_and_claims_go_by_priority_then_fifo(opener) -> None:  # noqa: ANN001
    async def scenario() -> None:
        store = opener()
        reqs = [request(0, priority=1), request(1, priority=0), request(2, priority=1), request(3, priority=0)]
        for r in reqs:
            await store.insert(r)
        got = await store.get(reqs[0].request_id)
        assert got is not None and got.body == b'{"n": 0}' and got.status == "QUEUED" and got.retry == Retry()
        assert got.webhook_status == "NO_WEBHOOK_PROVIDED" and await store.get("nothing") is None
        assert await store.queue_counts("m1", "production", "") == (4, 0)
        assert await store.team_open("t1") == 4 and await store.team_open("t2") == 0
        assert await store.targets(time.time()) == [("m1", "production", "")]
        assert sorted(await store.depth()) == [("m1", "production", "d1", 0, 2), ("m1", "production", "d1", 1, 2)]
        claimed = await store.claim_runs("m1", "production", "", 3, time.time())
        assert [json_n(r) for r in claimed] == [1, 3, 0]  # priority 0 first, FIFO within a priority
        assert all(r.status == "IN_PROGRESS" and r.attempts == 1 for r in claimed)
        assert await store.queue_counts("m1", "production", "") == (1, 3)
        assert await store.in_progress() == [("m1", "production", "d1", 3)]
        done = claimed[0]
        done.set_status("SUCCEEDED", time.time())
        done.result, done.completed_at = b'{"ok": 1}', time.time()
        assert await store.save(done, release=True) == 1
        again = await store.get(done.request_id)
        assert again is not None and again.status == "SUCCEEDED" and again.result == b'{"ok": 1}'
        assert again.attempts == 1

    run(scenario())


def json_n(req: AsyncRequest) -> int:
    return int(req.body.decode().split(":")[1].rstrip("}"))


def test_cancel_only_a_queued_request_and_purge_only_what_ended_and_was_delivered(opener) -> None:  # noqa: ANN001
    async def scenario() -> None:
        store = opener()
        plain, hooked, running = request(0), request(1, webhook=True), request(2)
        for r in (plain, hooked, running):
            await store.insert(r)
        now = time.time()
        [claimed] = await store.claim_runs("m1", "production", "", 1, now)
        assert claimed.request_id == plain.request_id
        assert await store.cancel(plain.request_id, now) == "IN_PROGRESS"  # it runs to its end
        assert await store.cancel(hooked.request_id, now) == "QUEUED"
        assert await store.cancel(hooked.request_id, now) == "CANCELED"
        assert await store.cancel("unknown", now) is None
        canceled = await store.get(hooked.request_id)
        assert canceled is not None and (canceled.status, canceled.webhook_status) == ("CANCELED", "CANCELED")
        assert await store.cancel(running.request_id, now) == "QUEUED"
        other = await store.get(running.request_id)
        assert other is not None and (other.status, other.webhook_status) == ("CANCELED", "NO_WEBHOOK_PROVIDED")
        # A webhook still to deliver keeps its request; one that ended later than `before` stays too.
        pending = request(3, webhook=True)
        await store.insert(pending)
        pending.set_status("SUCCEEDED", now)
        pending.completed_at = now - 100
        await store.save(pending)
        assert await store.purge(now + 1) == 2  # the two canceled ones
        assert await store.get(hooked.request_id) is None and await store.get(pending.request_id) is not None
        assert await store.get(plain.request_id) is not None  # in progress: not ended

    run(scenario())


def test_a_queued_request_past_its_time_in_queue_ends_expired_at_the_claim(opener) -> None:  # noqa: ANN001
    async def scenario() -> None:
        store = opener()
        old = request(0, created=time.time() - 20, max_queue=10)
        fresh = request(1)
        await store.insert(old)
        await store.insert(fresh)
        claimed = await store.claim_runs("m1", "production", "", 5, time.time())
        assert [r.request_id for r in claimed] == [fresh.request_id]
        expired = await store.get(old.request_id)
        assert expired is not None and expired.status == "EXPIRED" and expired.completed_at is not None
        assert expired.errors[0]["code"] == "MODEL_NOT_READY"

    run(scenario())


def test_a_claim_passes_to_another_owner_only_once_its_lease_passed(opener) -> None:  # noqa: ANN001
    async def scenario() -> None:
        a, b = opener(), opener()
        a.owner, b.owner = FOREIGN_A, FOREIGN_B
        req = request(0, webhook=True)
        await a.insert(req)
        now = time.time()
        assert len(await a.claim_runs("m1", "production", "", 1, now)) == 1
        assert await b.claim_runs("m1", "production", "", 1, now + 1) == []  # held, lease running
        assert await b.targets(now + 1) == []
        assert await a.renew([req.request_id], now + 20) == 1  # the owner renews: until now + 20 + lease
        assert await b.claim_runs("m1", "production", "", 1, now + LEASE_SECONDS + 1) == []
        later = now + 20 + LEASE_SECONDS + 1
        assert await b.targets(later) == [("m1", "production", "")]
        [taken] = await b.claim_runs("m1", "production", "", 1, later)
        assert taken.request_id == req.request_id and taken.attempts == 2  # run again, same id
        assert await a.renew([req.request_id], later) == 0  # no longer a's
        # The run ended with a webhook to send: its delivery is claimed the same way.
        taken.set_status("SUCCEEDED", later)
        taken.completed_at = taken.next_at = later
        await b.save(taken)  # the claim kept: b delivers it now
        assert await a.webhooks_due(later) and await a.claim_webhooks(4, later) == []
        [hook] = await a.claim_webhooks(4, later + LEASE_SECONDS + 1)
        assert hook.request_id == req.request_id

    run(scenario())


def test_many_submits_together_share_commits_and_a_bad_write_fails_alone(opener) -> None:  # noqa: ANN001
    async def scenario() -> None:
        store = opener()
        first = request(0)
        await store.insert(first)
        before = store.commits
        reqs = [request(i) for i in range(300)]
        results = await asyncio.gather(*(store.insert(r) for r in reqs), store.insert(first), return_exceptions=True)
        assert all(isinstance(seq, int) for seq in results[:-1]) and isinstance(results[-1], Exception)
        commits = store.commits - before
        assert 1 <= commits < 300 / 4, commits  # group commit: many writes per transaction
        assert await store.team_open("t1") == 301  # every good write is durable, the duplicate is not

    run(scenario())


def test_two_stores_claiming_at_once_never_claim_one_request_twice(opener) -> None:  # noqa: ANN001
    async def scenario() -> None:
        a, b = opener(), opener()
        a.owner, b.owner = FOREIGN_A, FOREIGN_B
        reqs = [request(i) for i in range(400)]
        await asyncio.gather(*(a.insert(r) for r in reqs))
        claims: dict[str, list[str]] = {"a": [], "b": []}

        async def drain(name: str, store: Store) -> None:
            while True:
                got = await store.claim_runs("m1", "production", "", 7, time.time())
                if not got and await store.queue_counts("m1", "production", "") == (0, 400):
                    return
                claims[name] += [r.request_id for r in got]

        await asyncio.wait_for(asyncio.gather(drain("a", a), drain("b", b)), 60)
        both = claims["a"] + claims["b"]
        assert sorted(both) == sorted(r.request_id for r in reqs)  # each claimed exactly once
        if isinstance(a, PgRegionStore):  # row locks, not a file lock: both claim at the same time
            assert claims["a"] and claims["b"]

    run(scenario())


# -- what only the database store has ---------------------------------------------------------


def test_an_unreachable_database_fails_fast_with_store_unavailable() -> None:
    async def scenario() -> None:
        store = PgRegionStore("postgresql://postgres:secret@127.0.0.1:1/nothing", "us")
        try:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="region 'us' is unreachable"):
                await store.insert(request(0))
            with pytest.raises(StoreUnavailable):
                await store.get("x")
            for _ in range(20):  # while it is down, the next calls do not even try
                with pytest.raises(StoreUnavailable):
                    await store.team_open("t1")
            assert time.monotonic() - started < 30
            assert not store.health.up and "down" in repr(store)
        finally:
            store.close()

    run(scenario())


def test_queue_migrations_are_versioned_idempotent_tagged_and_refuse_newer() -> None:
    with fresh_database(migrated=False) as url:
        first = run_cli("store", "migrate", "--queue-store", f"us={url}")
        assert first.returncode == 0, first.stderr
        assert f"(async queue of region us): migrated from schema version 0 to {QUEUE.latest}" in first.stdout
        again = run_cli("store", "migrate", "--queue-store", f"us={url}")
        assert again.returncode == 0 and f"schema version {QUEUE.latest}, up to date" in again.stdout, again
        with psycopg.connect(url) as conn:
            assert [r[0] for r in conn.execute("SELECT version FROM queue_schema_version")] == [
                v for v, _, _ in QUEUE.migrations()
            ]
            assert conn.execute("SELECT region FROM queue_region").fetchall() == [("us",)]
            assert conn.execute("SELECT to_regclass('schema_version')").fetchone() == (None,)  # not the control set
        other = run_cli("store", "migrate", "--queue-store", f"eu={url}")
        assert other.returncode == 1 and "holds region 'us''s async queue, not 'eu''s" in other.stderr, other.stderr
        with psycopg.connect(url) as conn:
            conn.execute("INSERT INTO queue_schema_version (version, name) VALUES (%s, 'future')", (QUEUE.latest + 1,))
        newer = run_cli("store", "migrate", "--queue-store", f"us={url}")
        assert newer.returncode == 1 and f"newer than this gateway knows ({QUEUE.latest})" in newer.stderr


def test_one_database_may_hold_the_control_state_and_a_region_queue_apart() -> None:
    with fresh_database() as url:  # the control schema
        done = run_cli("store", "migrate", "--store", url, "--queue-store", f"us={url}")
        assert done.returncode == 0 and "up to date" in done.stdout and "async queue of region us" in done.stdout

        async def scenario() -> None:
            store = PgRegionStore(url, "us")
            try:
                await store.insert(request(0))
                assert await store.team_open("t1") == 1
            finally:
                store.close()

        run(scenario())


def test_a_store_refuses_another_regions_database() -> None:
    with fresh_queue_database("us") as url:

        async def scenario() -> None:
            store = PgRegionStore(url, "eu")
            try:
                with pytest.raises(StoreError, match="holds region 'us''s async queue"):
                    await store.insert(request(0))
                with pytest.raises(StoreError, match="holds region 'us''s async queue"):
                    await store.get("x")
            finally:
                store.close()

        run(scenario())
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM async_requests").fetchone() == (0,)
