"""The environments admin API and promotions (SPEC §6), end to end: a real gateway process, real
plane servers on 127.0.0.1, admin calls over HTTP.

Each plane answers with the deployment the gateway named in `x-baseten-deployment-id`, so a call's
answer says which side of a split it reached. Nothing asserts on time: a ramp is observed by polling
its state, and waits are bounded polls.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.support import GatewayProcess, free_port, sha, wait_for, write_table

KEY = "env-test-key"
AUTH = {"Authorization": f"Api-Key {KEY}"}
TOKEN = "admin-secret"
HOST = "model-m1.api.example.com"


class TestPlane:
    """A plane in its own thread: answers every call with the deployment it was addressed to."""

    __test__ = False

    def __init__(self) -> None:
        self.port = free_port()
        self.fail_deployments: set[str] = set()  # these answer 500
        self.wakes: list[dict[str, str]] = []
        self.calls: Counter[str] = Counter()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        runner = web.AppRunner(app, access_log=None)
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(runner.cleanup())
        self.loop.close()

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        dep = request.headers.get("x-baseten-deployment-id", "")
        if request.path == "/wake":
            self.wakes.append(dict(request.headers))
            return web.json_response({"waking": dep}, status=202)
        self.calls[dep] += 1
        status = 500 if dep in self.fail_deployments else 200
        return web.json_response(
            {"deployment": dep, "environment": request.headers.get("x-baseten-environment"), "path": request.path},
            status=status,
        )

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def table_doc(us_url: str, eu_url: str) -> dict:
    return {
        "version": 1,
        "domains": ["api.example.com"],
        "gateway": {"hold_timeout_seconds": 20},
        "regions": {"us": {}, "eu": {}},
        "planes": {"us-1": {"region": "us", "url": us_url}, "eu-1": {"region": "eu", "url": eu_url}},
        "teams": {"acme": {"regional_environments": {"prod-us": "us"}}},
        "api_keys": [{"name": "ci", "team": "acme", "sha256": sha(KEY)}],
        "models": {
            "m1": {
                "team": "acme",
                "deployments": {
                    "v1": {"plane": "us-1"},
                    "v2": {"plane": "us-1"},
                    "v3": {"plane": "eu-1"},
                    "v4": {"plane": "us-1"},
                    "v5": {"plane": "us-1", "status": "scaled_to_zero"},
                    "v6": {"plane": "us-1", "status": "inactive"},
                },
                "environments": {
                    "production": {"deployment": "v1"},
                    "staging": {"deployment": "v4"},
                    "prod-us": {"deployment": "v1"},
                },
                "deleted_environments": ["old"],
            }
        },
    }


@pytest.fixture(scope="module")
def planes() -> Iterator[tuple[TestPlane, TestPlane]]:
    us, eu = TestPlane(), TestPlane()
    yield us, eu
    us.stop()
    eu.stop()


@pytest.fixture
def gateway(tmp_path: Path, planes: tuple[TestPlane, TestPlane]) -> Iterator[GatewayProcess]:
    us, eu = planes
    us.fail_deployments.clear()
    us.wakes.clear()
    us.calls.clear()
    config = write_table(tmp_path / "table.yaml", table_doc(us.url, eu.url))
    gw = GatewayProcess(config, "--admin-token", TOKEN).start()
    yield gw
    gw.stop()


def admin(gw: GatewayProcess, method: str, path: str, body: object = None, token: str | None = TOKEN) -> tuple:
    return gw.admin(method, path, token, body)


def env_path(env: str = "", action: str = "") -> str:
    return "/v1/models/m1/environments" + (f"/{env}" if env else "") + (f"/{action}" if action else "")


def call(gw: GatewayProcess, env: str, routing_key: str | None = None) -> tuple[int, dict]:
    headers = dict(AUTH, Host=HOST)
    if routing_key is not None:
        headers["x-baseten-routing-key"] = routing_key
    req = urllib.request.Request(f"{gw.url}/environments/{env}/predict", data=b"{}", headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


async def _split(gw: GatewayProcess, env: str, keys: list[str]) -> dict[str, str]:
    """The deployment that answered each routing key."""
    out: dict[str, str] = {}
    sem = asyncio.Semaphore(16)
    async with aiohttp.ClientSession() as session:

        async def one(key: str) -> None:
            async with sem:
                async with session.post(
                    f"{gw.url}/environments/{env}/predict",
                    data=b"{}",
                    headers=dict(AUTH, Host=HOST, **{"x-baseten-routing-key": key}),
                ) as r:
                    out[key] = (await r.json())["deployment"] if r.status == 200 else f"status {r.status}"

        await asyncio.gather(*(one(k) for k in keys))
    return out


def split(gw: GatewayProcess, env: str, keys: list[str]) -> dict[str, str]:
    return asyncio.run(_split(gw, env, keys))


def promotion(gw: GatewayProcess, env: str) -> dict:
    status, body = admin(gw, "GET", env_path(env))
    assert status == 200, body
    return body


def wait_status(gw: GatewayProcess, env: str, *states: str, timeout: float = 30.0) -> dict:
    def done() -> dict | None:
        view = promotion(gw, env)
        p = view["in_progress_promotion"]
        return view if p is not None and p["status"] in states else None

    return wait_for(done, f"promotion of {env} to reach {states}", timeout)  # type: ignore[return-value]


# -- environments CRUD --------------------------------------------------------------------------


def test_list_read_and_the_shape_of_an_environment(gateway: GatewayProcess) -> None:
    status, body = admin(gateway, "GET", env_path())
    assert status == 200
    names = [e["name"] for e in body["environments"]]
    assert names == ["prod-us", "production", "staging"]
    status, env = admin(gateway, "GET", env_path("staging"))
    assert status == 200
    # The current deployment is the SDK's `Deployment` (issue 12), `plane` kept.
    current = env["current_deployment"]
    assert (current["id"], current["model_id"], current["status"], current["plane"], current["region"]) == (
        "v4", "m1", "ACTIVE", "us-1", {"slug": "us", "display_name": "us"})  # fmt: skip
    assert env["candidate_deployment"] is None and env["in_progress_promotion"] is None
    assert env["canary"] is None and env["shadow"] is None
    assert env["backpressure"] == {"policy": "QUEUE_ON_FULL"}
    assert {"min_replica", "max_replica", "concurrency_target"} <= set(env["autoscaling_settings"])
    assert admin(gateway, "GET", "/v1/models/nope/environments")[0] == 404
    assert admin(gateway, "GET", env_path("nope"))[0] == 404


def test_admin_calls_need_the_admin_token(gateway: GatewayProcess) -> None:
    assert admin(gateway, "GET", env_path(), token=None)[0] == 401
    assert admin(gateway, "POST", env_path(), {"name": "x1"}, token="wrong")[0] == 401
    assert admin(gateway, "GET", env_path())[0] == 200


def test_create_validates_names_and_refuses_existing_ones(gateway: GatewayProcess) -> None:
    for name, code in [("Bad_Name", 400), ("-x", 400), ("a" * 41, 400), ("development", 400),
                       ("production", 409), ("staging", 409)]:  # fmt: skip
        status, body = admin(gateway, "POST", env_path(), {"name": name})
        assert (status, body["error_code"]) == (code, "client_error"), (name, body)
    assert admin(gateway, "POST", env_path(), {})[0] == 400
    assert admin(gateway, "POST", env_path(), {"name": "qa", "colour": "red"})[0] == 400
    status, body = admin(gateway, "POST", env_path(), {"name": "qa", "autoscaling_settings": {"max_replica": 0}})
    assert status == 400 and "autoscaling.max_replica" in body["problems"][0]

    status, env = admin(gateway, "POST", env_path(), {"name": "qa", "autoscaling_settings": {"max_replica": 5}})
    assert status == 200  # the SDK accepts no other (issue 12)
    assert env["name"] == "qa" and env["current_deployment"] is None
    assert env["autoscaling_settings"]["max_replica"] == 5
    status, body = call(gateway, "qa")
    assert status == 404 and "no deployment yet" in body["error"]
    assert admin(gateway, "POST", env_path(), {"name": "qa"})[0] == 409


def test_patch_sets_and_removes_canary_and_shadow(gateway: GatewayProcess) -> None:
    status, env = admin(gateway, "PATCH", env_path("staging"), {"canary": {"deployment": "v2", "percent": 50},
                                                                "backpressure": {"policy": "REJECT_ON_FULL"}})  # fmt: skip
    assert status == 200, env
    assert env["canary"] == {"deployment": "v2", "percent": 50.0}
    assert env["backpressure"] == {"policy": "REJECT_ON_FULL"}
    answered = Counter(split(gateway, "staging", [f"user-{i}" for i in range(200)]).values())
    assert set(answered) == {"v2", "v4"}
    status, env = admin(gateway, "PATCH", env_path("staging"), {"canary": None})
    assert status == 200 and env["canary"] is None
    assert set(split(gateway, "staging", [f"user-{i}" for i in range(50)]).values()) == {"v4"}

    # Refused changes name the problem by its path and change nothing.
    status, body = admin(gateway, "PATCH", env_path("staging"), {"canary": {"deployment": "v9", "percent": 5}})
    assert status == 400 and "staging.canary.deployment: unknown deployment 'v9'" in body["problems"][0]
    status, body = admin(gateway, "PATCH", env_path("prod-us"), {"shadow": {"deployment": "v3", "percent": 5}})
    assert status == 400 and "pinned to region 'us'" in body["error"]
    assert admin(gateway, "PATCH", env_path("staging"), {"autoscaling_settings": None})[0] == 400
    assert admin(gateway, "PATCH", env_path("staging"), {"weight": 3})[0] == 400
    assert admin(gateway, "PATCH", env_path("nope"), {"canary": None})[0] == 404
    assert admin(gateway, "GET", env_path("prod-us"))[1]["shadow"] is None


def test_delete_then_calls_get_404_and_production_cannot_go(gateway: GatewayProcess) -> None:
    status, body = admin(gateway, "DELETE", env_path("production"))
    assert (status, body["error_code"]) == (400, "client_error")
    assert call(gateway, "staging")[0] == 200
    status, body = admin(gateway, "DELETE", env_path("staging"))
    assert (status, body) == (200, {"name": "staging", "model_id": "m1", "deleted": True})
    status, body = call(gateway, "staging")
    assert (status, body["error_code"]) == (404, "model_does_not_exist")
    assert admin(gateway, "DELETE", env_path("staging"))[0] == 404
    # A deleted name (also one deleted in the file) can be created again, empty.
    for name in ("staging", "old"):
        status, env = admin(gateway, "POST", env_path(), {"name": name})
        assert status == 200 and env["current_deployment"] is None


# -- promotions ----------------------------------------------------------------------------------


def test_immediate_promotion_switches_and_demotes_the_previous_deployment(gateway: GatewayProcess) -> None:
    status, dep = admin(gateway, "POST", env_path("staging", "promote"), {"deployment_id": "v2"})
    assert (status, dep["id"]) == (200, "v2"), dep  # the SDK's answer: the promoted deployment (issue 12)
    assert promotion(gateway, "staging")["in_progress_promotion"]["status"] in ("RELEASING", "SUCCEEDED")
    view = wait_status(gateway, "staging", "SUCCEEDED")
    assert view["in_progress_promotion"] == {"status": "SUCCEEDED", "percent_traffic_to_new_version": 100,
                                             "error_message": None, "rolling_deploy": False}  # fmt: skip
    assert view["current_deployment"]["id"] == "v2" and view["candidate_deployment"] is None
    assert call(gateway, "staging")[1]["deployment"] == "v2"
    status, routing = admin(gateway, "GET", "/v1/routing")
    assert routing["admin_revision"] >= 2 and routing["digest"] != routing["file_digest"]
    # v4 served only staging: demoted to scaled_to_zero.
    # (GET of a deployment answers the SDK's Deployment, status spelled SCALED_TO_ZERO: issue 12)
    status, dep = admin(gateway, "GET", "/v1/models/m1/deployments/v4")
    assert (status, dep["id"], dep["status"], dep["plane"], dep["region"]) == (
        200, "v4", "SCALED_TO_ZERO", "us-1", {"slug": "us", "display_name": "us"})  # fmt: skip
    # v1 serves production and prod-us: promoting v2 into production does not demote it.
    status, body = admin(gateway, "POST", env_path("production", "promote"), {"deployment_id": "v2"})
    assert status == 200
    wait_status(gateway, "production", "SUCCEEDED")
    assert call(gateway, "prod-us")[1]["deployment"] == "v1"


def test_promote_refusals(gateway: GatewayProcess) -> None:
    cases = [
        ("staging", {"deployment_id": "v6"}, 400, "inactive"),
        ("staging", {"deployment_id": "v4"}, 400, "already serves"),
        ("prod-us", {"deployment_id": "v3"}, 400, "region"),
        ("staging", {"deployment_id": "v9"}, 404, "not found"),
        ("nope", {"deployment_id": "v2"}, 404, "not found"),
        ("staging", {}, 400, "deployment_id"),
        ("staging", {"deployment_id": "v2", "ramp_up_duration_seconds": -1}, 400, "ramp_up_duration_seconds"),
        ("staging", {"deployment_id": "v2", "rollback": {"max_5xx_percent": 5, "window_seconds": 5}}, 400, "ramp"),
        ("staging", {"deployment_id": "v2", "smoke_check": {"path": "predict"}}, 400, "smoke_check.path"),
    ]
    for env, body, code, text in cases:
        status, answer = admin(gateway, "POST", env_path(env, "promote"), body)
        assert status == code and text in answer["error"], (env, body, answer)
    assert admin(gateway, "GET", env_path("staging"))[1]["in_progress_promotion"] is None


def test_a_ramp_goes_through_ten_stages_and_splits_traffic_sticky(gateway: GatewayProcess) -> None:
    status, _ = admin(gateway, "POST", env_path("staging", "promote"),
                      {"deployment_id": "v2", "ramp_up_duration_seconds": 3})  # fmt: skip
    assert status == 200
    seen: list[int] = []
    states: set[str] = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        p = promotion(gateway, "staging")["in_progress_promotion"]
        states.add(p["status"])
        if p["status"] == "RAMPING_UP" and (not seen or seen[-1] != p["percent_traffic_to_new_version"]):
            seen.append(p["percent_traffic_to_new_version"])
        if p["status"] == "SUCCEEDED":
            break
        time.sleep(0.02)
    assert states <= {"RELEASING", "RAMPING_UP", "SUCCEEDED"} and "SUCCEEDED" in states
    assert seen == sorted(seen) and set(seen) <= set(range(10, 101, 10))
    assert len(seen) >= 8, seen  # stage by stage (polling may miss a stage on a busy machine)
    assert promotion(gateway, "staging")["current_deployment"]["id"] == "v2"


def test_pause_resume_and_the_split_at_a_paused_stage(gateway: GatewayProcess) -> None:
    admin(gateway, "POST", env_path("staging", "promote"), {"deployment_id": "v2", "ramp_up_duration_seconds": 20})
    wait_for(lambda: promotion(gateway, "staging")["in_progress_promotion"]["percent_traffic_to_new_version"] >= 20,
             "the ramp to reach 20%")  # fmt: skip
    status, view = admin(gateway, "POST", env_path("staging", "pause_promotion"))
    assert status == 200 and view["in_progress_promotion"]["status"] == "PAUSED"
    assert view["candidate_deployment"]["id"] == "v2"
    percent = view["in_progress_promotion"]["percent_traffic_to_new_version"]
    assert admin(gateway, "POST", env_path("staging", "pause_promotion"))[0] == 409
    assert admin(gateway, "POST", env_path("staging", "promote"), {"deployment_id": "v1"})[0] == 409

    keys = [f"caller-{i}" for i in range(2000)]
    first = split(gateway, "staging", keys)
    share = sum(1 for d in first.values() if d == "v2") / len(keys)
    tolerance = 4 * (percent / 100 * (1 - percent / 100) / len(keys)) ** 0.5  # 4 sigma
    assert abs(share - percent / 100) < tolerance, (share, percent)
    assert split(gateway, "staging", keys[:300]) == {k: first[k] for k in keys[:300]}  # sticky
    assert promotion(gateway, "staging")["in_progress_promotion"]["percent_traffic_to_new_version"] == percent

    status, view = admin(gateway, "POST", env_path("staging", "resume_promotion"))
    assert status == 200 and view["in_progress_promotion"]["status"] == "RAMPING_UP"
    wait_for(lambda: promotion(gateway, "staging")["in_progress_promotion"]["percent_traffic_to_new_version"]
             > percent, "the ramp to go on")  # fmt: skip
    # Callers already on the candidate stay there as it grows.
    again = split(gateway, "staging", keys[:300])
    assert all(again[k] == "v2" for k in keys[:300] if first[k] == "v2")


def test_cancel_ramps_down_and_keeps_the_current_deployment(gateway: GatewayProcess) -> None:
    admin(gateway, "POST", env_path("staging", "promote"), {"deployment_id": "v2", "ramp_up_duration_seconds": 4})
    wait_for(lambda: promotion(gateway, "staging")["in_progress_promotion"]["percent_traffic_to_new_version"] >= 30,
             "the ramp to reach 30%")  # fmt: skip
    status, view = admin(gateway, "POST", env_path("staging", "cancel_promotion"))
    assert status == 200 and view["in_progress_promotion"]["status"] == "RAMPING_DOWN"
    view = wait_status(gateway, "staging", "CANCELED")
    assert view["in_progress_promotion"]["percent_traffic_to_new_version"] == 0
    assert view["current_deployment"]["id"] == "v4" and view["candidate_deployment"] is None
    assert set(split(gateway, "staging", [f"u{i}" for i in range(100)]).values()) == {"v4"}
    assert admin(gateway, "POST", env_path("staging", "cancel_promotion"))[0] == 409
    assert admin(gateway, "POST", env_path("staging", "resume_promotion"))[0] == 409


def test_concurrent_promote_calls_exactly_one_wins(gateway: GatewayProcess) -> None:
    results: list[int] = []
    barrier = threading.Barrier(8)

    def go(dep: str) -> None:
        barrier.wait()
        results.append(admin(gateway, "POST", env_path("staging", "promote"),
                             {"deployment_id": dep, "ramp_up_duration_seconds": 30})[0])  # fmt: skip

    threads = [threading.Thread(target=go, args=("v2" if i % 2 else "v1",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [200] + [409] * 7
    admin(gateway, "POST", env_path("staging", "cancel_promotion"))


def test_smoke_check_failure_fails_the_promotion_before_any_traffic_moves(
    gateway: GatewayProcess, planes: tuple[TestPlane, TestPlane]
) -> None:
    us, _ = planes
    us.fail_deployments.add("v2")
    status, _ = admin(gateway, "POST", env_path("staging", "promote"), {
        "deployment_id": "v2", "ramp_up_duration_seconds": 2,
        "smoke_check": {"path": "/predict", "body": {"prompt": "hi"}, "expected_status": 200},
    })  # fmt: skip
    assert status == 200
    view = wait_status(gateway, "staging", "FAILED")
    message = view["in_progress_promotion"]["error_message"]
    assert "smoke check POST /predict" in message and "answered 500, expected 200" in message
    assert view["current_deployment"]["id"] == "v4"
    assert view["in_progress_promotion"]["percent_traffic_to_new_version"] == 0
    assert us.calls["v2"] == 1  # the smoke request only
    assert set(split(gateway, "staging", [f"u{i}" for i in range(50)]).values()) == {"v4"}
    # The smoke check passes once the candidate is healthy.
    us.fail_deployments.clear()
    admin(gateway, "POST", env_path("staging", "promote"),
          {"deployment_id": "v2", "smoke_check": {"path": "/predict", "expected_status": 200}})  # fmt: skip
    assert wait_status(gateway, "staging", "SUCCEEDED")["current_deployment"]["id"] == "v2"


def test_automatic_rollback_when_the_candidate_fails(
    gateway: GatewayProcess, planes: tuple[TestPlane, TestPlane]
) -> None:
    us, _ = planes
    us.fail_deployments.add("v2")
    status, _ = admin(gateway, "POST", env_path("staging", "promote"), {
        "deployment_id": "v2", "ramp_up_duration_seconds": 60,
        "rollback": {"max_5xx_percent": 20, "window_seconds": 10, "min_calls": 5},
    })  # fmt: skip
    assert status == 200
    wait_status(gateway, "staging", "RAMPING_UP")
    stop = threading.Event()

    def traffic() -> None:
        i = 0
        while not stop.is_set():
            call(gateway, "staging", f"load-{i % 500}")
            i += 1

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        view = wait_status(gateway, "staging", "FAILED")
    finally:
        stop.set()
        worker.join()
    message = view["in_progress_promotion"]["error_message"]
    assert message.startswith("automatic rollback") and "5xx" in message
    assert view["in_progress_promotion"]["percent_traffic_to_new_version"] == 0
    assert view["current_deployment"]["id"] == "v4"
    assert set(split(gateway, "staging", [f"load-{i}" for i in range(500)]).values()) == {"v4"}
    status, metrics = 200, urllib.request.urlopen(gateway.admin_url + "/metrics").read().decode()
    assert 'gateway_promotion_state{model="m1",environment="staging",state="FAILED"} 1' in metrics
    assert 'gateway_promotion_traffic_percent{model="m1",environment="staging",deployment="v2"} 0' in metrics


def test_a_scaled_to_zero_candidate_is_woken_and_traffic_waits_for_it(
    gateway: GatewayProcess, planes: tuple[TestPlane, TestPlane]
) -> None:
    us, _ = planes
    admin(gateway, "POST", env_path("staging", "promote"), {"deployment_id": "v5"})
    wake = wait_for(lambda: us.wakes, "the plane to be asked to wake v5")
    assert wake[0]["x-baseten-deployment-id"] == "v5" and wake[0]["x-baseten-model-id"] == "m1"  # type: ignore[index]
    view = promotion(gateway, "staging")
    assert view["in_progress_promotion"]["status"] == "RELEASING" and view["candidate_deployment"]["id"] == "v5"
    assert call(gateway, "staging")[1]["deployment"] == "v4"  # traffic waits
    # The plane reports the deployment awake (the admin call a plane controller would make).
    status, body = admin(gateway, "POST", "/v1/models/m1/deployments/v5/activate")
    assert (status, body["status"]) == (200, "active")
    assert wait_status(gateway, "staging", "SUCCEEDED")["current_deployment"]["id"] == "v5"
    assert call(gateway, "staging")[1]["deployment"] == "v5"


def test_deactivate_is_the_kill_switch_even_for_a_deployment_in_use(gateway: GatewayProcess) -> None:
    # Allowed since issue 12 (the platform allows it): its calls then get 503, never another deployment.
    status, body = admin(gateway, "POST", "/v1/models/m1/deployments/v1/deactivate")
    assert (status, body["status"], body["success"], body["no_op"]) == (200, "inactive", True, False), body
    status, body = call(gateway, "production")
    assert (status, body["error_code"]) == (503, "model_unavailable") and "'v1' is inactive" in body["error"]
    assert admin(gateway, "POST", "/v1/models/m1/deployments/v1/deactivate")[1]["no_op"] is True
    assert admin(gateway, "POST", "/v1/models/m1/deployments/production/activate")[1]["id"] == "v1"  # the literal
    assert call(gateway, "production")[1]["deployment"] == "v1"
    status, body = admin(gateway, "POST", "/v1/models/m1/deployments/v2/deactivate")
    assert (status, body["status"]) == (200, "inactive")
    status, body = admin(gateway, "POST", env_path("staging", "promote"), {"deployment_id": "v2"})
    assert status == 400 and "inactive" in body["error"]
    assert admin(gateway, "POST", "/v1/models/m1/deployments/v9/activate")[0] == 404
    assert admin(gateway, "POST", "/v1/models/m1/deployments/development/activate")[0] == 404  # m1 has none
    assert admin(gateway, "GET", "/v1/models/m1/deployments/v2/activate")[0] == 405
    assert admin(gateway, "GET", "/v1/models/m1/deployments/v9")[0] == 404
    assert admin(gateway, "GET", "/v1/models/m1/deployments/v6")[1]["status"] == "INACTIVE"  # the SDK's spelling


# -- persistence and the table file ---------------------------------------------------------------


def test_admin_changes_survive_a_restart_and_a_paused_ramp_resumes(tmp_path: Path, gateway: GatewayProcess) -> None:
    admin(gateway, "POST", env_path(), {"name": "qa"})
    admin(gateway, "POST", env_path("qa", "promote"), {"deployment_id": "v2"})
    wait_status(gateway, "qa", "SUCCEEDED")
    admin(gateway, "DELETE", env_path("staging"))
    admin(gateway, "PATCH", env_path("production"), {"canary": {"deployment": "v2", "percent": 25}})
    admin(gateway, "POST", env_path("prod-us", "promote"), {"deployment_id": "v2", "ramp_up_duration_seconds": 30})
    wait_for(lambda: promotion(gateway, "prod-us")["in_progress_promotion"]["percent_traffic_to_new_version"] >= 10,
             "the ramp to start")  # fmt: skip
    paused = admin(gateway, "POST", env_path("prod-us", "pause_promotion"))[1]["in_progress_promotion"]
    before = admin(gateway, "GET", "/v1/routing")[1]
    assert gateway.stop() == 0

    again = GatewayProcess(gateway.config, "--admin-token", TOKEN).start()
    try:
        after = admin(again, "GET", "/v1/routing")[1]
        assert after["digest"] == before["digest"] and after["admin_revision"] == before["admin_revision"]
        assert call(again, "qa")[1]["deployment"] == "v2"
        assert call(again, "staging")[0] == 404
        assert admin(again, "GET", env_path("production"))[1]["canary"] == {"deployment": "v2", "percent": 25.0}
        assert promotion(again, "prod-us")["in_progress_promotion"] == paused
        admin(again, "POST", env_path("prod-us", "resume_promotion"))
        assert admin(again, "POST", env_path("prod-us", "cancel_promotion"))[0] == 200
        wait_status(again, "prod-us", "CANCELED")
    finally:
        again.stop()


def test_file_reloads_keep_admin_changes_and_conflicts_are_refused(
    gateway: GatewayProcess, planes: tuple[TestPlane, TestPlane]
) -> None:
    us, eu = planes
    admin(gateway, "POST", env_path("staging", "promote"), {"deployment_id": "v2"})
    wait_status(gateway, "staging", "SUCCEEDED")
    doc = table_doc(us.url, eu.url)
    doc["models"]["m1"]["deployments"]["v7"] = {"plane": "us-1"}
    doc["models"]["m1"]["environments"]["production"] = {"deployment": "v7"}
    write_table(gateway.config, doc)
    status, body = admin(gateway, "POST", "/v1/routing/reload")
    assert status == 200 and body["ok"] and body["changed"]
    assert call(gateway, "production")[1]["deployment"] == "v7"  # the file's change
    assert call(gateway, "staging")[1]["deployment"] == "v2"  # the admin's change still wins
    # A file that drops a deployment the admin changes use is refused, and the last good table serves on.
    del doc["models"]["m1"]["deployments"]["v2"]
    write_table(gateway.config, doc)
    status, body = admin(gateway, "POST", "/v1/routing/reload")
    assert status == 422 and any("unknown deployment 'v2'" in p for p in body["problems"])
    assert call(gateway, "staging")[1]["deployment"] == "v2"


def test_explain_and_serve_use_the_admin_store(gateway: GatewayProcess) -> None:
    import subprocess
    import sys

    admin(gateway, "POST", env_path("staging", "promote"), {"deployment_id": "v2"})
    wait_status(gateway, "staging", "SUCCEEDED")
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "explain", "--config", str(gateway.config),
         f"http://{HOST}/environments/staging/predict", "-H", f"Authorization: Api-Key {KEY}"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert out.returncode == 0 and "deployment:   v2" in out.stdout, out.stdout + out.stderr
    store = Path(str(gateway.config) + ".admin.json")
    assert json.loads(store.read_text())["models"]["m1"]["environments"]["staging"]["set"] == {"deployment": "v2"}


def test_a_change_based_on_a_stale_store_revision_is_a_409_and_a_retry_wins(gateway: GatewayProcess) -> None:
    assert admin(gateway, "PATCH", env_path("staging"), {"canary": {"deployment": "v2", "percent": 10}})[0] == 200
    revision = admin(gateway, "GET", "/v1/routing")[1]["admin_revision"]
    store = Path(str(gateway.config) + ".admin.json")
    doc = json.loads(store.read_text())
    doc["revision"] = revision + 1  # another writer of the same store moved it on
    doc["models"]["m1"]["environments"]["staging"]["set"]["canary"] = {"deployment": "v2", "percent": 30}
    store.write_text(json.dumps(doc))
    status, body = admin(gateway, "PATCH", env_path("staging"), {"canary": {"deployment": "v2", "percent": 20}})
    assert status == 409 and body["error_code"] == "client_error", body
    assert f"at revision {revision + 1}, but this change was based on revision {revision}" in body["error"]
    assert admin(gateway, "GET", env_path("staging"))[1]["canary"] == {"deployment": "v2", "percent": 30.0}
    status, body = admin(gateway, "PATCH", env_path("staging"), {"canary": {"deployment": "v2", "percent": 20}})
    assert status == 200 and body["canary"] == {"deployment": "v2", "percent": 20.0}
    assert admin(gateway, "GET", "/v1/routing")[1]["admin_revision"] == revision + 2


def test_with_workers_the_supervisor_runs_the_api_and_every_worker_follows(
    tmp_path: Path, planes: tuple[TestPlane, TestPlane]
) -> None:
    us, eu = planes
    config = write_table(tmp_path / "table.yaml", table_doc(us.url, eu.url))
    gw = GatewayProcess(config, "--admin-token", TOKEN, "--workers", "2").start()
    try:
        status, _ = admin(gw, "POST", env_path("staging", "promote"),
                          {"deployment_id": "v2", "ramp_up_duration_seconds": 1})  # fmt: skip
        assert status == 200
        wait_status(gw, "staging", "SUCCEEDED")
        # Both workers serve the promoted deployment (each connection may land on either worker).
        wait_for(lambda: set(split(gw, "staging", [f"w{i}" for i in range(60)]).values()) == {"v2"},
                 "every worker to serve v2")  # fmt: skip
        routing = admin(gw, "GET", "/v1/routing")[1]
        wait_for(lambda: {w["digest"] for w in admin(gw, "GET", "/v1/routing")[1]["workers"]} == {routing["digest"]},
                 "both workers to report the composed table")  # fmt: skip
        metrics = urllib.request.urlopen(gw.admin_url + "/metrics").read().decode()
        assert 'gateway_promotion_state{model="m1",environment="staging",state="SUCCEEDED"} 1' in metrics
        assert 'gateway_promotion_traffic_percent{model="m1",environment="staging",deployment="v2"} 100' in metrics
    finally:
        assert gw.stop() == 0
