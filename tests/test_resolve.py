"""The routing decision (SPEC §1–§5, §8), pure: `resolve(table, call)` over the example table."""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import GatewayError
from gateway.routing.loader import compile_table, load_table
from gateway.routing.resolve import Call, RequestLookup, Route, canary_bucket, resolve, resolve_async_run
from tests.support import EXAMPLE, example_doc

TABLE = load_table(EXAMPLE)
KEY = "Api-Key demo-key-acme"


def call(host: str, path: str, method: str = "POST", auth: str | None = KEY, routing_key: str | None = None) -> Call:
    return Call(method, host, path, auth, routing_key)


def route(host: str, path: str, **kw) -> Route:
    return resolve(TABLE, call(host, path, **kw))


def error(host: str, path: str, **kw) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        resolve(TABLE, call(host, path, **kw))
    return info.value


@pytest.mark.parametrize(
    ("host", "path", "env", "deployment", "upstream", "region"),
    [
        ("model-abc123.api.example.com", "/production/predict", "production", "v1", "/predict", None),
        ("model-abc123.api.example.com", "/environments/production/predict", "production", "v1", "/predict", None),
        ("model-abc123.api.example.com", "/environments/prod-eu/predict", "prod-eu", "v3", "/predict", None),
        ("model-abc123.api.example.com", "/development/predict", "", "dev", "/predict", None),
        ("model-abc123.api.example.com", "/deployment/v2/predict?x=1", "", "v2", "/predict?x=1", None),
        ("model-abc123.api.example.com", "/production/sync/v1/models?a=%2f", "production", "v1", "/v1/models?a=%2f", None),
        ("model-abc123-prod-us.api.example.com", "/predict", "prod-us", "v1", "/predict", "us"),
        ("MODEL-ABC123-PROD-US.localhost.:8080", "/sync/v1/models", "prod-us", "v1", "/v1/models", "us"),
        ("chain-pipeline1.api.example.com", "/production/run_remote", "production", "c1", "/run_remote", None),
        ("chain-pipeline1-prod-us.api.example.com", "/run_remote", "prod-us", "c1", "/run_remote", "us"),
    ],
)  # fmt: skip
def test_routes(host: str, path: str, env: str, deployment: str, upstream: str, region: str | None) -> None:
    r = route(host, path)
    assert (r.environment, r.deployment.id, r.upstream_target, r.region) == (env, deployment, upstream, region)
    assert r.upstream_url.endswith(upstream)
    if region is not None:
        assert r.deployment.region == region


@pytest.mark.parametrize(
    ("host", "path", "kw", "status", "code", "text"),
    [
        ("model-abc123.evil.com", "/production/predict", {}, 404, "model_does_not_exist", "no model is served"),
        ("model-abc123.api.example.com", "/production/predict", {"auth": None}, 401, "unauthorized", "missing"),
        ("model-abc123.api.example.com", "/production/predict", {"auth": "Api-Key nope"}, 401, "unauthorized", "invalid"),
        ("model-abc123.api.example.com", "/production/predict", {"auth": "Basic abc"}, 401, "unauthorized", "malformed"),
        ("model-abc123.api.example.com", "/production/predict", {"auth": "Bearer demo-key-globex"}, 404, "model_does_not_exist", "not found"),
        ("model-nosuch.api.example.com", "/production/predict", {}, 404, "model_does_not_exist", "not found"),
        ("chain-abc123.api.example.com", "/production/run_remote", {}, 404, "model_does_not_exist", "not found"),
        ("model-abc123.api.example.com", "/production/predict", {"auth": "Api-Key demo-key-staging"}, 403, "unauthorized", "production"),
        ("model-abc123.api.example.com", "/deployment/v1/predict", {"auth": "Api-Key demo-key-staging"}, 403, "unauthorized", "deployments"),
        ("model-llm7.api.example.com", "/environments/staging/predict", {"auth": "Api-Key demo-key-staging"}, 403, "unauthorized", "llm7"),
        ("model-abc123.api.example.com", "/environments/nosuch/predict", {}, 404, "model_does_not_exist", "not found"),
        ("model-abc123.api.example.com", "/environments/old-staging/predict", {}, 404, "model_does_not_exist", "not found"),
        ("model-abc123.api.example.com", "/deployment/v9/predict", {}, 404, "model_does_not_exist", "no deployment 'v9'"),
        ("model-llm7.api.example.com", "/development/predict", {}, 404, "model_does_not_exist", "development"),
        ("model-abc123-staging.api.example.com", "/predict", {}, 404, "model_does_not_exist", "has no regional endpoint"),
        ("model-abc123-prod-eu.api.example.com", "/predict", {}, 421, "client_error", "region 'eu'"),
        ("model-abc123-prod-us.api.example.com", "/environments/prod-us/predict", {}, 400, "client_error", "hostname"),
        ("model-abc123.api.example.com", "/production/predict", {"method": "GET"}, 405, "client_error", "GET"),
        ("model-abc123-prod-eu.api.example.com", "/async_predict", {}, 421, "client_error", "does not serve region 'eu'"),
        ("model-abc123.api.example.com", "/environments/prod-eu/async_predict", {}, 421, "client_error", "region 'eu'"),
        ("model-abc123.api.example.com", "/production/async_predict", {"method": "GET"}, 405, "client_error", "not allowed"),
    ],
)  # fmt: skip
def test_errors(host: str, path: str, kw: dict, status: int, code: str, text: str) -> None:
    e = error(host, path, **kw)
    assert (e.status, e.error_code) == (status, code)
    assert text in e.message


