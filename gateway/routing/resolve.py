"""The routing decision: `resolve(table, call) -> Route`, pure and synchronous.

Order of checks (each raises a typed `GatewayError`):
host form (404) -> path form (400/404) -> method (405) -> API key (401) ->
model and team (404, other teams' models are not revealed) -> regional mapping (404)
-> gateway region (421) -> key scope (403) -> environment/deployment (404) ->
regional guarantee (503, never another region) -> deployment status (503 inactive;
a scaled-to-zero deployment gives action "hold").
"""

from __future__ import annotations

import hashlib
import re
from typing import NamedTuple

from gateway.auth import authenticate
from gateway.errors import (
    ClientError,
    Forbidden,
    MisdirectedRequest,
    ModelNotFound,
    ModelNotReady,
    ModelUnavailable,
)
from gateway.routing.hostpath import (
    ASYNC_ENDPOINTS,
    REQUEST_ENDPOINTS,
    HostTarget,
    PathTarget,
    check_method,
    is_env_name,
    parse_host,
    parse_path,
)
from gateway.routing.model import ApiKey, Deployment, Model, Table


class Call(NamedTuple):
    """What the router needs to know of an incoming call."""

    method: str
    host: str | None
    target: str  # raw request-target: path and optional ?query, as received
    authorization: str | None = None
    routing_key: str | None = None  # x-baseten-routing-key


class Route(NamedTuple):
    action: str  # "proxy" | "hold" (scaled to zero) | "wake" | "grpc"
    model: Model
    environment: str  # "" for deployment/ and development targets (SPEC §4)
    deployment: Deployment
    endpoint: str
    upstream_target: str  # path + query the plane receives
    region: str | None  # the region a regional call is pinned to; None on standard hosts
    api_key: ApiKey
    side: str = "primary"  # which part of the environment's split answers: primary, canary or candidate

    @property
    def canary(self) -> bool:
        return self.side == "canary"

    @property
    def upstream_url(self) -> str:
        dep = self.deployment
        base = dep.endpoints[0] if dep.endpoints else dep.plane.url
        return base.base_url + self.upstream_target


class RequestLookup(NamedTuple):
    """A call about one stored async request (`/async_request/<id>[/result]`, SPEC §10)."""

    action: str  # "async_lookup"
    model: Model  # the host's model: the request must be of it, and of the key's team
    region: str | None  # a regional host's region (only its store is searched); None: every served region
    api_key: ApiKey
    endpoint: str  # "async_request" (GET status, DELETE cancel) | "async_result"
    request_id: str


class GrpcCall(NamedTuple):
    """What the router needs to know of an incoming gRPC call (SPEC §9)."""

    authority: str | None
    method: str  # "/package.Service/Method"
    authorization: str | None = None  # `authorization` or `baseten-authorization` metadata
    environment: str | None = None  # x-baseten-environment metadata
    deployment: str | None = None  # x-baseten-deployment metadata
    routing_key: str | None = None


GRPC_METHOD = re.compile(r"/[A-Za-z_][A-Za-z0-9_.]*/[A-Za-z_][A-Za-z0-9_]*\Z")


def resolve(table: Table, call: Call) -> Route | RequestLookup:
    host = parse_host(call.host, table.domains)
    if host.grpc:
        raise ModelNotFound(f"'{call.host}' is a gRPC host: call it on the gateway's gRPC listener")
    path = parse_path(call.target, host)
    check_method(call.method, path.endpoint, host.kind)
    key = authenticate(table, call.authorization)
    model = table.models.get(host.id)
    if model is None or model.team != key.team or model.kind != host.kind:
        raise ModelNotFound(f"{host.kind} '{host.id}' not found")
    region = _pinned_region(table, model, host)
    if key.models is not None and model.id not in key.models:
        raise Forbidden(f"this API key may not call {model.kind} '{model.id}'")
    if path.endpoint in REQUEST_ENDPOINTS:
        return RequestLookup("async_lookup", model, region, key, path.endpoint, path.request_id)
    env_name, deployment, side = _target(model, host, path, key, call.routing_key)
    if region is not None and deployment.region != region:
        # Validated in the table already; checked again so no code path can leave the region.
        raise ModelUnavailable(f"no deployment of environment '{env_name}' is available in region '{region}'")
    if path.endpoint in ASYNC_ENDPOINTS:
        return _async_route(table, model, env_name, deployment, path, region, key, side)
    if path.endpoint == "wake":
        action = "wake"
    elif deployment.status == "scaled_to_zero":
        action = "hold"  # held while the plane wakes it (SPEC §6); the caller re-resolves on release
    else:
        _check_status(deployment)
        action = "proxy"
    return Route(action, model, env_name, deployment, path.endpoint, path.upstream_path + path.query, region, key, side)


