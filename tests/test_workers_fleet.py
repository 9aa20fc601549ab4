"""`--workers N` in fleet mode (SPEC §13, issue 14): a gateway of N workers is one member of the fleet.

Real processes on a real PostgreSQL: a `--workers 2` gateway next to a single-process one. Every
answer is attributed to the worker process that gave it (the owner of the accepted socket, read in
/proc), so "every worker serves the change" is checked answer by answer, not inferred. Latencies
are printed, never asserted (the goal, within 1 s, is measured in benchmarks/run_fleet.py).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import time
from pathlib import Path

from tests import fleet as fleet_support
from tests.fleet import KEY, PrivatePostgres, fresh_database, metric_value, run_cli, stop_fleet
from tests.support import GatewayProcess, wait_for
from tests.test_environments import HOST
from tests.test_fleet_promotion import STAGING, lease_holder, progress, race
from tests.test_fleet_sync import PRODUCTION, promote, readyz, routing

plane, config = fleet_support.plane, fleet_support.config  # the fixtures (tests/fleet.py)


def worker_pids(gw: GatewayProcess, n: int = 2) -> set[int]:
    def ready() -> set[int] | None:
        workers = routing(gw).get("workers", [])
        return {w["pid"] for w in workers} if len(workers) == n and all(w["ready"] for w in workers) else None

    return wait_for(ready, f"{n} workers ready", 60)


def socket_owner(server_port: int, client_port: int, pids: set[int]) -> int | None:
    """The process among `pids` holding the accepted end of the connection from `client_port` (/proc)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = (int(a.rsplit(":", 1)[1], 16) for a in fields[1:3])
        if local == server_port and remote == client_port:
            inodes.add(f"socket:[{fields[9]}]")
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return pid
            except FileNotFoundError:
                continue
    return None


def answer(gw: GatewayProcess, pids: set[int]) -> tuple[int | None, int, str | None]:
    """One call to production on a new connection: (the worker that answered, status, deployment)."""
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    try:
        conn.request("POST", PRODUCTION, body=b"{}", headers={
            "Host": HOST, "Authorization": f"Api-Key {KEY}", "Content-Type": "application/json",
        })  # fmt: skip
        r = conn.getresponse()
        body = json.loads(r.read() or b"{}")
        owner = socket_owner(gw.port, conn.sock.getsockname()[1], pids)  # still open: keep-alive
        return owner, r.status, body.get("deployment")
    finally:
        conn.close()


def every_worker_serves(gw: GatewayProcess, pids: set[int], deployment: str, calls: int = 40) -> dict[int, int]:
    """`calls` calls on new connections: each must answer `deployment`; answers per worker."""
    seen: dict[int, int] = {}
    for _ in range(calls):
        owner, status, dep = answer(gw, pids)
        assert (status, dep) == (200, deployment), (owner, status, dep)
        assert owner in pids, (owner, pids)
        seen[owner] = seen.get(owner, 0) + 1
    return seen


def wait_every_worker(gw: GatewayProcess, pids: set[int], deployment: str, start: float) -> dict[int, float]:
    """New connections until each worker has answered `deployment`: when each first did (s after `start`)."""
    first: dict[int, float] = {}
    deadline = time.monotonic() + 30
    while set(first) != pids and time.monotonic() < deadline:
        owner, status, dep = answer(gw, pids)
        if owner is not None and status == 200 and dep == deployment:
            first.setdefault(owner, time.monotonic() - start)
    assert set(first) == pids, (first, pids)
    return first


def gateway(config: Path, store: str, *extra: str) -> GatewayProcess:
    return GatewayProcess(config, "--store", store, *extra).start()


def own_table(config: Path, name: str) -> Path:
    """A copy of the table in a directory of its own: a gateway on another machine (its own local cache)."""
    directory = config.parent / name
    directory.mkdir()
    return Path(shutil.copy(config, directory / config.name))


def test_a_change_through_another_gateway_is_served_by_every_worker(config: Path) -> None:
    with fresh_database() as url:
        fleet = [gateway(own_table(config, "a"), url, "--workers", "2"), gateway(config, url)]
        workers, single = fleet
        try:
            pids = worker_pids(workers)
            assert workers.proc is not None and workers.proc.pid not in pids
            assert set(every_worker_serves(workers, pids, "v1")) == pids

            start = time.monotonic()
            assert promote(single, "production", "v2")[0] == 200  # then the lease holder finishes it
            wait_for(lambda: fleet_support.call(single, HOST, PRODUCTION, KEY)[1].get("deployment") == "v2")
            itself = time.monotonic() - start
            first = wait_every_worker(workers, pids, "v2", start)
            print(f"promote through the single gateway: served by it after {itself * 1000:.0f} ms, first served by "
                  "each worker of the other after: "
                  + ", ".join(f"pid {pid}: {s * 1000:.0f} ms" for pid, s in sorted(first.items())))  # fmt: skip
            spread = every_worker_serves(workers, pids, "v2")
            print(f"then {sum(spread.values())} calls on new connections, per worker: {spread}")
            assert set(spread) == pids
            view = routing(workers)
            assert {w["digest"] for w in view["workers"]} == {view["digest"]} == {routing(single)["digest"]}
            assert view["admin_revision"] == routing(single)["admin_revision"]
            assert metric_value(workers, "gateway_store_up") == 1  # the supervisor's, in the merged /metrics

            # A change through the workers' gateway (its supervisor writes it) reaches the other gateway.
            assert promote(workers, "production", "v3")[0] == 200
            wait_for(lambda: fleet_support.call(single, HOST, PRODUCTION, KEY)[1].get("deployment") == "v3",
                     "the other gateway to serve it")  # fmt: skip
            assert set(every_worker_serves(workers, pids, "v3")) == pids
        finally:
            stop_fleet(fleet)
    assert "refused" not in workers.output()