def test_errors_never_echo_the_key() -> None:
    for auth in ("Api-Key sekrit-123", "Bearer sekrit-123", "Apikey sekrit-123"):
        e = error("model-abc123.api.example.com", "/production/predict", auth=auth)
        assert b"sekrit" not in e.body() and "sekrit" not in e.message


def test_bearer_and_api_key_schemes_are_the_same_key() -> None:
    a = route("model-abc123.api.example.com", "/production/predict", auth="Bearer demo-key-acme")
    b = route("model-abc123.api.example.com", "/production/predict", auth="api-key demo-key-acme")
    assert a.api_key == b.api_key and a.api_key.name == "demo"


def test_another_teams_model_looks_like_no_model_at_all() -> None:
    other = error("model-abc123.api.example.com", "/production/predict", auth="Api-Key demo-key-globex")
    missing = error("model-zzz999.api.example.com", "/production/predict", auth="Api-Key demo-key-globex")
    assert (other.status, other.error_code) == (missing.status, missing.error_code) == (404, "model_does_not_exist")


def test_a_scaled_to_zero_deployment_is_held_not_failed() -> None:
    r = route("model-abc123.api.example.com", "/deployment/v0/predict")
    assert r.action == "hold" and r.deployment.id == "v0" and r.deployment.status == "scaled_to_zero"


def test_wake_routes_even_a_scaled_to_zero_deployment() -> None:
    r = route("model-abc123.api.example.com", "/deployment/v0/wake")
    assert r.action == "wake" and r.deployment.status == "scaled_to_zero"


def test_inactive_deployment_is_unavailable_without_forwarding() -> None:
    doc = example_doc("http://127.0.0.1:9001", "http://127.0.0.1:9002")
    doc["models"]["abc123"]["deployments"]["v1"]["status"] = "inactive"
    table = compile_table(doc)
    with pytest.raises(GatewayError) as info:
        resolve(table, call("model-abc123.api.example.com", "/production/predict"))
    assert (info.value.status, info.value.error_code) == (503, "model_unavailable")


def test_gateway_without_regions_serves_every_region() -> None:
    doc = example_doc("http://127.0.0.1:9001", "http://127.0.0.1:9002")
    del doc["gateway"]["regions"]
    table = compile_table(doc)
    r = resolve(table, call("model-abc123-prod-eu.api.example.com", "/predict"))
    assert (r.region, r.deployment.region, r.deployment.plane.name) == ("eu", "eu", "eu-west-1")


def test_a_regional_call_never_leaves_its_region_even_if_the_table_were_wrong() -> None:
    """Defence in depth: a table object that slipped past validation still cannot route out of region."""
    env = TABLE.models["abc123"].environments["prod-us"]
    eu_dep = TABLE.models["abc123"].deployments["v3"]
    bad_env = dataclasses.replace(env, deployment=eu_dep)
    model = TABLE.models["abc123"]
    bad_model = dataclasses.replace(model, environments=MappingProxyType({**model.environments, "prod-us": bad_env}))
    bad = dataclasses.replace(TABLE, models=MappingProxyType({**TABLE.models, "abc123": bad_model}))
    with pytest.raises(GatewayError) as info:
        resolve(bad, call("model-abc123-prod-us.api.example.com", "/predict"))
    assert info.value.status == 503


# -- canary ------------------------------------------------------------------------------------


def test_canary_split_is_within_tolerance_and_sticky() -> None:
    picks = [
        route("model-abc123.api.example.com", "/environments/staging/predict", routing_key=f"user-{i}").canary
        for i in range(5000)
    ]
    share = sum(picks) / len(picks)
    assert 0.08 < share < 0.12  # 10% configured; 5000 draws: sd ~0.42 points
    again = [
        route("model-abc123.api.example.com", "/environments/staging/predict", routing_key=f"user-{i}").canary
        for i in range(5000)
    ]
    assert again == picks
    canary = [r for r, p in zip(range(5000), picks) if p][0]
    r = route("model-abc123.api.example.com", "/environments/staging/predict", routing_key=f"user-{canary}")
    assert r.deployment.id == "v2"


