"""The admin listener (SPEC §11): health, readiness, metrics, routing table, and the §6 environments API.

Every call is dispatched from the one route list (`gateway.admin.routes`), which the OpenAPI document
(`GET /v1/openapi.json`) is written from; who may make it is `gateway.admin.access.decide`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.admin import openapi
from gateway.admin.access import CALLER, Access, Caller, admin_caller, decide, refuse
from gateway.admin.routes import ROUTES, Handler, match
from gateway.errors import EndpointNotFound, GatewayError, MethodNotAllowed
from gateway.http.server import Request
from gateway.metrics import Metrics
from gateway.state import TableState

if TYPE_CHECKING:
    from gateway.asyncq.service import AsyncService, QueueFiles

PROMETHEUS_TEXT = b"text/plain; version=0.0.4; charset=utf-8"
OPEN_PATHS = frozenset(route.path for route in ROUTES if route.access is Access.OPEN)


@dataclass(frozen=True, slots=True)
class Raw:
    """A body that is not JSON (the Prometheus text)."""

    content: bytes
    content_type: bytes


def json_body(obj: object) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n"


class AdminHandler:
    """`parts`: the handlers by route name of the other admin APIs (environments, keys, promotions)."""

    def __init__(
        self,
        state: TableState,
        metrics: Metrics,
        token: str | None,
        ready: Callable[[], bool],
        parts: Mapping[str, Handler] | None = None,
    ) -> None:
        self.state = state
        self.metrics = metrics
        self.token = token
        self.ready = ready
        self.describe_extra: Callable[[], dict] | None = None  # e.g. the supervisor's per-worker view
        self.handlers: dict[str, Handler] = {
            "healthz": self._healthz,
            "readyz": self._readyz,
            "metrics": self._metrics,
            "openapi": self._openapi,
            "routing": self._routing,
            "reload": self._reload,
            **(parts or {}),
        }

    def serve_async(self, service: AsyncService | QueueFiles) -> None:
        """`GET /v1/async/queues`: the worker's async queues (SPEC §10)."""

        async def queues(req: Request) -> tuple[int, object]:
            return 200, await service.queues()

        self.handlers["async_queues"] = queues

    async def __call__(self, req: Request) -> None:
        path = req.target.partition("?")[0]
        try:
            try:
                route, args = match(path, req.method)
            except (EndpointNotFound, MethodNotAllowed):
                if path not in OPEN_PATHS:
                    self.caller(req)  # 401 first: what exists is not shown to a caller without credentials
                raise
            handler = self.handlers.get(route.handler)
            if route.access is not Access.OPEN:
                caller = self.caller(req)
                refuse(decide(caller, route.access, self._model(route.access, args)))
                CALLER.set(caller)
            if handler is None:
                raise EndpointNotFound(f"'{path[:128]}' is not served by this gateway")
            status, body = await handler(req, *args)
        except GatewayError as error:
            req.conn.send_error(error)
            return
        if isinstance(body, Raw):
            req.conn.send_simple(status, body.content, content_type=body.content_type)
        else:
            req.conn.send_simple(status, json_body(body))

    def caller(self, req: Request) -> Caller:
        return admin_caller(self.state.table, self.token, req.authorization)

    def _model(self, access: Access, args: tuple[str, ...]) -> tuple[str, str] | None:
        """(team, id) of the model a MODEL route names (its first path argument), if it exists."""
        if access is not Access.MODEL:
            return None
        model = self.state.table.models.get(args[0])
        return (model.team, model.id) if model is not None else None

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

    async def _metrics(self, req: Request) -> tuple[int, object]:
        return 200, Raw(self.metrics.render(), PROMETHEUS_TEXT)

    async def _openapi(self, req: Request) -> tuple[int, object]:
        return 200, openapi.document()

    async def _routing(self, req: Request) -> tuple[int, object]:
        return 200, self.describe()

    def describe(self) -> dict[str, Any]:
        body = self.state.describe()
        if self.describe_extra is not None:
            body.update(self.describe_extra())
        return body

    async def _reload(self, req: Request) -> tuple[int, object]:
        result = await self.state.reload("admin call")
        body = {"ok": result.ok, "changed": result.changed, "problems": list(result.problems)}
        body.update(self.describe())
        return (200 if result.ok else 422), body
