"""Admin keys (team-wide and model-scoped management) and inference keys through the admin API (issue 12).

Pure layer: the authorisation decision, the admin caller behind a header, the table rules for
`admin_keys`, the admin-created keys composed into the table. Live layer: a gateway process with a
sample plane, where a key created through the admin API works on predict and a revoked one gets 401,
and the platform's SDK creates, lists and revokes keys unchanged.
"""

from __future__ import annotations

import copy
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from baseten.client import ManagementClient
from baseten.client.managementapi import APIKeyInfo, CreateAPIKeyRequest, ResponseError
from hypothesis import given
from hypothesis import strategies as st

from gateway.admin.access import OPERATOR, Access, Caller, admin_caller, decide
from gateway.admin.routes import ROUTES, match
from gateway.environments.keyset import key_document, new_key, with_admin_keys
from gateway.errors import EndpointNotFound, MethodNotAllowed, Unauthorized
from gateway.routing.loader import TableInvalid, compile_source, compile_table
from tests.support import GatewayProcess, loader_problems, running_gateway, sha, wait_for, write_table
from tests.test_environments import TestPlane

TOKEN = "keys-admin-secret"
TEAM_KEY = "acme-manager-key"
MODEL_KEY = "m1-manager-key"
TEAM = Caller("acme-ops", "acme")
M1 = Caller("m1-ops", "acme", frozenset({"m1"}))


def doc(url: str = "http://127.0.0.1:9") -> dict:
    model = {"deployments": {"v1": {"plane": "p"}}, "environments": {"production": {"deployment": "v1"}}}
    return {
        "version": 1,
        "domains": ["api.example.com"],
        "regions": {"us": {}},
        "planes": {"p": {"region": "us", "url": url}},
        "teams": {"acme": {}, "globex": {}},
        "api_keys": [{"name": "file-key", "team": "acme", "sha256": sha("file-key-secret")}],
        "admin_keys": [
            {"name": "acme-ops", "team": "acme", "sha256": sha(TEAM_KEY), "scope": "team"},
            {"name": "m1-ops", "team": "acme", "sha256": sha(MODEL_KEY), "scope": "model", "models": ["m1"]},
        ],
        "models": {
            "m1": {"team": "acme", **copy.deepcopy(model)},
            "m2": {"team": "acme", **copy.deepcopy(model)},
            "g1": {"team": "globex", **copy.deepcopy(model)},
        },
    }


# -- the decision, pure ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("caller", "access", "model", "allowed"),
    [
        (OPERATOR, Access.GATEWAY, None, True),
        (OPERATOR, Access.MODEL, ("globex", "g1"), True),
        (TEAM, Access.GATEWAY, None, False),  # reload, the routing table, the async queues
        (M1, Access.GATEWAY, None, False),
        (TEAM, Access.ANY, None, True),  # lists: the handler narrows them
        (TEAM, Access.MODEL, ("acme", "m2"), True),
        (TEAM, Access.MODEL, ("globex", "g1"), False),
        (M1, Access.MODEL, ("acme", "m1"), True),
        (M1, Access.MODEL, ("acme", "m2"), False),
        (M1, Access.MODEL, None, True),  # an unknown model: the handler's 404
        (TEAM, Access.OPEN, None, True),
    ],
)
def test_who_may_make_which_call(caller: Caller, access: Access, model: tuple | None, allowed: bool) -> None:
    reason = decide(caller, access, model)
    assert (reason is None) is allowed
    if reason is not None:
        assert caller.name in reason


@pytest.mark.parametrize(
    ("caller", "team", "models", "allowed"),
    [
        (OPERATOR, "globex", None, True),
        (TEAM, "acme", None, True),
        (TEAM, "acme", ["m1"], True),
        (TEAM, "globex", None, False),
        (M1, "acme", ["m1"], True),
        (M1, "acme", None, False),  # a key for the whole team reaches more than m1
        (M1, "acme", ["m1", "m2"], False),
        (M1, "acme", [], False),
    ],
)
def test_which_inference_keys_an_admin_key_manages(
    caller: Caller, team: str, models: list | None, allowed: bool
) -> None:
    assert caller.reaches_key(team, models) is allowed