def test_routing_key_wins_over_api_key_and_api_key_is_sticky_alone() -> None:
    no_key = [route("model-abc123.api.example.com", "/environments/staging/predict").canary for _ in range(20)]
    assert len(set(no_key)) == 1
    bucket_by_key = canary_bucket("abc123", "staging", "demo")
    assert no_key[0] == (bucket_by_key < 1000)


# -- properties ------------------------------------------------------------------------------

_hosts = st.sampled_from(
    ["model-abc123", "model-abc123-prod-us", "model-abc123-prod-eu", "model-llm7-prod-us", "model-llm7-prod-eu",
     "chain-pipeline1-prod-us", "model-abc123-staging", "model-xyz789", "chain-pipeline1", "model-abc123-x"]
)  # fmt: skip
_paths = st.sampled_from(
    ["/predict", "/run_remote", "/sync/v1/models", "/wake", "/production/predict", "/environments/prod-eu/predict",
     "/deployment/v3/predict", "/development/predict", "/async_predict", "/%70redict", "/predict/..", "//predict"]
)  # fmt: skip
_keys = st.sampled_from([KEY, "Api-Key demo-key-staging", "Api-Key demo-key-globex", None, "Bearer x"])


@settings(max_examples=400)
@given(_hosts, st.sampled_from(["api.example.com", "localhost:8080", "api.example.com."]), _paths, _keys,
       st.sampled_from(["POST", "GET"]), st.text(max_size=8))  # fmt: skip
def test_a_regional_call_never_resolves_outside_its_region(host, domain, path, auth, method, rkey) -> None:
    for gateway_regions in (None, frozenset({"us"})):
        table = dataclasses.replace(TABLE, gateway=dataclasses.replace(TABLE.gateway, regions=gateway_regions))
        try:
            r = resolve(table, Call(method, f"{host}.{domain}", path, auth, rkey))
        except GatewayError as e:
            assert e.status in (400, 401, 403, 404, 405, 421, 501, 503)
            continue
        assert isinstance(r, Route)
        if r.region is not None:
            assert r.deployment.region == r.region
            assert r.deployment.plane.region == r.region
            assert gateway_regions is None or r.region in gateway_regions


# -- lookup cost -----------------------------------------------------------------------------


def _big_table(n: int):
    doc = example_doc("http://127.0.0.1:9001", "http://127.0.0.1:9002")
    for i in range(n):
        doc["models"][f"m{i}"] = {
            "team": "acme",
            "deployments": {"d1": {"plane": "us-east-1"}},
            "environments": {"production": {"deployment": "d1"}, "prod-us": {"deployment": "d1"}},
        }
    return compile_table(doc)


def test_lookup_work_does_not_depend_on_table_size() -> None:
    """Same answer, and the resolver never iterates the model set (no timing asserted here)."""
    small, big = _big_table(10), _big_table(2000)

    class CountingDict(dict):
        iterations = 0

        def __iter__(self):
            CountingDict.iterations += 1
            return super().__iter__()

    counted = dataclasses.replace(big, models=CountingDict(big.models))
    c = Call("POST", "model-m7-prod-us.api.example.com", "/predict", KEY)
    assert resolve(small, c).deployment.id == resolve(counted, c).deployment.id == "d1"
    assert CountingDict.iterations == 0


def test_ipv6_plane_addresses_are_bracketed_in_urls() -> None:
    doc = example_doc("http://[::1]:9001", "http://127.0.0.1:9002")
    r = resolve(compile_table(doc), call("model-abc123.api.example.com", "/production/predict"))
    assert r.deployment.plane.url.host == "::1"  # what a socket connects to
    assert r.upstream_url == "http://[::1]:9001/predict"


# -- gRPC (SPEC §9) ---------------------------------------------------------------------------

from gateway.routing.resolve import GrpcCall, resolve_grpc  # noqa: E402


@pytest.mark.parametrize(
    ("authority", "env", "dep", "expected_env", "expected_dep", "region"),
    [
        ("model-abc123.grpc.api.example.com", None, None, "production", "v1", None),
        ("model-abc123.grpc.api.example.com:443", "staging", None, "staging", "v1", None),
        ("model-abc123.grpc.localhost", None, "v2", "", "v2", None),
        ("model-abc123-prod-us.grpc.api.example.com", None, None, "prod-us", "v1", "us"),
    ],
)
def test_grpc_routes(authority, env, dep, expected_env, expected_dep, region) -> None:
    r = resolve_grpc(TABLE, GrpcCall(authority, "/demo.Echo/Say", KEY, env, dep, "user-1"))
    assert (r.action, r.environment, r.deployment.id, r.region, r.upstream_target) == (
        "grpc",
        expected_env,
        expected_dep,
        region,
        "/demo.Echo/Say",
    )
    assert r.deployment.plane.grpc == "127.0.0.1:9101"


