"""The public listener's handler: resolve, then forward (or answer) one call."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl

from gateway.errors import ClientError, GatewayError, NotImplementedYet
from gateway.http.proxy import MAX_BODY_BYTES, Exchange, body_limit_error, new_request_id, request_head
from gateway.http.server import Request
from gateway.metrics import Metrics
from gateway.routing.model import Deployment, Plane, Table, Upstream
from gateway.routing.resolve import Call, Route, resolve
from gateway.state import TableState
from gateway.upstream.pool import Pool, UpstreamConnection

log = logging.getLogger("gateway.public")
UNROUTED = ("", "", "", "")


class PublicHandler:
    def __init__(self, state: TableState, pool: Pool, metrics: Metrics, scheme: str = "http") -> None:
        self.state = state
        self.pool = pool
        self.metrics = metrics
        self.scheme = scheme
        self.identity: dict[tuple, bytes] = {}  # per-table cache of the identity header block
        self.ssl_contexts: dict[str, ssl.SSLContext] = {}
        self.rr = 0
        self.background: set[asyncio.Task] = set()
        state.on_swap.append(self._table_swapped)

    def _table_swapped(self, table: Table) -> None:
        self.identity = {}
        self.ssl_contexts = {}

    async def __call__(self, req: Request) -> None:
        request_id = new_request_id()
        loop = req.conn.loop
        started = loop.time()
        table = self.state.table  # one snapshot for the whole call
        try:
            route = resolve(table, Call(req.method, req.host, req.target, req.authorization, req.routing_key))
            self._admit(req, route)
        except GatewayError as error:
            self._answer_error(req, error, request_id, UNROUTED, started)
            return
        labels = (route.model.id, route.environment, route.deployment.id, route.deployment.region, "http")
        if route.action == "wake":
            self._wake(req, route, request_id)
            self._observe(labels, 202, started)
            return
        inflight = self.metrics.inflight
        inflight.inc(labels)
        try:
            status = await self._forward(req, route, request_id)
        finally:
            inflight.dec(labels)
        self._observe(labels, status, started)

    def _admit(self, req: Request, route: Route) -> None:
        if req.upgrade is not None and b"upgrade" in req.connection_tokens:
            if route.endpoint == "websocket":
                raise NotImplementedYet("the WebSocket relay is not supported by this gateway yet")
            raise ClientError("protocol upgrades are only accepted on the websocket endpoint")
        if route.endpoint == "websocket":
            raise ClientError("the websocket endpoint needs a WebSocket upgrade request")
        error = body_limit_error(req)
        if error is not None:
            raise error
        req.body.limit = MAX_BODY_BYTES

    def _answer_error(self, req: Request, error: GatewayError, request_id: str, route: tuple, started: float) -> None:
        req.conn.send_error(error, (("x-baseten-request-id", request_id),))
        self._observe(route + ("http",), error.status, started)

    def _observe(self, labels: tuple, status: int, started: float) -> None:
        self.metrics.requests.inc(labels + (str(status),))
        self.metrics.duration.observe(labels, asyncio.get_running_loop().time() - started)

    def _upstream(self, dep: Deployment) -> Upstream:
        if dep.endpoints:
            self.rr += 1
            return dep.endpoints[self.rr % len(dep.endpoints)]
        return dep.plane.url

    def _identity(self, route: Route, up: Upstream) -> bytes:
        key = (route.model.id, route.environment, route.deployment.id, up)
        block = self.identity.get(key)
        if block is None:
            block = self.identity[key] = (
                b"x-baseten-model-id: %s\r\nx-baseten-environment: %s\r\nx-baseten-deployment-id: %s\r\n"
                % (route.model.id.encode(), route.environment.encode(), route.deployment.id.encode())
            )
        return block

    def _ssl(self, plane: Plane) -> ssl.SSLContext:
        ctx = self.ssl_contexts.get(plane.name)
        if ctx is None:
            tls = plane.tls
            ctx = ssl.create_default_context(cafile=tls.ca if tls else None)
            if tls and tls.cert:
                ctx.load_cert_chain(tls.cert, tls.key)
            self.ssl_contexts[plane.name] = ctx
        return ctx

    async def _connection(self, dep: Deployment, up: Upstream) -> UpstreamConnection:
        conn = self.pool.take_idle(up)
        if conn is not None:
            return conn
        ctx = self._ssl(dep.plane) if up.scheme == "https" else None
        return await self.pool.connect(up, dep.timeouts.connect_seconds, ctx)

    async def _forward(self, req: Request, route: Route, request_id: str) -> int:
        dep = route.deployment
        up = self._upstream(dep)
        labels = (route.model.id, route.environment, dep.id, dep.region, "http")
        try:
            conn = await self._connection(dep, up)
        except GatewayError as error:
            self.metrics.upstream_errors.inc(labels + ("connect",))
            req.conn.send_error(error, (("x-baseten-request-id", request_id),))
            return error.status
        if req.conn.closed:
            self.pool.put_idle(conn)  # unused and clean: keep it for the next call
            return 499
        exchange = Exchange(req, conn, request_id, dep.timeouts)
        head = request_head(
            req, route.upstream_target, b"%s:%d" % (up.host.encode(), up.port), self._identity(route, up),
            request_id, self.scheme,
        )  # fmt: skip
        exchange.start(head)
        await exchange.done
        exchange.release_upstream()
        if exchange.error is not None:
            self.metrics.upstream_errors.inc(labels + (exchange.error.error_code,))
        return exchange.status

    def _wake(self, req: Request, route: Route, request_id: str) -> None:
        """202 now; ask the plane to wake the deployment in the background (SPEC §6)."""
        dep = route.deployment
        body = json.dumps(
            {"model_id": route.model.id, "deployment_id": dep.id, "environment": route.environment or None,
             "status": dep.status, "request_id": request_id}
        ).encode()  # fmt: skip
        req.conn.send_simple(202, body, (("x-baseten-request-id", request_id),))
        task = asyncio.get_running_loop().create_task(self._send_wake(route, request_id))
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _send_wake(self, route: Route, request_id: str) -> None:
        dep = route.deployment
        up = dep.plane.url
        head = (
            b"POST /wake HTTP/1.1\r\nhost: %s:%d\r\n%sx-baseten-request-id: %s\r\ncontent-length: 0\r\n\r\n"
            % (up.host.encode(), up.port, self._identity(route, up), request_id.encode())
        )
        try:
            conn = await self._connection(dep, up)
        except GatewayError as error:
            log.warning("wake of %s/%s failed: %s", route.model.id, dep.id, error.message)
            return
        sink = _Discard(asyncio.get_running_loop())
        conn.start(sink, head)
        try:
            async with asyncio.timeout(dep.timeouts.response_start_seconds):
                status = await sink.done
        except (TimeoutError, GatewayError) as error:
            conn.close()
            log.warning("wake of %s/%s got no answer: %s", route.model.id, dep.id, error)
            return
        conn.release()
        log.info("wake of %s/%s answered %s", route.model.id, dep.id, status)


class _Discard:
    """An exchange that reads and drops a plane's answer (wake calls, later shadows)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.done: asyncio.Future = loop.create_future()
        self.status = 0

    def on_response_head(self, status: int, reason: bytes, headers: list) -> None:
        self.status = status

    def on_response_body(self, data: bytes) -> None:
        pass

    def on_response_complete(self) -> None:
        if not self.done.done():
            self.done.set_result(self.status)

    def on_upstream_lost(self, error: GatewayError) -> None:
        if not self.done.done():
            self.done.set_exception(error)

    def flush(self) -> None:
        pass

    def upstream_write_paused(self, paused: bool) -> None:
        pass