def test_the_admin_caller_behind_a_header() -> None:
    table = compile_table(doc())
    assert admin_caller(table, TOKEN, f"Bearer {TOKEN}") is OPERATOR
    assert admin_caller(table, TOKEN, f"Bearer {TEAM_KEY}") == TEAM
    assert admin_caller(table, TOKEN, f"Api-Key {MODEL_KEY}") == M1
    for header in (None, "", f"Bearer {TOKEN}x", "Bearer file-key-secret", f"Basic {TOKEN}"):
        with pytest.raises(Unauthorized) as err:
            admin_caller(table, TOKEN, header)
        assert TOKEN not in err.value.message
    # Without a token (a loopback listener) an admin key keeps its scope; anything else is the operator.
    assert admin_caller(table, None, f"Bearer {TEAM_KEY}") == TEAM
    assert admin_caller(table, None, None) is OPERATOR


def test_admin_keys_follow_the_table_rules() -> None:
    bad = doc()
    bad["admin_keys"] = [
        {"name": "a", "team": "acme", "sha256": sha("a"), "scope": "model"},
        {"name": "b", "team": "acme", "sha256": sha("b"), "scope": "team", "models": ["m1"]},
        {"name": "c", "team": "acme", "sha256": sha("c"), "scope": "model", "models": ["g1"]},
        {"name": "d", "team": "acme", "sha256": sha("file-key-secret"), "scope": "team"},
        {"name": "e", "team": "nobody", "sha256": sha("e"), "scope": "everything"},
    ]
    problems = loader_problems(bad)
    assert "admin_keys[0].models: a key of scope 'model' lists the models it manages" in problems
    assert "admin_keys[1].models: a key of scope 'team' manages every model of its team: no 'models'" in problems
    assert "admin_keys[2].models[0]: model 'g1' belongs to team 'globex', not to the key's team 'acme'" in problems
    assert "admin_keys[3].sha256: the same key digest is already listed at api_keys[0]" in problems
    assert any(p.startswith("admin_keys[4].scope") for p in problems), problems


def test_a_large_json_table_keeps_its_admin_keys() -> None:
    # The streaming JSON path (routing/stream.py) builds the same admin keys as the classic one.
    data = json.dumps(doc()).encode()
    table, sections = compile_source(data, digest="d", source="t.json")
    assert table.admin_keys == compile_table(doc()).admin_keys
    assert "admin_keys" not in sections and "api_keys" not in sections


# -- admin-created keys in the table, pure ----------------------------------------------------------


def record(name: str, key: str, **extra: object) -> dict:
    return {"name": name, "team": "acme", "sha256": sha(key), "prefix": name[:8], "created_at": "2026-01-01T00:00:00Z",
            "type": "WORKSPACE_INVOKE", **extra}  # fmt: skip


def sections_and_table() -> tuple[dict, object]:
    table, sections = compile_source(json.dumps(doc()).encode(), digest="d", source="t.json")
    return sections, table


def test_admin_created_keys_join_the_file_keys() -> None:
    sections, table = sections_and_table()
    records = [record("k1", "secret-1", models=["m1"], rate_limit={"requests_per_second": 5, "burst": 10})]
    composed = with_admin_keys(sections, table, records)
    key = composed.api_keys[bytes.fromhex(sha("secret-1"))]
    assert (key.name, key.team, key.models) == ("k1", "acme", frozenset({"m1"}))
    assert len(composed.api_keys) == 2 and composed.digest != table.digest
    assert key_document(records[0]) == {
        k: v for k, v in records[0].items() if k not in ("prefix", "created_at", "type")
    }


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ({"models": ["g1"]}, "admin store: api_keys[k1].models[0]: model 'g1' belongs to team 'globex'"),
        ({"rate_limit": {"burst": 0}}, "admin store: api_keys[k1].rate_limit.burst"),
        ({"rate_limit": {"per_day": 3}}, "admin store: api_keys[k1].rate_limit"),
        ({"environments": ["Bad Name"]}, "admin store: api_keys[k1].environments[0]"),
        ({"name": "file-key"}, "admin store: api_keys[k1]: the table file also has a key named 'file-key'"),
    ],
)
def test_an_admin_created_key_is_checked_by_the_table_rules(extra: dict, problem: str) -> None:
    sections, table = sections_and_table()
    with pytest.raises(TableInvalid) as err:
        with_admin_keys(sections, table, [{**record("k1", "secret-1"), **extra}])
    assert any(p.startswith(problem) for p in err.value.problems), err.value.problems