@pytest.mark.parametrize(
    ("authority", "method", "auth", "env", "dep", "status", "grpc_status"),
    [
        ("model-abc123-prod-us.grpc.api.example.com", "/a.B/C", KEY, "staging", None, 400, 3),  # INVALID_ARGUMENT
        ("model-abc123-prod-us.grpc.api.example.com", "/a.B/C", KEY, None, "v1", 400, 3),
        ("model-abc123.grpc.api.example.com", "/a.B/C", KEY, "staging", "v1", 400, 3),
        ("model-abc123.grpc.api.example.com", "/a.B/C", KEY, "Bad_Env", None, 400, 3),
        ("model-abc123.grpc.api.example.com", "not-a-method", KEY, None, None, 400, 3),
        ("model-abc123.api.example.com", "/a.B/C", KEY, None, None, 404, 5),  # not a gRPC host: NOT_FOUND
        ("model-abc123.grpc.api.example.com", "/a.B/C", None, None, None, 401, 16),  # UNAUTHENTICATED
        ("model-abc123.grpc.api.example.com", "/a.B/C", "Api-Key demo-key-globex", None, None, 404, 5),
        ("model-abc123.grpc.api.example.com", "/a.B/C", "Api-Key demo-key-staging", None, None, 403, 7),
        ("model-abc123-prod-eu.grpc.api.example.com", "/a.B/C", KEY, None, None, 421, 14),  # UNAVAILABLE
        ("model-abc123.grpc.api.example.com", "/a.B/C", KEY, "nosuch", None, 404, 5),
    ],
)
def test_grpc_errors_map_to_grpc_codes(authority, method, auth, env, dep, status, grpc_status) -> None:
    with pytest.raises(GatewayError) as info:
        resolve_grpc(TABLE, GrpcCall(authority, method, auth, env, dep))
    assert (info.value.status, info.value.grpc_status) == (status, grpc_status)


def test_a_grpc_call_to_a_scaled_to_zero_deployment_is_held() -> None:
    r = resolve_grpc(TABLE, GrpcCall("model-abc123.grpc.api.example.com", "/a.B/C", KEY, None, "v0"))
    assert (r.action, r.deployment.id) == ("hold", "v0")
    active = resolve_grpc(TABLE, GrpcCall("model-abc123.grpc.api.example.com", "/a.B/C", KEY, None, "v1"))
    assert active.action == "grpc"


def test_grpc_host_on_the_http_listener_is_not_found() -> None:
    e = error("model-abc123.grpc.api.example.com", "/production/predict")
    assert e.status == 404 and "gRPC listener" in e.message


def test_async_routes_name_the_store_of_their_region() -> None:
    submit = route("model-abc123.api.example.com", "/production/async_predict")
    assert (submit.action, submit.deployment.id, submit.region, submit.upstream_target) == (
        "async",
        "v1",
        "us",
        "/predict",
    )
    pinned = route("model-abc123-prod-us.api.example.com", "/async_predict")
    assert (pinned.environment, pinned.region) == ("prod-us", "us")
    counts = route("model-abc123.api.example.com", "/production/async_queue_status", method="GET")
    assert counts.action == "async_status"
    chain = route("chain-pipeline1.api.example.com", "/production/async_run_remote")
    assert chain.upstream_target == "/run_remote"
    lookup = resolve(TABLE, call("model-abc123-prod-us.api.example.com", "/async_request/abc/result", method="GET"))
    assert isinstance(lookup, RequestLookup)
    assert (lookup.endpoint, lookup.request_id, lookup.region, lookup.model.id) == (
        "async_result",
        "abc",
        "us",
        "abc123",
    )
    standard = resolve(TABLE, call("model-abc123.api.example.com", "/async_request/abc", method="DELETE"))
    assert isinstance(standard, RequestLookup) and standard.region is None


def test_a_stored_request_runs_on_its_environments_deployment_now_and_in_its_region() -> None:
    run = resolve_async_run(TABLE, "abc123", "prod-eu", "v3", "eu", "caller")
    assert (run.deployment.id, run.action) == ("v3", "proxy")
    with pytest.raises(GatewayError) as info:
        resolve_async_run(TABLE, "abc123", "prod-eu", "v3", "us", "caller")  # never outside the stored region
    assert info.value.status == 503
    assert resolve_async_run(TABLE, "abc123", "", "v0", "us", "caller").action == "hold"  # scaled to zero: wake