def resolve_grpc(table: Table, call: GrpcCall) -> Route:
    """The decision for a gRPC call: target from `:authority`, environment from metadata (SPEC §9)."""
    host = parse_host(call.authority, table.domains)
    if not host.grpc:
        raise ModelNotFound(f"'{call.authority}' is not a gRPC host: use model-<id>[-<env>].grpc.<domain>")
    if not GRPC_METHOD.match(call.method):
        raise ClientError("malformed gRPC method path: expected /<package.Service>/<Method>")
    if host.regional and (call.environment is not None or call.deployment is not None):
        raise ClientError(
            "regional gRPC hosts take the environment from the hostname; "
            "drop the x-baseten-environment / x-baseten-deployment metadata"
        )
    if call.environment is not None and call.deployment is not None:
        raise ClientError("send x-baseten-environment or x-baseten-deployment, not both")
    key = authenticate(table, call.authorization)
    model = table.models.get(host.id)
    if model is None or model.team != key.team or model.kind != "model":
        raise ModelNotFound(f"model '{host.id}' not found")
    region = _pinned_region(table, model, host)
    if key.models is not None and model.id not in key.models:
        raise Forbidden(f"this API key may not call model '{model.id}'")
    if call.deployment is not None:
        path = PathTarget("deployment", call.deployment, "grpc", call.method, "")
    elif host.regional:
        path = PathTarget("none", "", "grpc", call.method, "")
    else:
        env = call.environment or "production"
        if not is_env_name(env):
            raise ClientError(f"invalid environment name '{env[:64]}' in x-baseten-environment")
        path = PathTarget("environment", env, "grpc", call.method, "")
    env_name, deployment, side = _target(model, host, path, key, call.routing_key)
    if region is not None and deployment.region != region:
        raise ModelUnavailable(f"no deployment of environment '{env_name}' is available in region '{region}'")
    if deployment.plane.grpc is None:
        raise ModelUnavailable(f"plane '{deployment.plane.name}' has no gRPC address")
    if deployment.status == "scaled_to_zero":
        action = "hold"  # held while the plane wakes it (SPEC §6), like an HTTP call
    else:
        _check_status(deployment)
        action = "grpc"
    return Route(action, model, env_name, deployment, "grpc", call.method, region, key, side)


def _async_route(
    table: Table, model: Model, env_name: str, deployment: Deployment, path: PathTarget, pinned: str | None,
    key: ApiKey, side: str,
) -> Route:  # fmt: skip
    """An async submit or queue-status call (SPEC §10). Its `region` is the region whose store keeps
    the request: the pinned one, the team's mapping of the environment, else the deployment's; a
    gateway that does not serve that region answers 421 (residency at rest)."""
    mapped = table.teams[model.team].regional_environments.get(env_name) if env_name else None
    region = pinned or mapped or deployment.region
    if deployment.region != region:
        raise ModelUnavailable(f"no deployment of environment '{env_name}' is available in region '{region}'")
    if table.gateway.regions is not None and region not in table.gateway.regions:
        raise MisdirectedRequest(
            f"this gateway does not serve region '{region}'; call the gateway of region '{region}'"
        )
    if path.endpoint != "async_queue_status" and deployment.status == "inactive":
        raise ModelUnavailable(f"deployment '{deployment.id}' is inactive")
    action = "async_status" if path.endpoint == "async_queue_status" else "async"
    return Route(action, model, env_name, deployment, path.endpoint, _run_path(model), region, key, side)


