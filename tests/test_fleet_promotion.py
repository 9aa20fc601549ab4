"""Fleet mode, promotions (SPEC §13, issue 14): one promotion per environment fleet-wide, ramps under
a lease that another gateway takes over, and the rollback rule over the whole fleet's answers.

Gateway processes share a fresh database on the real PostgreSQL; the planes answer with the
deployment they were addressed to. Waits are bounded polls; nothing asserts on time.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import psycopg

from tests import fleet as fleet_support
from tests.fleet import KEY, call, fresh_database, metric_value, start_fleet, stop_fleet
from tests.support import GatewayProcess, wait_for
from tests.test_environments import HOST, TestPlane

STAGING = "/v1/models/m1/environments/staging"

plane, config = fleet_support.plane, fleet_support.config  # the fixtures (tests/fleet.py)


def promotion(gw: GatewayProcess) -> dict:
    status, view = gw.admin("GET", STAGING)
    assert status == 200 and isinstance(view, dict), view
    return view


def progress(gw: GatewayProcess) -> dict:
    return promotion(gw)["in_progress_promotion"] or {}


def lease_holder(url: str) -> str | None:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT holder FROM promotion_leases WHERE model_id = 'm1' AND environment = 'staging'"
                           " AND expires_at > now()").fetchone()  # fmt: skip
    return row[0] if row else None


def by_pid(fleet: list[GatewayProcess], holder: str) -> GatewayProcess:
    pid = int(holder.split("/")[1])  # host/pid/nonce
    return next(gw for gw in fleet if gw.proc is not None and gw.proc.pid == pid)


def race(fleet: list[GatewayProcess], deployments: tuple[str, ...]) -> dict[int, tuple[int, object]]:
    """Promote calls to staging released together, one per gateway: gateway index -> (status, answer)."""
    barrier = threading.Barrier(len(deployments))
    results: dict[int, tuple[int, object]] = {}

    def go(i: int, dep: str) -> None:
        barrier.wait()
        results[i] = fleet[i].admin("POST", STAGING + "/promote",
                                    body={"deployment_id": dep, "ramp_up_duration_seconds": 60})  # fmt: skip

    threads = [threading.Thread(target=go, args=(i, dep)) for i, dep in enumerate(deployments)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_promotes_on_different_gateways_exactly_one_wins(config: Path) -> None:
    with fresh_database() as url:
        fleet = start_fleet(config, url, 3)
        try:
            for round_ in range(3):
                results = race(fleet, ("v2", "v1", "v2"))
                statuses = sorted(status for status, _ in results.values())
                assert statuses == [200, 409, 409], (round_, results)
                for status, body in results.values():
                    if status == 409:
                        assert isinstance(body, dict) and body["error_code"] == "client_error" and body["error"], body
                # Every gateway sees the one promotion that won; then it is cancelled through another one.
                winner = next(i for i, (status, _) in results.items() if status == 200)
                for gw in fleet:
                    wait_for(lambda gw=gw: progress(gw).get("status") in ("RELEASING", "RAMPING_UP"), "the winner")
                other = fleet[(winner + 1) % 3]
                wait_for(lambda other=other: other.admin("POST", STAGING + "/force_cancel_promotion")[0] == 200,
                         "a cancel through another gateway")  # fmt: skip
                for gw in fleet:
                    wait_for(lambda gw=gw: progress(gw).get("status") == "CANCELED", "the cancel everywhere")
        finally:
            stop_fleet(fleet)


def test_a_gateway_killed_during_a_ramp_is_taken_over_by_another(config: Path) -> None:
    with fresh_database() as url:
        fleet = start_fleet(config, url, 3)
        try:
            status, _ = fleet[0].admin("POST", STAGING + "/promote",
                                       body={"deployment_id": "v2", "ramp_up_duration_seconds": 20})  # fmt: skip
            assert status == 200
            wait_for(lambda: progress(fleet[1]).get("percent_traffic_to_new_version", 0) >= 20, "the ramp to 20%")
            holder = by_pid(fleet, wait_for(lambda: lease_holder(url), "the lease"))
            holder.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
            holder.proc.wait(10)  # type: ignore[union-attr]
            at_kill = progress(next(gw for gw in fleet if gw is not holder))["percent_traffic_to_new_version"]
            survivors = [gw for gw in fleet if gw is not holder]

            new_holder = wait_for(lambda: (h := lease_holder(url)) and holder_id(holder) not in h and h,
                                  "another gateway to take the lease", 30)  # fmt: skip
            assert by_pid(survivors, new_holder) in survivors
            seen = [at_kill]

            def finished() -> bool:
                p = progress(survivors[0])
                if p["status"] == "RAMPING_UP" and p["percent_traffic_to_new_version"] != seen[-1]:
                    seen.append(p["percent_traffic_to_new_version"])
                return p["status"] == "SUCCEEDED"

            wait_for(finished, "a survivor to finish the ramp", 60)
            print(f"ramp stages seen after the SIGKILL at {at_kill}%: {seen[1:]}")
            assert seen == sorted(seen)  # it went on from where it was, never back
            for gw in survivors:
                wait_for(lambda gw=gw: promotion(gw)["current_deployment"]["id"] == "v2", "v2 to serve staging")
                status, body = call(gw, HOST, "/environments/staging/predict", KEY)
                assert (status, body["deployment"]) == (200, "v2")
                assert metric_value(gw, "gateway_promotion_traffic_percent") == 100  # whoever ran it
            assert "promotion lease of m1/staging taken" in by_pid(survivors, new_holder).output()
        finally:
            stop_fleet(fleet)


def holder_id(gw: GatewayProcess) -> str:
    return f"/{gw.proc.pid}/"  # type: ignore[union-attr]


def test_the_rollback_rule_counts_the_answers_of_the_whole_fleet(config: Path, plane: TestPlane) -> None:
    with fresh_database() as url:
        fleet = start_fleet(config, url, 3)
        try:
            plane.fail_deployments.add("v2")
            status, _ = fleet[0].admin("POST", STAGING + "/promote", body={
                "deployment_id": "v2", "ramp_up_duration_seconds": 300,
                "rollback": {"max_5xx_percent": 50, "window_seconds": 60, "min_calls": 10},
            })  # fmt: skip
            assert status == 200
            wait_for(lambda: progress(fleet[0]).get("status") == "RAMPING_UP", "the ramp to start")
            runner = by_pid(fleet, wait_for(lambda: lease_holder(url), "the lease"))
            others = [gw for gw in fleet if gw is not runner]
            # The candidate's 5xx answers reach only the gateways that do not run the promotion.
            failed = 0
            for i in range(2000):
                if progress(runner).get("status") == "FAILED":
                    break
                status, _ = call(others[i % 2], HOST, "/environments/staging/predict", KEY, routing_key=f"caller-{i}")
                failed += status == 500
            view = wait_for(lambda: (p := progress(runner)).get("status") == "FAILED" and p, "the rollback", 30)
            assert "automatic rollback" in view["error_message"], view
            assert failed >= 10
            for gw in fleet:
                wait_for(lambda gw=gw: promotion(gw)["current_deployment"]["id"] == "v4", "v4 to serve again")
        finally:
            plane.fail_deployments.clear()
            stop_fleet(fleet)
