"""Pure parsing of the Host header and request target (SPEC §1, §2).

Nothing here looks at a routing table beyond the set of base domains: these
functions turn strings into a `HostTarget` / `PathTarget` or raise a typed
`GatewayError`. They never return anything else.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from gateway.errors import ClientError, EndpointNotFound, MethodNotAllowed, ModelNotFound

MAX_ENV_LEN = 40
ENV_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\Z")
MODEL_ID = re.compile(r"[a-z0-9]{1,32}\Z")
REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,128}\Z")
TARGET_PREFIXES = frozenset({"environments", "production", "development", "deployment"})

# endpoint -> allowed methods, per model kind (SPEC §2). `sync` takes any method.
_COMMON = {"async_queue_status": ("GET",), "wake": ("POST",), "websocket": ("GET",)}
ENDPOINTS = {
    "model": {"predict": ("POST",), "async_predict": ("POST",), **_COMMON},
    "chain": {"run_remote": ("POST",), "async_run_remote": ("POST",), **_COMMON},
}
ASYNC_ENDPOINTS = frozenset(
    {"async_predict", "async_run_remote", "async_queue_status", "async_request", "async_result"}
)
REQUEST_ENDPOINTS = frozenset({"async_request", "async_result"})  # /async_request/<id>[/result]: no target

# RFC 3986 §2.3 unreserved characters: the only escapes decoded before matching (§6.2.2.2).
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
# Separators a plane might honour inside `sync/<rest>` once it decodes the path.
_REST_SPLIT = re.compile(r"/|\\|%2[Ff]|%5[Cc]")


def is_env_name(name: str) -> bool:
    return len(name) <= MAX_ENV_LEN and ENV_NAME.match(name) is not None


class HostTarget(NamedTuple):
    kind: str  # "model" | "chain"
    id: str
    env: str | None  # set on regional hosts only
    grpc: bool = False

    @property
    def regional(self) -> bool:
        return self.env is not None


class PathTarget(NamedTuple):
    target: str  # "environment" | "deployment" | "development" | "none" (regional or async_request)
    name: str  # environment name, deployment id, or "" (development / regional)
    endpoint: str  # "predict", "sync", "async_request", ...
    upstream_path: str  # what the plane receives, before the query string
    query: str  # "" or "?..." exactly as received
    request_id: str = ""  # for async_request/<id>


def parse_host(host: str | None, domains: frozenset[str]) -> HostTarget:
    """Match `host` against the §1 forms under one of `domains`; 404 otherwise."""
    if not host:
        raise ClientError("missing Host header")
    h = host.lower()
    colon = h.rfind(":")
    if colon != -1:
        port = h[colon + 1 :]
        if not port.isdigit() or not port.isascii():
            raise _no_such_host(host)
        h = h[:colon]
    if h.endswith("."):
        h = h[:-1]
    label, dot, rest = h.partition(".")
    if not dot:
        raise _no_such_host(host)
    grpc = False
    if rest not in domains:
        # Exact set membership on what follows the first label defeats prefix tricks
        # such as model-abc.api.example.com.evil.net.
        if not (rest.startswith("grpc.") and rest[5:] in domains):
            raise _no_such_host(host)
        grpc = True
    kind, dash, ident = label.partition("-")
    if not dash or kind not in ("model", "chain") or (grpc and kind != "model"):
        raise _no_such_host(host)
    ident, dash, env = ident.partition("-")
    if not MODEL_ID.match(ident) or (dash and not is_env_name(env)):
        raise _no_such_host(host)
    return HostTarget(kind, ident, env if dash else None, grpc)


def _no_such_host(host: str) -> ModelNotFound:
    return ModelNotFound(f"no model is served at host '{host[:255]}'")


def _decode_unreserved(segment: str) -> str:
    if "%" not in segment:
        return segment
    return _ESCAPE.sub(lambda m: chr(v) if (v := int(m.group(1), 16)) in _UNRESERVED else m.group(0), segment)


def _routing_segment(raw: str) -> str:
    low = raw.lower()
    if "%2f" in low or "%5c" in low or "\\" in raw:
        raise ClientError("encoded slashes and backslashes are not allowed in the routing part of a path")
    seg = _decode_unreserved(raw)
    if seg in ("", ".", ".."):
        what = "empty segments" if not seg else "dot segments"
        raise ClientError(f"{what} are not allowed in the routing part of a path")
    return seg


def _check_rest(rest: str) -> None:
    for piece in _REST_SPLIT.split(rest):
        if _decode_unreserved(piece) in (".", ".."):
            raise ClientError("dot segments are not allowed in a sync path")


def split_target(target: str) -> tuple[str, str]:
    """Split a request-target into (path, query); the query keeps its '?' and bytes."""
    path, qmark, query = target.partition("?")
    if not path.startswith("/"):
        raise ClientError("request target must be an absolute path")
    return path, qmark + query


def parse_path(target: str, host: HostTarget) -> PathTarget:
    """Parse the request-target for `host` (SPEC §2); raises 400/404 `client_error`."""
    path, query = split_target(target)
    raw = path[1:].split("/")
    first = _routing_segment(raw[0])
    if host.regional:
        if first in TARGET_PREFIXES:
            raise ClientError(
                f"regional hosts take the environment from the hostname; drop the '/{first}/...' prefix "
                f"and call /<endpoint> (e.g. /predict) on '{host.kind}-{host.id}-{host.env}'"
            )
        return _endpoint(raw, 0, "none", "", host.kind, query)
    if first in ("production", "development"):
        kind = "environment" if first == "production" else "development"
        return _endpoint(raw, 1, kind, first if first == "production" else "", host.kind, query)
    if first in ("environments", "deployment"):
        if len(raw) < 3:
            raise EndpointNotFound(f"'/{first}/' must be followed by a name and an endpoint")
        name = _routing_segment(raw[1])
        if first == "environments" and not is_env_name(name):
            raise ClientError(f"invalid environment name '{name[:64]}'")
        return _endpoint(raw, 2, "environment" if first == "environments" else "deployment", name, host.kind, query)
    if first == "async_request":
        return _endpoint(raw, 0, "none", "", host.kind, query)
    raise EndpointNotFound(
        "unknown path; use /production/<endpoint>, /environments/<env>/<endpoint>, "
        "/development/<endpoint> or /deployment/<id>/<endpoint>"
    )


def _endpoint(raw: list[str], i: int, target: str, name: str, kind: str, query: str) -> PathTarget:
    if i >= len(raw):
        raise EndpointNotFound("missing endpoint")
    endpoint = _routing_segment(raw[i])
    if endpoint == "sync":
        rest = "/".join(raw[i + 1 :])
        _check_rest(rest)
        return PathTarget(target, name, "sync", "/" + rest, query)
    for seg in raw[i + 1 :]:
        _routing_segment(seg)  # dot and empty segments are 400 even where the path is too long
    if endpoint == "async_request" and target == "none":
        result = len(raw) == i + 3 and raw[i + 2] == "result"
        if not (len(raw) == i + 2 or result) or not REQUEST_ID.match(raw[i + 1]):
            raise EndpointNotFound("expected /async_request/<request_id> or /async_request/<request_id>/result")
        return PathTarget(target, name, "async_result" if result else endpoint, "", query, request_id=raw[i + 1])
    if endpoint not in ENDPOINTS[kind] or len(raw) != i + 1:
        raise EndpointNotFound(f"unknown endpoint '/{'/'.join(raw[i:])[:128]}' for a {kind}")
    return PathTarget(target, name, endpoint, "/" + endpoint, query)


def check_method(method: str, endpoint: str, kind: str) -> None:
    """405 with an Allow header when `method` is not allowed on `endpoint`."""
    if endpoint == "sync":
        return
    if endpoint == "async_request":
        allowed: tuple[str, ...] = ("GET", "DELETE")
    elif endpoint == "async_result":
        allowed = ("GET",)
    else:
        allowed = ENDPOINTS[kind][endpoint]
    if method not in allowed:
        raise MethodNotAllowed(f"method {method} is not allowed on '{endpoint}'", allowed)
