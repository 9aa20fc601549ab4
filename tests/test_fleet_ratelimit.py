"""Fleet mode, rate limits (SPEC §13, issue 14): a key's or a team's `rate_limit` holds across every
gateway sharing the database, not per gateway; a stale store does as each limit's `fleet_failure`.

Three gateway processes share a fresh database on the real PostgreSQL (a private server where the
test stops it); calls go round-robin over them. The fleet's admitted calls are counted against the
documented bound (README "Fleet-wide rate limits": R*T + B, plus two exchange periods' worth of the
rate and one call per gateway), never against a time; waits are bounded polls.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import pytest
from aiohttp import web

from tests import fleet as fleet_support
from tests.fleet import call, fresh_database, metric_value, private_fleet, start_fleet, stop_fleet
from tests.support import GatewayProcess, sha, wait_for, write_table
from tests.test_environments import HOST, TestPlane, table_doc

PRODUCTION = "/environments/production/predict"
PERIOD = 0.2  # gateway.stores.ratelimits.PERIOD_SECONDS

plane = fleet_support.plane  # the fixture (tests/fleet.py)


def secret(name: str) -> str:
    return f"sk_fleet_{name}_5e1d"


def limited_table(path: Path, plane_url: str, keys: dict[str, dict | None], team: dict | None = None) -> Path:
    """tests.test_environments' table over `plane_url`, plus team acme's `keys` (name -> rate_limit)."""
    doc = table_doc(plane_url, plane_url)
    for name, limit in keys.items():
        doc["api_keys"].append({"name": name, "team": "acme", "sha256": sha(secret(name)),
                                **({"rate_limit": limit} if limit else {})})  # fmt: skip
    if team is not None:
        doc["teams"]["acme"]["rate_limit"] = team
    return write_table(path / "table.yaml", doc)


def round_robin(
    fleet: list[GatewayProcess], keys: list[str], seconds: float, clients: int = 9
) -> tuple[Counter, float]:
    """Calls as fast as `clients` threads go, over the gateways and `keys` in turn, for `seconds`:
    (statuses seen, seconds from the first call's start to the last one's end)."""
    statuses: Counter = Counter()
    lock = threading.Lock()
    start = time.monotonic()
    deadline = start + seconds

    def client(i: int) -> None:
        n = i
        while time.monotonic() < deadline:
            status, body = call(fleet[n % len(fleet)], HOST, PRODUCTION, secret(keys[n % len(keys)]))
            assert status in (200, 429), (status, body)  # nothing fails that the rule does not refuse
            if status == 429:
                assert body["error_code"] == "rate_limited", body
            with lock:
                statuses[status] += 1
            n += 1

    with futures.ThreadPoolExecutor(clients) as pool:
        for done in [pool.submit(client, i) for i in range(clients)]:
            done.result()
    return statuses, time.monotonic() - start


def bound(rate: float, burst: float, seconds: float, members: int) -> float:
    """README: over T seconds the fleet admits at most R*T + B, plus R * two periods and one call a member."""
    return rate * (seconds + 2 * PERIOD) + burst + members


def assert_fleet_wide(statuses: Counter, seconds: float, rate: float, burst: float, members: int) -> None:
    admitted = statuses[200]
    limit = bound(rate, burst, seconds, members)
    print(f"admitted {admitted} of {sum(statuses.values())} calls in {seconds:.2f} s over {members} gateways: "
          f"bound {limit:.0f}, per-gateway limits would allow {members * (rate * seconds + burst):.0f}")  # fmt: skip
    assert statuses[429] > 0, "the calls never reached the limit: the test shows nothing"
    assert admitted <= limit
    assert admitted < 0.5 * members * (rate * seconds + burst)  # clearly not every gateway's own limit


def test_a_key_limit_holds_across_three_gateways_and_recovers(tmp_path: Path, plane: TestPlane) -> None:
    config = limited_table(tmp_path, plane.url, {"fleet": {"requests_per_second": 20, "burst": 20}})
    with fresh_database() as url:
        fleet = start_fleet(config, url, 3)
        try:
            before = sum(plane.calls.values())
            statuses, seconds = round_robin(fleet, ["fleet"], 5.0)
            assert_fleet_wide(statuses, seconds, 20, 20, 3)
            assert sum(plane.calls.values()) - before == statuses[200]  # a refused call never reaches the plane
            for i, gw in enumerate(fleet):  # after the window each gateway admits the key again
                wait_for(lambda gw=gw: call(gw, HOST, PRODUCTION, secret("fleet"))[0] == 200, f"gateway {i} again")
                share = metric_value(gw, "gateway_rate_limit_fleet_share")
                assert share is not None and 0 < share < 1, share  # its part of the fleet's limit, not all of it
            refused = sum(metric_value(gw, "gateway_rate_limited_total") or 0 for gw in fleet)
            assert refused >= statuses[429]
            text = "".join(gw.output() for gw in fleet)
            assert secret("fleet") not in text  # the key's name is logged and counted, never the key
        finally:
            stop_fleet(fleet)


def test_a_team_limit_shared_by_two_keys_holds_across_three_gateways(tmp_path: Path, plane: TestPlane) -> None:
    config = limited_table(tmp_path, plane.url, {"one": None, "two": None},
                           team={"requests_per_second": 15, "burst": 10})  # fmt: skip
    with fresh_database() as url:
        fleet = start_fleet(config, url, 3)
        try:
            statuses, seconds = round_robin(fleet, ["one", "two"], 5.0)
            assert_fleet_wide(statuses, seconds, 15, 10, 3)
            for gw in fleet:
                wait_for(lambda gw=gw: call(gw, HOST, PRODUCTION, secret("two"))[0] == 200, "the team again")
        finally:
            stop_fleet(fleet)


class SlowPlane(TestPlane):
    """A plane whose calls stay open until `release()`: counts the calls open now and the most at once."""

    def __init__(self) -> None:
        self.open = 0
        self.most = 0
        self.gate = asyncio.Event()
        super().__init__()

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.open += 1
        self.most = max(self.most, self.open)
        try:
            await self.gate.wait()
        finally:
            self.open -= 1
        return web.json_response({"deployment": request.headers.get("x-baseten-deployment-id")})

    def release(self) -> None:
        self.loop.call_soon_threadsafe(self.gate.set)

    def stop(self) -> None:
        self.release()
        super().stop()


@pytest.fixture
def slow_plane() -> Iterator[SlowPlane]:
    plane = SlowPlane()
    yield plane
    plane.stop()


def test_max_concurrent_holds_across_three_gateways(tmp_path: Path, slow_plane: SlowPlane) -> None:
    config = limited_table(tmp_path, slow_plane.url, {"slow": {"max_concurrent": 4}})
    with fresh_database() as url:
        fleet = start_fleet(config, url, 3)
        pool = futures.ThreadPoolExecutor(12)
        try:
            held: list[tuple[int, futures.Future]] = []
            refused = []
            for i in range(12):  # one at a time, round-robin: each reaches the plane or is refused
                seen = slow_plane.open
                answer = pool.submit(call, fleet[i % 3], HOST, PRODUCTION, secret("slow"), timeout=60)
                wait_for(
                    lambda seen=seen, answer=answer: slow_plane.open > seen or answer.done(),
                    f"call {i} open or refused",
                )
                if answer.done():
                    status, body = answer.result()
                    assert status == 429 and "max_concurrent" in body["error"], (status, body)
                    refused.append(i % 3)
                else:
                    held.append((i % 3, answer))
                time.sleep(2 * PERIOD)  # the fleet's next exchanges: what a paced client would see
            per_gateway = Counter(g for g, _ in held)
            print(f"{len(held)} calls held open ({dict(per_gateway)} by gateway), most at once at the plane "
                  f"{slow_plane.most}, refused on gateways {dict(Counter(refused))}")  # fmt: skip
            # README: at most max_concurrent + one call a gateway past it (calls started within one exchange).
            assert 4 <= len(held) == slow_plane.open and slow_plane.most <= 4 + 2
            assert max(per_gateway.values()) < 4  # so each gateway alone would still admit: it counts the others'
            for i, gw in enumerate(fleet):
                status, body = call(gw, HOST, PRODUCTION, secret("slow"))
                assert status == 429 and "max_concurrent" in body["error"], (i, status, body)
            slow_plane.release()
            assert all(f.result(60)[0] == 200 for _, f in held)
            for gw in fleet:  # the slots came back
                wait_for(lambda gw=gw: call(gw, HOST, PRODUCTION, secret("slow"))[0] == 200, "a slot again")
        finally:
            slow_plane.release()
            pool.shutdown(wait=True)
            stop_fleet(fleet)


def test_a_stale_store_fails_open_or_closed_per_limit_and_comes_back_fleet_wide(
    tmp_path: Path, plane: TestPlane
) -> None:  # fmt: skip
    config = limited_table(tmp_path, plane.url, {
        "opens": {"requests_per_second": 30, "burst": 30, "fleet_failure": "open"},
        "closes": {"requests_per_second": 30, "burst": 30, "fleet_failure": "closed"},
    })  # fmt: skip
    with private_fleet(config, 3) as (pg, _, fleet):
        for gw in fleet:  # both keys counted fleet-wide: each gateway holds a part of them
            for key in ("opens", "closes"):
                assert call(gw, HOST, PRODUCTION, secret(key))[0] == 200
        for gw in fleet:
            wait_for(lambda gw=gw: 0 < (metric_value(gw, "gateway_rate_limit_fleet_share") or 0) < 1, "the parts")

        pg.stop()
        for i, gw in enumerate(fleet):
            wait_for(lambda gw=gw: store_refusal(gw), f"gateway {i} to refuse the fail-closed key", 30)
            assert metric_value(gw, "gateway_store_up") == 0
        statuses = Counter()
        for i in range(60):  # the fail-open key: admitted by each gateway on its own (the whole limit)
            gw = fleet[i % 3]
            status, body = call(gw, HOST, PRODUCTION, secret("opens"))
            assert status in (200, 429), (status, body)
            statuses[status] += 1
            status, body = call(gw, HOST, PRODUCTION, secret("closes"))
            assert status == 429 and "fleet store is unreachable" in body["error"], (status, body)
        assert statuses[200] > 0, statuses
        print(f"store down: the fail-open key {dict(statuses)}, the fail-closed key refused 60 of 60")

        pg.start()
        for i, gw in enumerate(fleet):
            wait_for(lambda gw=gw: call(gw, HOST, PRODUCTION, secret("closes"))[0] == 200, f"gateway {i} again", 30)
            wait_for(lambda gw=gw: 0 < (metric_value(gw, "gateway_rate_limit_fleet_share") or 0) < 1,
                     "fleet-wide parts again")  # fmt: skip
            assert metric_value(gw, "gateway_store_up") == 1
            assert gw.proc is not None and gw.proc.poll() is None  # no crash
        assert "fleet rate limits: the store answers again" in fleet[0].output()


def store_refusal(gw: GatewayProcess) -> bool:
    status, body = call(gw, HOST, PRODUCTION, secret("closes"))
    if status == 200:
        return False
    assert status == 429 and body["error_code"] == "rate_limited", (status, body)
    return "fleet store is unreachable" in body["error"]


def test_each_worker_of_a_workers_gateway_is_a_member_of_the_fleet_limits(tmp_path: Path, plane: TestPlane) -> None:
    """A `--workers 2` gateway's workers serve the supervisor's copy of the overlay, yet each takes
    part in the limits itself: with a single-process gateway beside it, the key's limit holds over
    three members (two workers and one gateway), not per worker."""
    from tests.test_workers_fleet import worker_pids

    config = limited_table(tmp_path, plane.url, {"fleet": {"requests_per_second": 20, "burst": 20}})
    with fresh_database() as url:
        fleet = [GatewayProcess(config, "--store", url, "--workers", "2").start(),
                 GatewayProcess(config, "--store", url).start()]  # fmt: skip
        try:
            worker_pids(fleet[0])
            statuses, seconds = round_robin(fleet, ["fleet"], 5.0)
            assert_fleet_wide(statuses, seconds, 20, 20, 3)
        finally:
            stop_fleet(fleet)
