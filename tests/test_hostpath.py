"""Host and path parsing (SPEC §1, §2): table-driven cases and properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import ClientError, EndpointNotFound, GatewayError, MethodNotAllowed, ModelNotFound
from gateway.routing.hostpath import HostTarget, PathTarget, check_method, parse_host, parse_path

DOMAINS = frozenset({"api.example.com", "localhost"})


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("model-abc123.api.example.com", HostTarget("model", "abc123", None)),
        ("MODEL-ABC123.API.EXAMPLE.COM", HostTarget("model", "abc123", None)),
        ("model-abc123.api.example.com.", HostTarget("model", "abc123", None)),
        ("model-abc123.api.example.com:8443", HostTarget("model", "abc123", None)),
        ("model-abc123.api.example.com.:80", HostTarget("model", "abc123", None)),
        ("model-abc123-prod-us.api.example.com", HostTarget("model", "abc123", "prod-us")),
        ("model-abc123-staging.localhost:8080", HostTarget("model", "abc123", "staging")),
        ("chain-pipe1.api.example.com", HostTarget("chain", "pipe1", None)),
        ("chain-pipe1-prod-eu.api.example.com", HostTarget("chain", "pipe1", "prod-eu")),
        ("model-abc123.grpc.api.example.com", HostTarget("model", "abc123", None, grpc=True)),
        ("model-abc123-prod-us.grpc.api.example.com", HostTarget("model", "abc123", "prod-us", grpc=True)),
        ("model-" + "a" * 32 + ".api.example.com", HostTarget("model", "a" * 32, None)),
        ("model-abc-" + "e" * 40 + ".api.example.com", HostTarget("model", "abc", "e" * 40)),
    ],
)
def test_host_forms(host: str, expected: HostTarget) -> None:
    assert parse_host(host, DOMAINS) == expected


@pytest.mark.parametrize(
    "host",
    [
        "model-abc.api.example.com.evil.net",  # prefix trick: the domain must be the suffix, exactly
        "xmodel-abc.api.example.com",
        "model-abc.evil-api.example.com",
        "model-abc.example.com",
        "model-abc.api.example.com..",
        "model-.api.example.com",
        "model-ABC_1.api.example.com",
        "model-" + "a" * 33 + ".api.example.com",
        "model-abc-.api.example.com",  # empty environment
        "model-abc--x.api.example.com",  # environment starting with a hyphen
        "model-abc-prod-.api.example.com",  # environment ending with a hyphen
        "model-abc-" + "e" * 41 + ".api.example.com",  # environment over 40 characters
        "model-abc-pr_od.api.example.com",
        "chain-abc.grpc.api.example.com",  # gRPC hosts are model hosts only
        "model.api.example.com",
        "api.example.com",
        "model-abc.api.example.com:http",
        "model-abc.api.example.com:",
        "[::1]:8080",
        "127.0.0.1:8080",
        "model-abc",
        "deployment-abc.api.example.com",
    ],
)
def test_hosts_that_do_not_match_get_404(host: str) -> None:
    with pytest.raises(ModelNotFound) as info:
        parse_host(host, DOMAINS)
    assert info.value.status == 404 and info.value.error_code == "model_does_not_exist"


def test_missing_host_is_a_client_error() -> None:
    with pytest.raises(ClientError):
        parse_host(None, DOMAINS)


STD = HostTarget("model", "abc123", None)
REG = HostTarget("model", "abc123", "prod-us")
CHAIN = HostTarget("chain", "pipe1", None)


@pytest.mark.parametrize(
    ("host", "target", "expected"),
    [
        (STD, "/production/predict", PathTarget("environment", "production", "predict", "/predict", "")),
        (STD, "/environments/staging/predict", PathTarget("environment", "staging", "predict", "/predict", "")),
        (STD, "/environments/production/predict?x=1", PathTarget("environment", "production", "predict", "/predict", "?x=1")),
        (STD, "/development/predict", PathTarget("development", "", "predict", "/predict", "")),
        (STD, "/deployment/v2/predict", PathTarget("deployment", "v2", "predict", "/predict", "")),
        (STD, "/production/wake", PathTarget("environment", "production", "wake", "/wake", "")),
        (STD, "/production/async_queue_status", PathTarget("environment", "production", "async_queue_status", "/async_queue_status", "")),
        (STD, "/production/sync/v1/chat/completions", PathTarget("environment", "production", "sync", "/v1/chat/completions", "")),
        (STD, "/production/sync/v1/models?a=%2F&b", PathTarget("environment", "production", "sync", "/v1/models", "?a=%2F&b")),
        (STD, "/production/sync/a%2Fb//c", PathTarget("environment", "production", "sync", "/a%2Fb//c", "")),
        (STD, "/production/sync", PathTarget("environment", "production", "sync", "/", "")),
        (STD, "/%65nvironments/staging/predict", PathTarget("environment", "staging", "predict", "/predict", "")),
        (STD, "/production/pr%65dict", PathTarget("environment", "production", "predict", "/predict", "")),
        (STD, "/async_request/req-1", PathTarget("none", "", "async_request", "", "", request_id="req-1")),
        (REG, "/predict", PathTarget("none", "", "predict", "/predict", "")),
        (REG, "/predict?q=%20a", PathTarget("none", "", "predict", "/predict", "?q=%20a")),
        (REG, "/sync/v1/models", PathTarget("none", "", "sync", "/v1/models", "")),
        (REG, "/websocket", PathTarget("none", "", "websocket", "/websocket", "")),
        (REG, "/async_request/abc", PathTarget("none", "", "async_request", "", "", request_id="abc")),
        (CHAIN, "/production/run_remote", PathTarget("environment", "production", "run_remote", "/run_remote", "")),
    ],
)  # fmt: skip
def test_path_forms(host: HostTarget, target: str, expected: PathTarget) -> None:
    assert parse_path(target, host) == expected


@pytest.mark.parametrize(
    ("host", "target", "error", "status"),
    [
        (REG, "/environments/staging/predict", ClientError, 400),
        (REG, "/production/predict", ClientError, 400),
        (REG, "/development/predict", ClientError, 400),
        (REG, "/deployment/v1/predict", ClientError, 400),
        (REG, "/%65nvironments/staging/predict", ClientError, 400),  # encoding does not sneak past
        (REG, "/Production/predict", EndpointNotFound, 404),  # case-sensitive paths
        (STD, "/environments%2Fstaging/predict", ClientError, 400),
        (STD, "/environments%2fstaging%2fpredict", ClientError, 400),
        (STD, "/production%5Cpredict", ClientError, 400),
        (STD, "/production\\predict", ClientError, 400),
        (STD, "/production/../production/predict", ClientError, 400),
        (STD, "/production/./predict", ClientError, 400),
        (STD, "/production/%2e%2e/predict", ClientError, 400),
        (STD, "/production/%2E/predict", ClientError, 400),
        (STD, "/production//predict", ClientError, 400),
        (STD, "//production/predict", ClientError, 400),
        (STD, "/production/predict/", ClientError, 400),
        (STD, "/production/predict/..", ClientError, 400),
        (STD, "/production/sync/v1/../admin", ClientError, 400),
        (STD, "/production/sync/v1/%2e%2e/admin", ClientError, 400),
        (STD, "/production/sync/v1%2F..%2Fadmin", ClientError, 400),
        (STD, "/production/sync/..", ClientError, 400),
        (STD, "/environments/Staging/predict", ClientError, 400),
        (STD, "/environments/" + "e" * 41 + "/predict", ClientError, 400),
        (STD, "/environments/-x/predict", ClientError, 400),
        (STD, "/environments/st%2541ging/predict", ClientError, 400),  # %25 stays encoded: not a name
        (STD, "/production/unknown", EndpointNotFound, 404),
        (STD, "/production/predict/extra", EndpointNotFound, 404),
        (STD, "/production/run_remote", EndpointNotFound, 404),  # chains only
        (CHAIN, "/production/predict", EndpointNotFound, 404),  # models only
        (STD, "/production", EndpointNotFound, 404),
        (STD, "/environments/staging", EndpointNotFound, 404),
        (STD, "/predict", EndpointNotFound, 404),
        (STD, "/async_request", EndpointNotFound, 404),
        (STD, "/async_request/a/b", EndpointNotFound, 404),
        (STD, "*", ClientError, 400),
        (STD, "http://model-abc123.api.example.com/production/predict", ClientError, 400),
    ],
)  # fmt: skip
def test_path_rejections(host: HostTarget, target: str, error: type, status: int) -> None:
    with pytest.raises(error) as info:
        parse_path(target, host)
    assert info.value.status == status
    assert info.value.error_code == "client_error"


def test_regional_rejection_says_why() -> None:
    with pytest.raises(ClientError, match="regional hosts take the environment from the hostname"):
        parse_path("/environments/prod-us/predict", REG)


@pytest.mark.parametrize(
    ("method", "endpoint", "kind", "allow"),
    [
        ("GET", "predict", "model", "POST"),
        ("PUT", "wake", "model", "POST"),
        ("POST", "async_queue_status", "model", "GET"),
        ("POST", "websocket", "chain", "GET"),
        ("PUT", "async_request", "model", "GET, DELETE"),
    ],
)
def test_wrong_method_is_405_with_allow(method: str, endpoint: str, kind: str, allow: str) -> None:
    with pytest.raises(MethodNotAllowed) as info:
        check_method(method, endpoint, kind)
    assert info.value.status == 405 and ("allow", allow) in info.value.headers


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
def test_sync_takes_any_method(method: str) -> None:
    check_method(method, "sync", "model")


# -- properties -----------------------------------------------------------------------------

_host_chars = st.sampled_from(list("abcdefghijklmnopqrstuvwxyz0123456789-.:_ABC%[]"))
_path_chars = st.sampled_from(list("abcdeprodutincsy/.%25fFcC\\?=&-_~") + ["%2e", "%2F", "%5c", "%65", "/sync/"])


@given(st.text(_host_chars, max_size=80))
def test_host_parser_returns_a_target_or_a_typed_error(host: str) -> None:
    try:
        result = parse_host(host, DOMAINS)
    except GatewayError as error:
        assert error.status in (400, 404)
        return
    assert isinstance(result, HostTarget)
    assert result.kind in ("model", "chain")


@given(st.lists(_path_chars, max_size=30).map(lambda parts: "/" + "".join(parts)), st.sampled_from([STD, REG, CHAIN]))
def test_path_parser_returns_a_target_or_a_typed_error(target: str, host: HostTarget) -> None:
    try:
        result = parse_path(target, host)
    except GatewayError as error:
        assert error.status in (400, 404) and error.error_code == "client_error"
        return
    assert isinstance(result, PathTarget)
    # Whatever was accepted routes on plain, decoded segments only.
    assert ".." not in result.upstream_path.split("/")
    if result.endpoint != "sync":
        assert "%" not in result.upstream_path and "\\" not in result.upstream_path
    if host.regional:
        assert result.target == "none"


@given(st.sampled_from(["environments/staging", "production", "deployment/v1", "development"]),
       st.sampled_from(["predict", "wake", "sync/v1/models"]), st.sampled_from(["", "?a=1", "?x=%2F%2e%2e"]))  # fmt: skip
def test_encoding_unreserved_characters_never_changes_the_route(prefix: str, endpoint: str, query: str) -> None:
    def enc(text: str) -> str:
        return "".join(f"%{ord(c):02X}" if c.isalpha() else c for c in text)

    plain = f"/{prefix}/{endpoint}{query}"
    encoded = f"/{enc(prefix)}/{enc(endpoint)}{query}"
    a, b = parse_path(encoded, STD), parse_path(plain, STD)
    assert (a.target, a.name, a.endpoint, a.query) == (b.target, b.name, b.endpoint, b.query)
    if endpoint.startswith("sync/"):  # the <rest> of sync/ is forwarded as received (SPEC §2)
        assert a.upstream_path == "/" + enc("v1/models")
    else:
        assert a.upstream_path == b.upstream_path


@given(st.text(st.sampled_from(list("abc./%2eE5cC\\")), max_size=12))
def test_a_rejected_segment_stays_rejected_when_encoded(segment: str) -> None:
    """Encoding a path can only turn an accepted form into the same route, never a rejected one into a route."""
    target = f"/production/{segment}/predict"
    try:
        parse_path(target, STD)
        accepted = True
    except GatewayError:
        accepted = False
    encoded = "/production/" + "".join(f"%{ord(c):02X}" if c in "." else c for c in segment) + "/predict"
    if not accepted:
        with pytest.raises(GatewayError):
            parse_path(encoded, STD)