def test_one_promotion_per_environment_and_its_lease_with_a_workers_gateway(config: Path) -> None:
    with fresh_database() as url:
        fleet = [gateway(own_table(config, "a"), url, "--workers", "2"), gateway(config, url)]
        try:
            pids = worker_pids(fleet[0])
            members = {gw.proc.pid for gw in fleet if gw.proc is not None}
            for round_ in range(3):
                results = race(fleet, ("v2", "v1"))
                assert sorted(status for status, _ in results.values()) == [200, 409], (round_, results)
                holder = wait_for(lambda: lease_holder(url), "the lease")
                # The lease is held by a fleet member (the supervisor, for the workers' gateway), never a worker.
                assert int(holder.split("/")[1]) in members and int(holder.split("/")[1]) not in pids, holder
                for gw in fleet:
                    wait_for(lambda gw=gw: progress(gw).get("status") in ("RELEASING", "RAMPING_UP"), "the winner")
                loser = next(i for i, (status, _) in results.items() if status == 409)
                # Based on the revision the loser serves: 409 while the holder's next stage is on its way.
                wait_for(lambda loser=loser: fleet[loser].admin("POST", STAGING + "/force_cancel_promotion")[0] == 200,
                         "a cancel through the other gateway")  # fmt: skip
                for gw in fleet:
                    wait_for(lambda gw=gw: progress(gw).get("status") == "CANCELED", "the cancel everywhere")
        finally:
            stop_fleet(fleet)


def test_without_the_database_every_worker_keeps_the_last_good_table_and_a_restart_uses_the_cache(
    config: Path, tmp_path: Path
) -> None:
    pg = PrivatePostgres().start()
    cache = tmp_path / "state" / "store-cache.json"
    cache.parent.mkdir()
    own = own_table(config, "a")
    fleet: list[GatewayProcess] = []
    try:
        with fresh_database(pg.server) as url:
            fleet += [gateway(own, url, "--workers", "2", "--store-cache", str(cache)), gateway(config, url)]
            workers, single = fleet
            pids = worker_pids(workers)
            assert promote(single, "production", "v2")[0] == 200
            wait_every_worker(workers, pids, "v2", time.monotonic())
            assert json.loads(cache.read_text())["revision"] == routing(single)["admin_revision"]

            pg.stop()
            status, body = wait_for(lambda: (s := readyz(workers))[1].get("store") == "unreachable" and s,
                                    "readyz to say the store is unreachable")  # fmt: skip
            assert status == 200 and body["status"] == "ready", body
            assert set(every_worker_serves(workers, pids, "v2")) == pids
            assert metric_value(workers, "gateway_store_up") == 0
            status, body = workers.admin("PATCH", STAGING, body={"canary": {"deployment": "v2", "percent": 5}})
            assert status == 500 and isinstance(body, dict) and body["error_code"] == "internal_error", body

            # Restarted while the database is down: the supervisor serves the cache, and so does every worker.
            assert workers.stop() == 0
            workers = GatewayProcess(own, "--store", url, "--workers", "2", "--store-cache", str(cache)).start()
            fleet[0] = workers
            pids = worker_pids(workers)
            assert readyz(workers)[1]["serving_from"] == "local cache"
            assert set(every_worker_serves(workers, pids, "v2")) == pids

            pg.start()
            wait_for(lambda: routing(workers)["store"]["state"] == "ok", "the store to answer again", 30)
            wait_for(lambda: promote(single, "production", "v3")[0] == 200, "a change once the database is back")
            wait_every_worker(workers, pids, "v3", time.monotonic())
            assert routing(workers)["store"]["serving_from"] == "database"
    finally:
        stop_fleet(fleet)
        pg.close()


def test_a_worker_restarted_meanwhile_serves_the_current_change(config: Path) -> None:
    with fresh_database() as url:
        fleet = [gateway(own_table(config, "a"), url, "--workers", "2"), gateway(config, url)]
        workers, single = fleet
        try:
            pids = worker_pids(workers)
            victim = sorted(pids)[0]
            os.kill(victim, signal.SIGKILL)
            assert promote(single, "production", "v2")[0] == 200  # while the victim is down or starting
            new = wait_for(lambda: (p := worker_pids(workers)) and victim not in p and p, "the restart", 60)
            assert set(every_worker_serves(workers, new, "v2")) == new
        finally:
            stop_fleet(fleet)


def test_a_store_cache_without_a_database_store_is_refused(config: Path) -> None:
    done = run_cli("serve", "--config", str(config), "--store-cache", str(config.parent / "cache.json"))
    assert done.returncode == 2 and "--store-cache goes with --store postgresql://" in done.stderr, done.stderr
    assert not (config.parent / "cache.json").exists()