def resolve_async_run(table: Table, model_id: str, environment: str, deployment_id: str, region: str,
                      caller: str) -> Route:  # fmt: skip
    """The route of a stored async request when it runs (SPEC §10): its environment's deployment
    now (a promotion or canary since the submit applies; the same caller keeps its side), or the
    deployment it named; always in the request's region. Raises like `resolve`."""
    model = table.models.get(model_id)
    if model is None:
        raise ModelNotFound(f"model '{model_id}' no longer exists")
    key = ApiKey("async", model.team, b"")
    if environment:
        path = PathTarget("environment", environment, "predict", "", "")
    else:
        path = PathTarget("deployment", deployment_id, "predict", "", "")
    env_name, deployment, side = _target(model, HostTarget(model.kind, model.id, None), path, key, caller)
    if deployment.region != region:
        raise ModelUnavailable(f"no deployment of environment '{env_name}' is available in region '{region}'")
    if deployment.status == "scaled_to_zero":
        action = "hold"
    else:
        _check_status(deployment)
        action = "proxy"
    return Route(action, model, env_name, deployment, "predict", _run_path(model), region, key, side)


def _run_path(model: Model) -> str:
    """What the plane of an async call receives: the model's predict, or the chain's run_remote."""
    return "/run_remote" if model.kind == "chain" else "/predict"


def _pinned_region(table: Table, model: Model, host: HostTarget) -> str | None:
    if host.env is None:
        return None
    region = table.teams[model.team].regional_environments.get(host.env)
    if region is None:
        raise ModelNotFound(f"environment '{host.env}' has no regional endpoint")
    if table.gateway.regions is not None and region not in table.gateway.regions:
        raise MisdirectedRequest(
            f"this gateway does not serve region '{region}'; call the gateway of region '{region}'"
        )
    return region


def _target(
    model: Model, host: HostTarget, path: PathTarget, key: ApiKey, routing_key: str | None
) -> tuple[str, Deployment, str]:
    if path.target in ("deployment", "development"):
        if key.environments is not None:
            raise Forbidden("this API key is limited to environments and may not call deployments directly")
        dep = model.development if path.target == "development" else model.deployments.get(path.name)
        if dep is None:
            what = "development deployment" if path.target == "development" else f"deployment '{path.name}'"
            raise ModelNotFound(f"{model.kind} '{model.id}' has no {what}")
        return "", dep, "primary"
    env_name = host.env if host.env is not None else path.name
    if key.environments is not None and env_name not in key.environments:
        raise Forbidden(f"this API key may not call environment '{env_name}'")
    env = model.environments.get(env_name)
    if env is None:
        raise ModelNotFound(f"environment '{env_name}' of {model.kind} '{model.id}' not found")
    if env.deployment is None:
        raise ModelNotFound(f"environment '{env_name}' of {model.kind} '{model.id}' has no deployment yet")
    caller = routing_key or key.name
    candidate = env.candidate
    if candidate is not None and in_canary(candidate.percent, model.id, env_name, caller, salt="promotion"):
        return env_name, candidate.deployment, "candidate"
    if env.canary is not None and in_canary(env.canary.percent, model.id, env_name, caller):
        return env_name, env.canary.deployment, "canary"
    return env_name, env.deployment, "primary"


def canary_bucket(model_id: str, env: str, caller: str, salt: str = "") -> int:
    """A stable bucket in [0, 10000) for a caller: same caller, same side (SPEC §6).

    A promotion's ramp uses its own salt, so its split is independent of a canary's.
    """
    h = hashlib.blake2b(f"{model_id}\0{env}\0{caller}".encode(), digest_size=8, salt=salt.encode()[:16]).digest()
    return int.from_bytes(h, "big") % 10000


def in_canary(percent: float, model_id: str, env: str, caller: str, salt: str = "") -> bool:
    """Whether a caller falls in the first `percent` of the buckets (a growing ramp keeps its callers)."""
    return canary_bucket(model_id, env, caller, salt) < round(percent * 100)


def _check_status(dep: Deployment) -> None:
    if dep.status == "inactive":
        raise ModelUnavailable(f"deployment '{dep.id}' is inactive")
    if dep.status == "scaled_to_zero":
        raise ModelNotReady(
            f"deployment '{dep.id}' is scaled to zero; POST .../wake to wake it and retry",
            headers=(("retry-after", "30"),),
        )
