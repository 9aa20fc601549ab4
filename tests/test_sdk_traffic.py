"""Traffic routing rules through the platform's SDK (issue 12): shadow rules created, replaced and
deleted by id with `patch_models_environments(traffic_routing_settings=...)`, seen on live traffic.

The planes answer with the deployment they were addressed to and count the shadow copies they get
(`x-baseten-shadow: 1`) per deployment, so a test sees where copies went. Nothing asserts on time:
an expiry is waited out with a bounded poll, and "no copy after the expiry" is read once a second
rule's copies of the same calls have all arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import socket
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web
from baseten.client import ManagementClient
from baseten.client.managementapi import (
    ResponseError,
    TrafficRoutingRuleUpsert,
    TrafficRoutingTargetUpsert,
    UpdateEnvironmentRequest,
    UpdateTrafficRoutingSettings,
)

from gateway.environments.traffic_rules import compose_rules, rules_after
from gateway.errors import InvalidChange
from gateway.http.shadow import picked
from gateway.routing.loader import compile_table
from gateway.routing.model import Table
from tests.support import GatewayProcess, wait_for, write_table
from tests.test_environments import AUTH, HOST, TestPlane, table_doc
from tests.test_sdk_management import predict as sdk_predict

TOKEN = "sdk-traffic-secret"
Live = tuple[GatewayProcess, ManagementClient, "ShadowPlane"]
SLOW_SECONDS = 3.0


class ShadowPlane(TestPlane):
    """A TestPlane that also counts shadow copies per deployment; `slow` deployments answer late."""

    __test__ = False

    def __init__(self) -> None:
        self.copies: Counter[str] = Counter()
        self.environments: Counter[tuple[str, str]] = Counter()
        self.slow: set[str] = set()
        self.arrived: Counter[str] = Counter()
        super().__init__()

    async def handle(self, request: web.Request) -> web.Response:
        dep = request.headers.get("x-baseten-deployment-id", "")
        if request.headers.get("x-baseten-shadow") == "1":
            await request.read()
            self.copies[dep] += 1
            self.environments[
                (request.headers.get("x-baseten-model-id", ""), request.headers.get("x-baseten-environment", ""))
            ] += 1
        self.arrived[dep] += 1
        if dep in self.slow:
            await asyncio.sleep(SLOW_SECONDS)
        return await super().handle(request)


def traffic_doc(us: str, eu: str) -> dict:
    doc = table_doc(us, eu)
    doc["teams"]["globex"] = {}
    doc["models"]["m2"] = {"team": "acme", "deployments": {"w1": {"plane": "us-1"}, "w2": {"plane": "eu-1"}},
                           "environments": {"production": {"deployment": "w1"}, "canary": {"deployment": "w2"}}}  # fmt: skip
    doc["models"]["m3"] = {"team": "globex", "deployments": {"g1": {"plane": "us-1"}},
                           "environments": {"production": {"deployment": "g1"}}}  # fmt: skip
    return doc


def in_seconds(seconds: float) -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds)


def shadow(target: dict, percent: int = 100, expires: float = 3600, rule_id: str | None = None, **kw: object) -> dict:
    """A TrafficRoutingRuleUpsert as the SDK sends it (raw JSON, for the pure tests and the extension)."""
    rule = {"type": "SHADOW", "targets": [target], "percent_traffic": percent,
            "expires_at": in_seconds(expires).isoformat(), "sampling_mode": "RANDOM",
            "propagate_client_cancellation": False, **kw}  # fmt: skip
    if rule_id is not None:
        rule["id"] = rule_id
    return rule


def sdk_rule(
    percent: int = 100, expires: float = 3600, rule_id: str | None = None, propagate: bool = False, **target: str
) -> TrafficRoutingRuleUpsert:
    return TrafficRoutingRuleUpsert(
        id=rule_id, type="SHADOW", targets=[TrafficRoutingTargetUpsert(**target)], percent_traffic=percent,
        expires_at=in_seconds(expires), sampling_mode="RANDOM", propagate_client_cancellation=propagate,
    )  # fmt: skip


# -- pure: the body's rules, the composed table, the sampling ------------------------------------


def table() -> Table:
    return compile_table(traffic_doc("http://127.0.0.1:9", "http://127.0.0.1:9"))


def apply(update: dict, env: str = "staging", stored: list | None = None, model: str = "m1") -> list[dict]:
    t = table()
    ids = iter(f"r{i}" for i in range(100))
    return rules_after(stored or [], update, t.models, t.models[model], env, time.time(), lambda: next(ids))


def test_rules_resolve_targets_within_the_team() -> None:
    rules = apply({"rules": [shadow({"deployment_id": "v2"}), shadow({"deployment_id": "w1"}),
                             shadow({"environment": "production"}),
                             shadow({"environment": "canary", "model_id": "m2"})]})  # fmt: skip
    assert [(r["id"], r["target"]) for r in rules] == [
        ("r0", {"model_id": "m1", "deployment_id": "v2", "environment": None}),
        ("r1", {"model_id": "m2", "deployment_id": "w1", "environment": None}),  # the team's one model with w1
        ("r2", {"model_id": "m1", "deployment_id": None, "environment": "production"}),
        ("r3", {"model_id": "m2", "deployment_id": None, "environment": "canary"}),
    ]
    assert rules[0]["expires_at"].endswith("Z")


def test_replace_keeps_the_id_and_deletes_come_first() -> None:
    stored = apply({"rules": [shadow({"deployment_id": "v2"}), shadow({"deployment_id": "v1"})]})
    after = apply({"delete_rules": ["r1"], "rules": [shadow({"deployment_id": "v2"}, 40, rule_id="r0")]}, stored=stored)
    assert [(r["id"], r["percent_traffic"]) for r in after] == [("r0", 40)]
    assert apply({"delete_rules": ["r0"]}, stored=after) == []
    expired = [{**after[0], "expires_at": "2020-01-01T00:00:00Z"}]
    assert apply({}, stored=expired) == []  # an expired rule is dropped at the next write


@pytest.mark.parametrize(
    ("update", "problem"),
    [
        ({"rules": [shadow({"deployment_id": "g1"})]}, "rules[0].targets[0].deployment_id: no model of team 'acme'"),
        ({"rules": [shadow({"deployment_id": "g1", "model_id": "m3"})]}, "belongs to another team ('globex')"),
        ({"rules": [shadow({"deployment_id": "v9"})]}, "no model of team 'acme' has deployment 'v9'"),
        ({"rules": [shadow({"environment": "nope"})]}, "model 'm1' has no environment 'nope'"),
        ({"rules": [shadow({"environment": "staging"})]}, "cannot copy an environment's traffic to itself"),
        ({"rules": [shadow({"deployment_id": "v2", "environment": "production"})]}, "exactly one of"),
        ({"rules": [shadow({"deployment_id": "v2"}, 0)]}, "rules[0].percent_traffic: a whole number from 1 to 100"),
        ({"rules": [shadow({"deployment_id": "v2"}, expires=8 * 86400)]}, "at most 7 days out"),
        ({"rules": [shadow({"deployment_id": "v2"}, expires=-5)]}, "must be in the future"),
        ({"rules": [shadow({"deployment_id": "v2"}, expires_at="2030-01-01T00:00:00")]}, "with a timezone"),
        ({"rules": [shadow({"deployment_id": "v2"}, sampling_mode="STICKY")]}, "RANDOM, USER_SESSION"),
        ({"rules": [shadow({"deployment_id": "v2"}, rule_id="zz")]}, "no rule 'zz' to replace"),
        ({"delete_rules": ["zz"]}, "delete_rules[0]: no rule 'zz'"),
        ({"rules": [{"type": "SHADOW"}]}, "rules[0].expires_at: required"),
        ({"rulez": []}, "traffic_routing_settings.rulez: unknown field"),
    ],
)
def test_rules_refuse_with_problems_by_path(update: dict, problem: str) -> None:
    with pytest.raises(InvalidChange) as refused:
        apply(update)
    assert any(problem in p for p in refused.value.problems), refused.value.problems


def test_a_replace_cannot_change_the_target() -> None:
    stored = apply({"rules": [shadow({"deployment_id": "v2"})]})
    with pytest.raises(InvalidChange) as refused:
        apply({"rules": [shadow({"deployment_id": "v1"}, rule_id="r0")]}, stored=stored)
    assert "cannot change the target" in refused.value.problems[0]


def test_composed_rules_keep_a_regional_environment_in_its_region() -> None:
    t = table()
    model = t.models["m1"]
    (rule,) = apply({"rules": [shadow({"deployment_id": "v3"})]}, env="prod-us")
    problems: list[str] = []
    env = compose_rules(t.models, model, model.environments["prod-us"], [rule], problems)
    assert problems == [
        "admin store: models.m1.environments.prod-us.traffic_routing.r0: target deployment 'v3' runs in region 'eu', "
        "but environment 'prod-us' is pinned to region 'us': its copies never leave its region"
    ]
    (rule,) = apply({"rules": [shadow({"environment": "production", "model_id": "m2"})]}, env="prod-us")
    env = compose_rules(t.models, model, model.environments["prod-us"], [rule], problems := [])
    assert problems == [] and env.shadow_rules[0].shadow is not None
    assert env.shadow_rules[0].shadow.deployment.id == "w1"  # an environment target follows its deployment


def test_user_session_sampling_is_sticky_per_caller_and_expiry_stops_a_rule() -> None:
    t = table()
    model = t.models["m1"]
    stored = apply({"rules": [shadow({"deployment_id": "v2"}, 50, sampling_mode="USER_SESSION")]})
    env = compose_rules(t.models, model, model.environments["staging"], stored, [])
    now = time.time()
    chosen = {caller: bool(picked(env, "m1", caller, now)) for caller in (f"user-{i}" for i in range(400))}
    assert all(bool(picked(env, "m1", caller, now)) == copied for caller, copied in chosen.items())
    assert 120 < sum(chosen.values()) < 280  # about half the callers, each always the same way
    expires = env.shadow_rules[0].shadow.expires_at  # type: ignore[union-attr]
    assert all(not picked(env, "m1", caller, expires) for caller in chosen)  # at its expires_at it stops


# -- the real SDK against a running gateway ------------------------------------------------------


@contextlib.contextmanager
def sdk_gateway(config: Path, doc: Callable[[str, str], dict], token: str) -> Iterator[Live]:
    """A gateway in front of two ShadowPlanes (us, eu) and an SDK client of its admin listener."""
    us, eu = ShadowPlane(), ShadowPlane()
    gw = GatewayProcess(write_table(config, doc(us.url, eu.url)), "--admin-token", token)
    gw.start()
    try:
        with ManagementClient(api_key=token, base_url_override=gw.admin_url) as sdk:
            yield gw, sdk, us
    finally:
        gw.stop()
        us.stop()
        eu.stop()


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    with sdk_gateway(tmp_path / "table.yaml", traffic_doc, TOKEN) as running:
        yield running


def predict(gw: GatewayProcess, env: str) -> str | None:
    """A call through the public listener: the deployment that answered it (200 expected)."""
    status, dep = sdk_predict(gw, env)
    assert status == 200, status
    return dep


def patch_rules(sdk: ManagementClient, env: str, settings: UpdateTrafficRoutingSettings):  # noqa: ANN201
    request = UpdateEnvironmentRequest(traffic_routing_settings=settings)
    return sdk.api.patch_models_environments(model_id="m1", env_name=env, request=request).environment


def test_sdk_shadow_rules_send_copies_until_they_expire(
    live: Live,
) -> None:
    gw, sdk, us = live
    short = sdk_rule(deployment_id="v2", expires=4)
    env = patch_rules(sdk, "staging", UpdateTrafficRoutingSettings(rules=[short, sdk_rule(deployment_id="w1")]))
    rules = env.traffic_routing.rules  # type: ignore[union-attr]
    assert [(r.type, r.targets[0].model_id, r.targets[0].deployment_id, r.percent_traffic) for r in rules] == [
        ("SHADOW", "m1", "v2", 100), ("SHADOW", "m2", "w1", 100)]  # fmt: skip
    assert rules[0].expires_at.tzinfo is not None and rules[0].sampling_mode == "RANDOM"
    assert [predict(gw, "staging") for _ in range(5)] == ["v4"] * 5  # the client's answers are the primary's
    wait_for(lambda: us.copies["v2"] == 5 and us.copies["w1"] == 5, "a copy of each call to each target")
    assert us.environments[("m2", "staging")] == 5  # a copy to another model names its own model
    wait_for(lambda: time.time() > rules[0].expires_at.timestamp(), "the short rule to expire", timeout=10)
    assert [predict(gw, "staging") for _ in range(5)] == ["v4"] * 5
    wait_for(lambda: us.copies["w1"] == 10, "the remaining rule's copies of the later calls")
    assert us.copies["v2"] == 5  # the expired rule sent none of them, with no reload
    env = sdk.api.get_models_environments_env_name(model_id="m1", env_name="staging")
    assert [r.id for r in env.traffic_routing.rules] == [rules[1].id]  # type: ignore[union-attr]


def test_sdk_replaces_and_deletes_rules_by_id(live: Live) -> None:
    gw, sdk, us = live
    env = patch_rules(sdk, "staging", UpdateTrafficRoutingSettings(rules=[sdk_rule(environment="production")]))
    (rule,) = env.traffic_routing.rules  # type: ignore[union-attr]
    assert (rule.targets[0].environment, rule.targets[0].deployment_id) == ("production", None)
    predict(gw, "staging")
    wait_for(lambda: us.copies["v1"] == 1 and us.environments[("m1", "production")] == 1, "a copy to production")
    replaced = patch_rules(
        sdk, "staging", UpdateTrafficRoutingSettings(rules=[sdk_rule(5, rule_id=rule.id, environment="production")])
    )
    assert [(r.id, r.percent_traffic) for r in replaced.traffic_routing.rules] == [(rule.id, 5)]  # type: ignore[union-attr]
    with pytest.raises(ResponseError) as moved:
        patch_rules(sdk, "staging", UpdateTrafficRoutingSettings(rules=[sdk_rule(rule_id=rule.id, deployment_id="v2")]))
    assert moved.value.status_code == 400 and "cannot change the target" in moved.value.body
    deleted = patch_rules(sdk, "staging", UpdateTrafficRoutingSettings(delete_rules=[rule.id]))
    assert deleted.traffic_routing is None
    with pytest.raises(ResponseError) as gone:
        patch_rules(sdk, "staging", UpdateTrafficRoutingSettings(delete_rules=[rule.id]))
    assert gone.value.status_code == 400 and "problems" in gone.value.body
    # An environment target of another model: the target names its model (beyond the SDK's upsert shape).
    status, body = gw.admin("PATCH", "/v1/models/m1/environments/staging", TOKEN, {"traffic_routing_settings": {
        "rules": [shadow({"environment": "production", "model_id": "m2"})]}})  # fmt: skip
    assert status == 200, body
    assert isinstance(body, dict) and body["traffic_routing"]["rules"][0]["targets"][0]["model_id"] == "m2"
    predict(gw, "staging")
    wait_for(lambda: us.environments[("m2", "production")] == 1, "a copy to m2's production (w1)")
    assert us.copies["w1"] == 1


def test_sdk_refuses_other_teams_and_other_regions(live: Live) -> None:
    gw, sdk, us = live
    for env, target, text in (("staging", {"deployment_id": "g1"}, "no model of team 'acme'"),
                              ("prod-us", {"deployment_id": "v3"}, "pinned to region 'us'"),
                              ("prod-us", {"environment": "canary", "model_id": "m2"}, "pinned to region 'us'")):  # fmt: skip
        status, body = gw.admin("PATCH", f"/v1/models/m1/environments/{env}", TOKEN,
                                {"traffic_routing_settings": {"rules": [shadow(target)]}})  # fmt: skip
        assert status == 400 and isinstance(body, dict) and any(text in p for p in body["problems"]), body
    with pytest.raises(ResponseError) as other_team:
        patch_rules(sdk, "staging", UpdateTrafficRoutingSettings(rules=[sdk_rule(deployment_id="g1")]))
    assert other_team.value.status_code == 400
    env = patch_rules(sdk, "prod-us", UpdateTrafficRoutingSettings(rules=[sdk_rule(deployment_id="v2")]))  # in-region
    assert env.traffic_routing is not None
    # The target environment may not later move the copies out of the region either.
    status, body = gw.admin("PATCH", "/v1/models/m1/environments/prod-us", TOKEN, {"traffic_routing_settings": {
        "rules": [shadow({"environment": "production", "model_id": "m2"})]}})  # fmt: skip
    assert status == 200, body
    status, body = gw.admin("POST", "/v1/models/m2/environments/production/promote", TOKEN, {"deployment_id": "w2"})
    assert status == 400 and "pinned to region 'us'" in str(body), body


def metric(gw: GatewayProcess, dep: str, outcome: str) -> float:
    text = urllib.request.urlopen(gw.admin_url + "/metrics", timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if (
            line.startswith("gateway_shadow_requests_total{")
            and f'deployment="{dep}"' in line
            and f'outcome="{outcome}"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def abandoned_call(gw: GatewayProcess, plane: ShadowPlane) -> None:
    """A call to staging whose client goes away once the (slow) primary and both copies reached the plane."""
    host, port = gw.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /environments/staging/predict HTTP/1.1\r\nHost: %s\r\nAuthorization: %s\r\n"
                     b"Content-Length: 2\r\n\r\n{}" % (HOST.encode(), AUTH["Authorization"].encode()))  # fmt: skip
        wait_for(lambda: plane.arrived["v4"] == 1 and plane.copies["v2"] == 1 and plane.copies["w1"] == 1,
                 "the call and its copies to reach the plane")  # fmt: skip


def test_sdk_propagate_client_cancellation(live: Live) -> None:
    gw, sdk, us = live
    us.slow |= {"v4", "v2", "w1"}  # staging's primary and both targets answer late
    follow = sdk_rule(deployment_id="v2", propagate=True)
    patch_rules(sdk, "staging", UpdateTrafficRoutingSettings(rules=[follow, sdk_rule(deployment_id="w1")]))
    abandoned_call(gw, us)
    wait_for(lambda: metric(gw, "v2", "cancelled") == 1, "the copy that follows the client to be cancelled")
    wait_for(lambda: metric(gw, "w1", "success") == 1, "the fire-and-forget copy to be answered")
    assert metric(gw, "v2", "success") == 0 and metric(gw, "w1", "cancelled") == 0


def test_with_workers_every_worker_sends_the_rules_copies(tmp_path: Path) -> None:
    us, eu = ShadowPlane(), ShadowPlane()
    gw = GatewayProcess(write_table(tmp_path / "table.yaml", traffic_doc(us.url, eu.url)), "--admin-token", TOKEN,
                        "--workers", "2").start()  # fmt: skip
    try:
        with ManagementClient(api_key=TOKEN, base_url_override=gw.admin_url) as sdk:
            env = patch_rules(sdk, "staging", UpdateTrafficRoutingSettings(rules=[sdk_rule(deployment_id="w1")]))
        assert env.traffic_routing is not None
        routing = gw.admin("GET", "/v1/routing", TOKEN)[1]
        assert isinstance(routing, dict)
        wait_for(lambda: {w["digest"] for w in gw.admin("GET", "/v1/routing", TOKEN)[1]["workers"]} == {routing["digest"]},  # type: ignore[index]
                 "both workers to serve the rule")  # fmt: skip
        assert [predict(gw, "staging") for _ in range(20)] == ["v4"] * 20  # a new connection each: both workers
        wait_for(lambda: us.copies["w1"] == 20, "a copy of every call, whichever worker served it")
    finally:
        assert gw.stop() == 0
        us.stop()
        eu.stop()
