"""Fleet mode, change propagation (SPEC §13, issue 14): gateway processes sharing real PostgreSQL.

A change made through one gateway's admin API is served by the others (LISTEN/NOTIFY, polling as
the fallback); a gateway that loses the database keeps serving its last good table and says so;
one that starts while the database is down serves from its local cache. The latency is printed
(the goal, p99 within 1 s, is measured in benchmarks/run_fleet.py), never asserted.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

from tests import fleet as fleet_support
from tests.fleet import KEY, call, fresh_database, metric_value, private_fleet, start_fleet, stop_fleet
from tests.support import GatewayProcess, wait_for
from tests.test_environments import HOST

PRODUCTION = "/environments/production/predict"

plane, config = fleet_support.plane, fleet_support.config  # the fixtures (tests/fleet.py)


def serves(gw: GatewayProcess, deployment: str) -> bool:
    status, body = call(gw, HOST, PRODUCTION, KEY)
    return status == 200 and body["deployment"] == deployment


def promote(gw: GatewayProcess, env: str, dep: str, **extra: object) -> tuple[int, object]:
    return gw.admin("POST", f"/v1/models/m1/environments/{env}/promote", body={"deployment_id": dep, **extra})


def routing(gw: GatewayProcess) -> dict:
    status, body = gw.admin("GET", "/v1/routing")
    assert status == 200 and isinstance(body, dict), body
    return body


def canary_percent(gw: GatewayProcess) -> float | None:
    status, view = gw.admin("GET", "/v1/models/m1/environments/staging")
    assert status == 200 and isinstance(view, dict), view
    return (view.get("canary") or {}).get("percent")


def readyz(gw: GatewayProcess) -> tuple[int, dict]:
    status, body = gw.admin("GET", "/readyz")
    assert isinstance(body, dict)
    return status, body


def test_a_change_through_one_gateway_is_served_by_all_three(config: Path) -> None:
    with fresh_database() as url:
        fleet = start_fleet(config, url, 3)
        try:
            assert all(serves(gw, "v1") for gw in fleet)
            start = time.monotonic()
            status, _ = promote(fleet[0], "production", "v2")  # no ramp: the switch is immediate
            assert status == 200
            latency = {}
            for i, gw in enumerate(fleet):
                wait_for(lambda gw=gw: serves(gw, "v2"), f"gateway {i} to serve the promoted deployment", 30)
                latency[i] = time.monotonic() - start
            print("propagation (promote through gateway 0, served by each): "
                  + ", ".join(f"gateway {i}: {s * 1000:.0f} ms" for i, s in latency.items()))  # fmt: skip
            revisions = {routing(gw)["admin_revision"] for gw in fleet}
            digests = {routing(gw)["digest"] for gw in fleet}
            assert len(revisions) == 1 and len(digests) == 1  # one composed table fleet-wide

            # A change through another gateway, of another kind, is seen by all too.
            start = time.monotonic()
            status, _ = fleet[2].admin("PATCH", "/v1/models/m1/environments/staging",
                                       body={"canary": {"deployment": "v2", "percent": 25}})  # fmt: skip
            assert status == 200
            for i, gw in enumerate(fleet):
                wait_for(lambda gw=gw: canary_percent(gw) == 25, "the canary everywhere")
                latency[i] = time.monotonic() - start
            print("propagation (canary through gateway 2, seen by each): "
                  + ", ".join(f"gateway {i}: {s * 1000:.0f} ms" for i, s in latency.items()))  # fmt: skip
        finally:
            stop_fleet(fleet)


def test_a_lost_database_keeps_the_last_good_table_serving_and_the_cache_starts_a_gateway(config: Path) -> None:
    with private_fleet(config, 2) as (pg, url, fleet):
        assert promote(fleet[0], "production", "v2")[0] == 200
        for gw in fleet:
            wait_for(lambda gw=gw: serves(gw, "v2"), "the promotion everywhere")

        traffic = SyncTraffic(fleet)
        traffic.start()
        pg.stop()
        for gw in fleet:
            status, body = wait_for(lambda gw=gw: (s := readyz(gw))[1].get("store") == "unreachable" and s,
                                    "readyz to say the store is unreachable")  # fmt: skip
            assert status == 200 and body["status"] == "ready"
            store = routing(gw)["store"]
            assert store["state"] == "unreachable" and store["last_error"] and store["last_sync"]
            assert metric_value(gw, "gateway_store_up") == 0
            assert (metric_value(gw, "gateway_store_errors_total") or 0) > 0
        # An admin change cannot be stored: refused with the error shape, nothing changes.
        status, body = fleet[0].admin("PATCH", "/v1/models/m1/environments/staging",
                                      body={"canary": {"deployment": "v2", "percent": 5}})  # fmt: skip
        assert status == 500 and isinstance(body, dict) and "unreachable" in body["error"], body
        assert body["error_code"] == "internal_error"
        # A gateway that starts now serves from the local cache of the last composed table, and says so.
        late = GatewayProcess(config, "--store", url).start()
        fleet.append(late)
        assert serves(late, "v2")
        assert routing(late)["store"] == {**routing(late)["store"], "state": "unreachable",
                                           "serving_from": "local cache"}  # fmt: skip
        assert readyz(late)[1]["serving_from"] == "local cache"

        pg.start()
        for gw in fleet:
            wait_for(lambda gw=gw: routing(gw)["store"]["state"] == "ok", "the store to answer again", 30)
        assert routing(late)["store"]["serving_from"] == "database"
        status, _ = fleet[1].admin("PATCH", "/v1/models/m1/environments/staging",
                                   body={"canary": {"deployment": "v2", "percent": 30}})  # fmt: skip
        assert status == 200
        for gw in fleet:
            wait_for(lambda gw=gw: routing(gw)["admin_revision"] == routing(fleet[1])["admin_revision"],
                     "changes to propagate after the database came back")  # fmt: skip
        outcomes = traffic.stop()
        print(f"sync calls while the database went away and came back: {dict(outcomes)}")
        assert set(outcomes) == {200} and outcomes[200] > 0, outcomes


def test_the_database_restarted_during_traffic_fails_no_call(config: Path) -> None:
    with private_fleet(config, 3) as (pg, _, fleet):
        traffic = SyncTraffic(fleet)
        traffic.start()
        wait_for(lambda: traffic.total() >= 30, "traffic to flow")
        pg.restart()
        after = traffic.total()
        wait_for(lambda: traffic.total() >= after + 30, "traffic to go on after the restart")
        assert promote(fleet[1], "production", "v2")[0] == 200  # changes resume
        for gw in fleet:
            wait_for(lambda gw=gw: serves(gw, "v2"), "the change after the restart everywhere", 30)
        outcomes = traffic.stop()
        print(f"sync calls across a database restart: {dict(outcomes)}")
        assert set(outcomes) == {200}, outcomes


class SyncTraffic:
    """Sync calls to production through every gateway in turn, in a thread; bounded in count."""

    LIMIT = 20000

    def __init__(self, fleet: list[GatewayProcess]) -> None:
        self.fleet = list(fleet)
        self.outcomes: Counter[int] = Counter()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def total(self) -> int:
        return sum(self.outcomes.values())

    def _run(self) -> None:
        i = 0
        while not self.stopping.is_set() and i < self.LIMIT:
            gw = self.fleet[i % len(self.fleet)]
            try:
                status, _ = call(gw, HOST, PRODUCTION, KEY)
            except OSError:
                status = -1
            self.outcomes[status] += 1
            i += 1

    def stop(self) -> Counter[int]:
        self.stopping.set()
        self.thread.join(30)
        return self.outcomes
