"""The admin listener (SPEC §11): health, readiness, metrics, routing table, and the §6 environments API."""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from gateway.errors import EndpointNotFound, GatewayError, MethodNotAllowed, Unauthorized
from gateway.http.server import Request
from gateway.metrics import Metrics
from gateway.state import TableState

if TYPE_CHECKING:
    from gateway.asyncq.service import AsyncService, QueueFiles

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
PROMETHEUS_TEXT = b"text/plain; version=0.0.4; charset=utf-8"


class AdminApi(Protocol):
    """A part of the admin API mounted under its own paths (the §6 environments API, `EnvironmentsApi`)."""

    def handles(self, path: str) -> bool: ...

    async def __call__(self, req: Request, path: str) -> tuple[int, object]: ...


def json_body(obj: object) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n"


class AdminHandler:
    def __init__(
        self,
        state: TableState,
        metrics: Metrics,
        token: str | None,
        ready: Callable[[], bool],
        environments: AdminApi | None = None,
    ) -> None:
        self.state = state
        self.environments = environments
        self.metrics = metrics
        self.token = token
        self.ready = ready
        self.describe_extra: Callable[[], dict] | None = None  # e.g. the supervisor's per-worker view
        self.routes: dict[str, dict[str, Callable[[Request], Awaitable[tuple[int, object]]]]] = {
            "/healthz": {"GET": self._healthz},
            "/readyz": {"GET": self._readyz},
            "/v1/routing": {"GET": self._routing},
            "/v1/routing/reload": {"POST": self._reload},
        }

    def serve_async(self, service: AsyncService | QueueFiles) -> None:
        """`GET /v1/async/queues`: the worker's async queues (SPEC §10)."""

        async def queues(req: Request) -> tuple[int, object]:
            return 200, service.queues()

        self.routes["/v1/async/queues"] = {"GET": queues}

    async def __call__(self, req: Request) -> None:
        path = req.target.partition("?")[0]
        try:
            if path not in OPEN_PATHS:
                self._authorize(req)
            if path == "/metrics" and req.method == "GET":
                req.conn.send_simple(200, self.metrics.render(), content_type=PROMETHEUS_TEXT)
                return
            if self.environments is not None and self.environments.handles(path):
                status, body = await self.environments(req, path)
                req.conn.send_simple(status, json_body(body))
                return
            methods = self.routes.get(path)
            if methods is None:
                raise EndpointNotFound(f"no admin endpoint '{path[:128]}'")
            handler = methods.get(req.method)
            if handler is None:
                raise MethodNotAllowed(f"method {req.method} is not allowed on '{path}'", tuple(methods))
            status, body = await handler(req)
        except GatewayError as error:
            req.conn.send_error(error)
            return
        req.conn.send_simple(status, json_body(body))

    def _authorize(self, req: Request) -> None:
        if self.token is None:
            return  # only possible on a loopback admin listener (enforced at start)
        given = req.authorization or ""
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self.token.encode()):
            raise Unauthorized("admin calls need 'Authorization: Bearer <admin token>'")

    async def _healthz(self, req: Request) -> tuple[int, object]:
        return 200, {"status": "ok"}

    async def _readyz(self, req: Request) -> tuple[int, object]:
        if self.ready():
            body = {"status": "ready", "table": self.state.table.digest}
            fleet = self.state.store_status()  # fleet mode: still ready (serving) when the store is unreachable
            if fleet:
                body.update(store=fleet["store"]["state"], serving_from=fleet["store"]["serving_from"])
            return 200, body
        return 503, {"status": "starting"}

    async def _routing(self, req: Request) -> tuple[int, object]:
        return 200, self.describe()

    def describe(self) -> dict:
        body = self.state.describe()
        if self.describe_extra is not None:
            body.update(self.describe_extra())
        return body

    async def _reload(self, req: Request) -> tuple[int, object]:
        result = await self.state.reload("admin call")
        body = {"ok": result.ok, "changed": result.changed, "problems": list(result.problems)}
        body.update(self.describe())
        return (200 if result.ok else 422), body