def test_new_keys_look_like_the_platforms_and_never_repeat() -> None:
    keys = [new_key() for _ in range(200)]
    for prefix, key in keys:
        assert re.fullmatch(r"[A-Za-z0-9]{8}", prefix)
        assert re.fullmatch(re.escape(prefix) + r"\.[A-Za-z0-9_-]{43}", key)  # 256 random bits
    assert len({key for _, key in keys}) == len(keys)


# -- the route list, pure -------------------------------------------------------------------------


def test_the_route_list_dispatches_literals_before_arguments() -> None:
    route, args = match("/v1/models/m%2F1/deployments/production", "GET")
    assert (route.handler, args) == ("read_deployment", ("m/1", "production"))
    route, args = match("/v1/models/m1/deployments/development/deactivate", "POST")
    assert (route.handler, args) == ("change_status", ("m1", "development", "deactivate"))
    route, args = match("/v1/models/m1/deployments/v2/activate", "POST")
    assert (route.handler, args) == ("change_status", ("m1", "v2", "activate"))
    with pytest.raises(MethodNotAllowed) as err:
        match("/v1/api_keys", "PUT")
    assert err.value.allow == ("GET", "POST")
    with pytest.raises(EndpointNotFound):
        match("/v1/models/m1/environments/staging/explode", "POST")


@given(
    path=st.lists(st.sampled_from(["v1", "models", "m1", "environments", "deployments", "production", "api_keys",
                                   "%2F", "", "promote", "activate", "x" * 300]), max_size=7).map("/".join),
    method=st.sampled_from(["GET", "POST", "PATCH", "DELETE", "PUT", "BREW"]),
)  # fmt: skip
def test_a_path_gets_a_route_or_a_typed_error(path: str, method: str) -> None:
    try:
        route, args = match("/" + path, method)
    except (EndpointNotFound, MethodNotAllowed):
        return
    assert route.method == method and len(args) == len(route.params) + len(route.extra)


def test_every_route_is_listed_once() -> None:
    seen = [(route.method, route.path) for route in ROUTES]
    assert len(seen) == len(set(seen))


