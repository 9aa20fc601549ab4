"""Which client header fields may reach a plane, for every protocol (issue 9), pure.

HTTP/1.1 and gRPC metadata both use these rules, so a plane sees the same identity whatever
protocol the call came in on.
"""

from __future__ import annotations

import functools
import re

from gateway.errors import ClientError, GatewayError
from gateway.routing.hostpath import parse_host

# Fields the gateway itself sets towards the plane (SPEC §4, §9), replacing any the client sent,
# and the credentials it never forwards.
IDENTITY = frozenset(
    {
        b"x-baseten-model-id", b"x-baseten-environment", b"x-baseten-deployment-id", b"x-baseten-request-id",
        b"x-baseten-deployment", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded",
    }
)  # fmt: skip
CREDENTIALS = frozenset({b"authorization", b"proxy-authorization", b"baseten-authorization"})
# What a proxy in front of a plane would set, which a client could otherwise forge (nginx's
# `$remote_addr`-based set, RFC 7239's Forwarded): the gateway is the edge, so a client's own
# values are dropped. `Forwarded` is replaced (`forwarded_value`), like the X-Forwarded-* set.
CLIENT_PROXY = frozenset(
    {
        b"x-real-ip", b"x-forwarded-port", b"x-forwarded-prefix", b"x-forwarded-server", b"x-forwarded-scheme",
        b"x-forwarded-ssl", b"x-original-url", b"x-rewrite-url", b"x-original-forwarded-for", b"true-client-ip",
        b"x-client-ip", b"x-cluster-client-ip",
    }
)  # fmt: skip
PROTECTED = IDENTITY | CREDENTIALS | CLIENT_PROXY


def shadows_protected(name: bytes) -> bool:
    """True for a (lowercased) field name that differs from a protected one only by `_` for `-`.

    CGI/WSGI-style planes map both to the same variable (`HTTP_X_BASETEN_MODEL_ID`), so
    `x_baseten_model_id` would reach them as the identity header itself. nginx drops every name
    with an underscore by default (`underscores_in_headers off`); only the colliding ones go here.
    """
    return b"_" in name and name.replace(b"_", b"-") in PROTECTED


def dropped(name: bytes) -> bool:
    """A (lowercased) client field that never reaches a plane as sent."""
    return name in PROTECTED or shadows_protected(name)


_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")


def _forwarded_part(value: bytes) -> bytes:
    if _TOKEN.match(value):
        return value
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


FORWARDED_KEPT = 1024  # (peer, host, scheme) whose Forwarded value is kept


@functools.lru_cache(maxsize=FORWARDED_KEPT)
def forwarded_value(peer: str, host: str | None, scheme: str) -> bytes:
    """The `Forwarded` field the gateway sends (RFC 7239 §4), for the client it is answering.

    IPv6 addresses are bracketed and quoted (§6); a host with a port is quoted (":" is not a token
    character). Kept per (peer, host, scheme), the last FORWARDED_KEPT of them, for every protocol:
    a client's peer and host rarely change between its calls, and an HTTP/2 stream (a connection of
    its own to the proxy) built it per call, two regex matches and three encodes (~6 µs of profiled
    time per HTTP/2 call, benchmarks/run_h2.py's load).
    """
    node = f"[{peer}]" if ":" in peer else (peer or "unknown")
    parts = [b"for=" + _forwarded_part(node.encode("latin-1"))]
    if host:
        parts.append(b"host=" + _forwarded_part(host.encode("latin-1")))
    parts.append(b"proto=" + scheme.encode("ascii"))
    return b";".join(parts)


def normal_host(host: str) -> str:
    """A host as §1 matches it: lowercased, without a `:port` or one trailing dot."""
    h = host.lower()
    if h.startswith("["):  # an IPv6 literal: [::1]:8080
        end = h.find("]")
        return h[: end + 1] if end != -1 else h
    colon = h.rfind(":")
    if colon != -1:
        h = h[:colon]
    return h[:-1] if h.endswith(".") else h


def absolute_form(target: str, host: str | None) -> tuple[str, str] | None:
    """An absolute-form request target (RFC 9112 §3.2.2, as HTTP proxy clients send them):
    `http://authority/path?query` -> (authority, "/path?query"); None for an origin-form target.

    The authority is the host that routes. A `Host` field that names another host is refused (400),
    as are another scheme, userinfo (`user@`) and an empty authority; a missing path is "/".
    """
    if target.startswith("/") or "://" not in target[:9]:
        return None
    scheme, _, rest = target.partition("://")
    if scheme.lower() not in ("http", "https"):
        raise ClientError(f"request target scheme '{scheme[:16]}' is not http or https")
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i != -1), default=len(rest))
    authority, path = rest[:cut], rest[cut:]
    if not authority or "@" in authority:
        raise ClientError("the request target's authority must be a host[:port], without user information")
    if host is not None and normal_host(host) != normal_host(authority):
        raise ClientError("the Host header names another host than the request target")
    return authority, path if path.startswith("/") else "/" + path


def misdirected(sni: str | None, host: str | None, domains: frozenset[str]) -> bool:
    """True when TLS SNI names another model host than the one the request routes by (RFC 9110
    §15.5.20: 421 Misdirected Request).

    Only an SNI that is itself a §1 host under a listed domain counts: a client that connected by
    IP address sends none, and one that named a generic host (a load balancer's, a wildcard
    certificate's) asked for no model. Connection coalescing (RFC 9113 §9.1.1) is the honest
    reason for a mismatch, and 421 is its answer: the client retries on a connection of its own.
    """
    if not sni or not host:
        return False
    sni_host = normal_host(sni)
    if sni_host == normal_host(host):
        return False
    try:
        parse_host(sni_host, domains)
    except GatewayError:
        return False  # not a model host: nothing it could be misdirected from
    return True
