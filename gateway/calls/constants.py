"""Per-route constants every adapter sends or counts with: metric labels and identity fields (SPEC §4, §9).

Built once per (model, environment, deployment) of the serving table, on its first call, and
shared by every protocol adapter; a table swap starts a new set (a call in flight keeps the
constants of its own table). Built lazily rather than when the table compiles: a 100,000-model
table would otherwise hold a dozen tuples per environment that most will never use (issue 10's
memory goal, 150 MiB per worker).
"""

from __future__ import annotations

from typing import NamedTuple

from gateway.routing.model import Upstream
from gateway.routing.resolve import Route

MAX_ENTRIES = 65536  # past this, the set starts again (a bound, not an eviction policy)
PROTOCOLS = ("http", "websocket", "grpc")


class RouteConstants(NamedTuple):
    labels: dict[str, tuple]  # protocol -> (model, environment, deployment, region, protocol)
    identity: bytes  # x-baseten-model-id / -environment / -deployment-id header lines (HTTP/1.1)
    grpc_identity: tuple[tuple[bytes, bytes], ...]  # the same as gRPC metadata


class Constants:
    """The constants of the routes served so far from one table."""

    def __init__(self) -> None:
        self.by_route: dict[tuple[str, str, str], RouteConstants] = {}
        self.hosts: dict[Upstream, bytes] = {}

    def __repr__(self) -> str:
        return f"<Constants {len(self.by_route)} routes | {len(self.hosts)} hosts>"

    def of(self, route: Route) -> RouteConstants:
        dep = route.deployment
        key = (route.model.id, route.environment, dep.id)
        found = self.by_route.get(key)
        if found is None:
            if len(self.by_route) >= MAX_ENTRIES:
                self.by_route = {}
            model, env, dep_id = (part.encode() for part in key)
            found = self.by_route[key] = RouteConstants(
                {protocol: (*key[:2], dep.id, dep.region, protocol) for protocol in PROTOCOLS},
                b"x-baseten-model-id: %s\r\nx-baseten-environment: %s\r\nx-baseten-deployment-id: %s\r\n"
                % (model, env, dep_id),
                ((b"x-baseten-model-id", model), (b"x-baseten-environment", env), (b"x-baseten-deployment-id", dep_id)),
            )
        return found

    def host_line(self, up: Upstream) -> bytes:
        """`host: <authority>` for requests to `up` (HTTP/1.1 planes)."""
        line = self.hosts.get(up)
        if line is None:
            if len(self.hosts) >= MAX_ENTRIES:
                self.hosts = {}
            line = self.hosts[up] = b"host: %s\r\n" % up.authority.encode()
        return line