# -- live ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plane() -> Iterator[TestPlane]:
    p = TestPlane()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def gateway(plane: TestPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    config = write_table(tmp_path_factory.mktemp("keys") / "table.yaml", doc(plane.url))
    with running_gateway(config, "--admin-token", TOKEN) as gw:
        yield gw


def predict(gw: GatewayProcess, key: str, model: str = "m1") -> int:
    headers = {"Authorization": f"Api-Key {key}", "Host": f"model-{model}.api.example.com"}
    req = urllib.request.Request(f"{gw.url}/production/predict", data=b"{}", headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_a_team_key_manages_its_team_only(gateway: GatewayProcess) -> None:
    status, body = gateway.admin("GET", "/v1/models", TEAM_KEY)
    assert (status, [m["id"] for m in body["models"]]) == (200, ["m1", "m2"])
    assert gateway.admin("GET", "/v1/models", TOKEN)[1]["models"][0]["id"] == "g1"
    status, body = gateway.admin("GET", "/v1/models/g1/environments", TEAM_KEY)
    assert (status, body["error_code"]) == (403, "unauthorized")
    status, body = gateway.admin("PATCH", "/v1/models/m2/environments/production", TEAM_KEY,
                                 {"request_backpressure_settings": {"policy": "REJECT_ON_FULL"}})  # fmt: skip
    assert (status, body["backpressure"]) == (200, {"policy": "REJECT_ON_FULL"})
    for method, path in (("POST", "/v1/routing/reload"), ("GET", "/v1/routing")):
        status, body = gateway.admin(method, path, TEAM_KEY)
        assert (status, body["error_code"]) == (403, "unauthorized")
    assert gateway.admin("GET", "/v1/models", "not-a-key")[0] == 401
    assert gateway.admin("GET", "/healthz")[0] == 200
    # Without credentials, an unknown path is 401 too: what exists is shown to admin callers only.
    assert [gateway.admin("GET", "/v1/nothing", who)[0] for who in (None, TEAM_KEY)] == [401, 404]
    assert gateway.admin("PUT", "/healthz")[0] == 405


def test_team_calls_reach_an_admin_keys_team_only(gateway: GatewayProcess) -> None:
    # Environment groups and team model lists (issue 12) are narrowed like model lists.
    status, body = gateway.admin("GET", "/v1/environment_groups", TEAM_KEY)
    assert status == 200 and {g["team_id"] for g in body["items"]} == {"acme"}
    assert {g["team_id"] for g in gateway.admin("GET", "/v1/environment_groups", TOKEN)[1]["items"]} == {
        "acme",
        "globex",
    }
    for path in ("/v1/teams/globex/models", "/v1/teams/globex/environment_groups",
                 "/v1/teams/globex/environment_groups/production"):  # fmt: skip
        status, body = gateway.admin("GET", path, TEAM_KEY)
        assert (status, body["error_code"]) == (403, "unauthorized"), path
    status, body = gateway.admin("GET", "/v1/environment_groups/production", TEAM_KEY)  # its own team's, no 409
    assert (status, body["team_id"]) == (200, "acme")
    assert gateway.admin("GET", "/v1/environment_groups/production", TOKEN)[0] == 409  # two teams have one
    status, body = gateway.admin("GET", "/v1/teams/acme/models", TEAM_KEY)
    assert (status, [m["id"] for m in body["models"]]) == (200, ["m1", "m2"])


def test_a_model_key_manages_its_models_only(gateway: GatewayProcess) -> None:
    status, body = gateway.admin("GET", "/v1/models", MODEL_KEY)
    assert (status, [m["id"] for m in body["models"]]) == (200, ["m1"])
    assert gateway.admin("GET", "/v1/models/m1/deployments/production", MODEL_KEY)[0] == 200
    assert gateway.admin("GET", "/v1/models/m2", MODEL_KEY)[0] == 403
    assert gateway.admin("POST", "/v1/models/m2/deployments/v1/deactivate", MODEL_KEY)[0] == 403
    assert gateway.admin("GET", "/v1/models/nope", MODEL_KEY)[0] == 404


def test_a_created_key_works_on_predict_until_revoked(gateway: GatewayProcess) -> None:
    status, body = gateway.admin("POST", "/v1/api_keys", TEAM_KEY, {"type": "WORKSPACE_INVOKE", "name": "ci-2"})
    assert status == 200, body
    key, prefix = body["api_key"], body["prefix"]
    assert key.startswith(prefix + ".") and body["team_name"] == "acme"
    assert predict(gateway, key) == 200  # effective on live traffic at the answer: the swap is done
    assert predict(gateway, key, "g1") == 404  # another team's model is not revealed (SPEC §5)
    listed = gateway.admin("GET", "/v1/api_keys", TEAM_KEY)[1]["keys"]
    mine = [k for k in listed if k["prefix"] == prefix]
    assert mine and mine[0]["name"] == "ci-2" and key not in json.dumps(listed) and "sha256" not in mine[0]
    store = Path(str(gateway.config) + ".admin.json").read_text()
    assert key not in store and sha(key) in store  # the store keeps the digest only
    assert gateway.admin("GET", "/v1/api_keys", TOKEN)[1]["keys"] == listed  # globex has none
    status, body = gateway.admin("DELETE", f"/v1/api_keys/{prefix}", TEAM_KEY)
    assert (status, body["prefix"]) == (200, prefix)
    assert predict(gateway, key) == 401
    assert gateway.admin("DELETE", f"/v1/api_keys/{prefix}", TEAM_KEY)[0] == 404
    assert gateway.admin("DELETE", "/v1/api_keys/file-key", TOKEN)[0] == 409  # the file's keys stay in the file


def test_key_scopes_and_limits_are_checked(gateway: GatewayProcess) -> None:
    create = {"type": "WORKSPACE_INVOKE", "model_ids": ["m1"], "environments": ["production"],
              "rate_limit": {"requests_per_second": 5, "burst": 10}}  # fmt: skip
    status, body = gateway.admin("POST", "/v1/api_keys", MODEL_KEY, create)
    assert status == 200, body
    assert (body["model_ids"], body["rate_limit"]) == (["m1"], {"requests_per_second": 5, "burst": 10})
    assert predict(gateway, body["api_key"]) == 200 and predict(gateway, body["api_key"], "m2") == 403
    assert [k["prefix"] for k in gateway.admin("GET", "/v1/api_keys", MODEL_KEY)[1]["keys"]] == [body["prefix"]]
    refusals = [
        (MODEL_KEY, {"type": "WORKSPACE_INVOKE"}, 403),  # a key of the whole team reaches past m1
        (MODEL_KEY, {"type": "WORKSPACE_INVOKE", "model_ids": [{}]}, 400),
        (MODEL_KEY, {"type": "WORKSPACE_INVOKE", "model_ids": "m1"}, 400),
        (TEAM_KEY, {"type": "WORKSPACE_INVOKE", "team_id": "globex"}, 403),
        (TEAM_KEY, {"type": "WORKSPACE_INVOKE", "model_ids": ["g1"]}, 400),  # another team's model
        (TEAM_KEY, {"type": "WORKSPACE_INVOKE", "rate_limit": {"burst": 0}}, 400),
        (TEAM_KEY, {"type": "WORKSPACE_MANAGE_ALL"}, 400),  # admin keys live in the table
        (TEAM_KEY, {"type": "WORKSPACE_INVOKE", "colour": "red"}, 400),
        (TOKEN, {"type": "WORKSPACE_INVOKE"}, 400),  # two teams: which one?
        (TOKEN, {"type": "WORKSPACE_INVOKE", "team_id": "nobody"}, 404),
        (TEAM_KEY, {"type": "WORKSPACE_INVOKE", "name": "file-key"}, 400),
    ]
    for who, create_body, expected in refusals:
        status, answer = gateway.admin("POST", "/v1/api_keys", who, create_body)
        assert status == expected, (create_body, answer)
    assert gateway.admin("DELETE", f"/v1/api_keys/{body['prefix']}", "acme-manager-key")[0] == 200


def test_the_platform_sdk_manages_keys_unchanged(gateway: GatewayProcess) -> None:
    with ManagementClient(api_key=TEAM_KEY, base_url_override=gateway.admin_url) as client:
        created = client.api.post_teams_api_keys(
            team_id="acme", request=CreateAPIKeyRequest(type="WORKSPACE_INVOKE", name="sdk")
        )
        assert predict(gateway, created.api_key) == 200
        infos = client.api.get_api_keys().keys
        assert [info.name for info in infos if isinstance(info, APIKeyInfo)] == ["sdk"]
        assert infos[0].created_at.tzinfo is not None
        assert client.api.delete_api_keys(api_key_prefix=infos[0].prefix).prefix == infos[0].prefix
        with pytest.raises(ResponseError) as err:
            client.api.delete_api_keys(api_key_prefix=infos[0].prefix)
        assert err.value.status_code == 404
    assert predict(gateway, created.api_key) == 401


def test_keys_reach_every_worker(plane: TestPlane, tmp_path: Path) -> None:
    # Each worker composes the store on its swap: a created key is served by all, a revoked one by none.
    config = write_table(tmp_path / "table.yaml", doc(plane.url))
    with running_gateway(config, "--workers", "2", "--admin-token", TOKEN) as gw:
        status, body = gw.admin("POST", "/v1/teams/acme/api_keys", TOKEN, {"type": "WORKSPACE_INVOKE"})
        assert status == 200, body
        digest = gw.admin("GET", "/v1/routing", TOKEN)[1]["digest"]

        def workers_at(digest: str) -> bool:
            workers = gw.admin("GET", "/v1/routing", TOKEN)[1].get("workers", [])
            return len(workers) == 2 and all(w["digest"] == digest for w in workers)

        wait_for(lambda: workers_at(digest), "both workers to serve the new key")
        assert [predict(gw, body["api_key"]) for _ in range(20)] == [200] * 20  # new connections: both workers
        assert gw.admin("DELETE", f"/v1/api_keys/{body['name']}", TOKEN)[0] == 200
        digest = gw.admin("GET", "/v1/routing", TOKEN)[1]["digest"]
        wait_for(lambda: workers_at(digest), "both workers to drop the key")
        assert [predict(gw, body["api_key"]) for _ in range(20)] == [401] * 20
