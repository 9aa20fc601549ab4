"""The public listener's handler: resolve, then forward (or answer) one call.

The common case runs without a task: the route comes from a per-table cache, an idle
pooled connection is taken, and the exchange is driven by socket callbacks until
`_done`. Only a call that needs a new plane connection goes through a task.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import NamedTuple

from gateway.calls.outcome import error_kind, outcome_of
from gateway.errors import (
    ClientError,
    GatewayError,
    MisdirectedRequest,
    ModelNotReady,
    ModelUnavailable,
    RateLimited,
    UpgradeRequired,
)
from gateway.headers import misdirected
from gateway.http.hold import (
    RETRY_AFTER_FULL,
    RETRY_AFTER_NOT_READY,
    RETRY_AFTER_REJECT,
    Held,
    Holds,
    Reason,
    admission,
    concurrency_limit,
)
from gateway.http.proxy import MAX_BODY_BYTES, Exchange, TunnelExchange, body_limit_error, new_request_id, request_head
from gateway.http.server import Request
from gateway.http.shadow import Discard, ShadowExchange, Shadows, Tee, sampled
from gateway.metrics import Metrics
from gateway.routing.model import Deployment, Table, Upstream
from gateway.routing.resolve import Call, Route, resolve
from gateway.state import TableState
from gateway.upstream.balance import Endpoint, EndpointSet, RetryBudget, should_retry
from gateway.upstream.connect import Connector
from gateway.upstream.pool import Pool, UpstreamConnection
from gateway.upstream.replicas import ReplicaSets

log = logging.getLogger("gateway.public")
UNROUTED = ("", "", "", "", "http")


class Context(NamedTuple):
    """What a call carries from its start to `_done`."""

    labels: tuple
    started: float
    endpoints: EndpointSet
    endpoint: Endpoint
    table: Table
    tee: Tee | None = None  # a sampled call's shadow copy in the making (SPEC §6)


ROUTE_CACHE_SIZE = 8192
SWEEP_SECONDS = 0.25


class PublicHandler:
    def __init__(self, state: TableState, pool: Pool, metrics: Metrics, scheme: str = "http") -> None:
        self.state = state
        self.pool = pool
        self.metrics = metrics
        self.scheme = scheme
        self.loop = asyncio.get_running_loop()
        self.routes: dict[tuple, Route] = {}  # successful decisions of the current table
        self.identity: dict[tuple, bytes] = {}  # identity header blocks of the current table
        self.exchanges: set[Exchange] = set()
        self.budget = RetryBudget()
        self.connector = Connector(state.table.gateway.dns_nameservers, metrics)
        # Replica sets per deployment, with SRV discovery and active health checks (issue 5).
        self.replicas = ReplicaSets(self.connector, metrics)
        self.replicas.sync(state.table)
        self.background: set[asyncio.Task] = set()
        self.sweeper = self.loop.call_later(SWEEP_SECONDS, self._sweep)
        state.on_swap.append(self._table_swapped)
        self.holds = Holds(self.loop, metrics, self._hold_expired, self._hold_dropped, self._hold_wake)
        self.shadows = Shadows(self.loop, metrics, self._connect, scheme)
        state.on_swap.append(self._table_swapped_release)

    def _table_swapped(self, table: Table) -> None:
        # New dicts, not clear(): a call in flight keeps the decisions of its own table.
        self.routes, self.identity = {}, {}
        self.pool.close_idle()  # planes may have moved, or their region's networks changed
        self.connector.table_swapped(table)
        self.replicas.sync(table)  # after the resolver: discovery asks the new one

    def close(self) -> None:
        self.sweeper.cancel()
        self.holds.close()
        self.shadows.close()
        self.replicas.close()
        self.connector.close()

    # -- the request path -------------------------------------------------------------------

    def __call__(self, req: Request) -> None:
        request_id = new_request_id()
        started = self.loop.time()
        try:
            route = self._route(req)
            self._admit(req, route)
        except GatewayError as error:
            self._answer(req, error, request_id, UNROUTED, started)
            return
        if route.action == "wake":
            dep = route.deployment
            self._wake(req, route, request_id)
            self._observe((route.model.id, route.environment, dep.id, dep.region, "http"), 202, started)
            req.conn.finish(req)
            return
        self._dispatch(req, route, request_id, started, None)

    def _dispatch(self, req: Request, route: Route, request_id: str, started: float, held: Held | None) -> str:
        """Send the call to its deployment, or hold it (scaled to zero, backpressure), or refuse it (SPEC §6).

        Returns what became of it: "sent", "held" or "answered".
        """
        dep = route.deployment
        protocol = "websocket" if route.endpoint == "websocket" else "http"
        labels = (route.model.id, route.environment, dep.id, dep.region, protocol)
        if route.action == "hold":
            return self._hold(req, route, request_id, started, held, labels, "wake")
        endpoints = self._endpoints(route)
        env = route.model.environments.get(route.environment)
        tee = None
        if env is not None:  # an environment's call: backpressure, shadow and split apply
            if env.autoscaling.concurrency_target is not None:
                # A released call is at the head of the queue; a new one waits behind those queued.
                waiting = 0 if held is not None else self.holds.waiting((route.model.id, dep.id))
                decision = admission(
                    endpoints.in_flight_total(),
                    concurrency_limit(env, endpoints.replica_count()),
                    waiting,
                    env.backpressure,
                )
                if decision != "go":
                    if decision == "queue":
                        return self._hold(req, route, request_id, started, held, labels, "full")
                    error = RateLimited(
                        f"deployment '{dep.id}' is at its concurrency limit; retry later",
                        headers=(("retry-after", RETRY_AFTER_REJECT),),
                    )
                    self._answer(req, error, request_id, labels, started)
                    return "answered"
            shadow = env.shadow
            if shadow is not None and protocol == "http" and sampled(shadow):
                tee = self.shadows.tee(req, route, shadow, self.state.table)
            self.metrics.split.inc((route.model.id, route.environment, dep.id, route.side))
        ep = endpoints.pick_or_least_loaded()
        if ep is None:  # no replica: SRV discovery found none (yet), or a bug; 503, never a crash
            reason = endpoints.unavailable or f"deployment '{dep.id}' has no address"
            self._answer(req, ModelUnavailable(reason), request_id, labels, started)
            return "answered"
        self.metrics.inflight.inc(labels)
        endpoints.started(ep)
        self.budget.record_request()
        context = Context(labels, started, endpoints, ep, self.state.table, tee)
        conn = self.pool.take_idle(ep.upstream, dep.plane.tls, self.connector.still_current)
        if conn is not None:
            self._start(req, route, ep.upstream, conn, request_id, context)
        else:
            req.conn.spawn(req, self._connect_and_start(req, route, request_id, context), finish=False)
        return "sent"

    def _route(self, req: Request) -> Route:
        sni = req.conn.sni
        if sni is not None and sni != req.host and misdirected(sni, req.host, self.state.table.domains):
            raise MisdirectedRequest(
                f"this TLS connection was opened for '{sni}', not for '{req.host}': open one for that host"
            )
        key = (req.method, req.host, req.target, req.authorization, req.routing_key)
        routes = self.routes
        route = routes.get(key)
        if route is None:
            route = resolve(self.state.table, Call(*key))
            if len(routes) >= ROUTE_CACHE_SIZE:
                routes.clear()
            routes[key] = route
        return route

    def _admit(self, req: Request, route: Route) -> None:
        upgrading = req.upgrade is not None and b"upgrade" in req.connection_tokens
        if route.endpoint == "websocket":
            if not upgrading or req.upgrade.lower() != b"websocket":  # type: ignore[union-attr]
                raise UpgradeRequired("the websocket endpoint needs a WebSocket upgrade request")
            if req.has_body:
                # RFC 6455 §4.1 handshakes have no body; a plane that refuses the upgrade would read
                # one the gateway never forwards (the parser consumed it) from the next request (issue 9).
                raise ClientError("a WebSocket upgrade request must not have a body")
            return
        if upgrading:
            raise ClientError("protocol upgrades are only accepted on the websocket endpoint")
        error = body_limit_error(req)
        if error is not None:
            raise error
        req.body.limit = MAX_BODY_BYTES

    async def _connect_and_start(self, req: Request, route: Route, request_id: str, context: Context) -> None:
        dep = route.deployment
        tried: set[Endpoint] = set()
        attempt = 1
        while True:
            try:
                conn = await self._connect(dep, context.endpoint.upstream, context.table)
                break
            except GatewayError as error:
                kind = error_kind(error)
                if kind is not None:
                    self.metrics.upstream_errors.inc(context.labels + (kind,))
                context.endpoints.finished(context.endpoint, outcome_of(error, error.status))
                tried.add(context.endpoint)
                retry = self._retry_endpoint(context, tried, attempt)
                if retry is None:
                    self._end(req, context, error.status)
                    req.conn.send_error(error, (("x-baseten-request-id", request_id),))
                    req.conn.finish(req)
                    return
                # Nothing of the request was sent: safe to try another replica (issue 5).
                attempt += 1
                context = context._replace(endpoint=retry)
        if req.conn.closed:
            self.pool.put_idle(conn)  # unused and clean: keep it for the next call
            context.endpoints.finished(context.endpoint, "cancelled")
            self._end(req, context, 499)
            return
        self._start(req, route, context.endpoint.upstream, conn, request_id, context)  # callbacks finish it

    def _retry_endpoint(self, context: Context, tried: set[Endpoint], attempt: int) -> Endpoint | None:
        if not should_retry(
            bytes_sent=0, streaming=False, protocol="http", attempt=attempt, max_attempts=2, outcome="connect_failure"
        ) or not self.budget.can_retry():  # fmt: skip
            return None
        ep = context.endpoints.pick_or_least_loaded(exclude=frozenset(tried))
        if ep is not None:
            self.budget.record_retry()
            context.endpoints.started(ep)
        return ep

    def _start(
        self, req: Request, route: Route, up: Upstream, conn: UpstreamConnection, request_id: str, context: Context
    ) -> None:  # fmt: skip
        args = (req, conn, request_id, route.deployment.timeouts, self._done, context, route.deployment.id)
        if route.endpoint == "websocket":
            exchange: Exchange = TunnelExchange(*args)
        elif context.tee is not None:
            exchange = ShadowExchange(*args, tee=context.tee)
        else:
            exchange = Exchange(*args)
        self.exchanges.add(exchange)
        head = request_head(req, route.upstream_target, self._identity(route, up), request_id, self.scheme)
        exchange.start(head)

    def _done(self, exchange: Exchange) -> None:
        self.exchanges.discard(exchange)
        req = exchange.req
        context: Context = exchange.context
        error, status = exchange.error, exchange.status
        kind = error_kind(error)
        if kind is not None:
            self.metrics.upstream_errors.inc(context.labels + (kind,))
        # Only the plane's faults eject a replica: a 413 mid-upload or a client gone never does (issue 10).
        context.endpoints.finished(context.endpoint, outcome_of(error, status))
        self._end(req, context, status)
        req.conn.finish(req)

    def _end(self, req: Request, context: Context, status: int) -> None:
        self.metrics.inflight.dec(context.labels)
        self._observe(context.labels, status, context.started)
        if self.holds.full_waiting:  # a slot freed: the longest-waiting call of that deployment may go
            self._slot_freed((context.labels[0], context.labels[2]))

    def _answer(self, req: Request, error: GatewayError, request_id: str, labels: tuple, started: float) -> None:
        req.conn.send_error(error, (("x-baseten-request-id", request_id),))
        self._observe(labels, error.status, started)
        req.conn.finish(req)

    def _observe(self, labels: tuple, status: int, started: float) -> None:
        self.metrics.requests.inc(labels + (str(status),))
        self.metrics.duration.observe(labels, self.loop.time() - started)

    def _sweep(self) -> None:
        now = self.loop.time()
        for exchange in list(self.exchanges):
            exchange.check_deadlines(now)
        self.sweeper = self.loop.call_later(SWEEP_SECONDS, self._sweep)

    # -- upstream selection and connections ---------------------------------------------------

    def _endpoints(self, route: Route) -> EndpointSet:
        """The deployment's replica set, carried over (with its health state) across table swaps and
        SRV changes. Empty while an `endpoints_srv` deployment has no replicas (`unavailable` says why)."""
        return self.replicas.get(route)

    def _identity(self, route: Route, up: Upstream) -> bytes:
        key = (route.model.id, route.environment, route.deployment.id, up)
        block = self.identity.get(key)
        if block is None:
            block = self.identity[key] = (
                b"host: %s\r\nx-baseten-model-id: %s\r\nx-baseten-environment: %s\r\n"
                b"x-baseten-deployment-id: %s\r\n"
                % (up.authority.encode(), route.model.id.encode(), route.environment.encode(),
                   route.deployment.id.encode())
            )  # fmt: skip
        return block

    async def _connect(self, dep: Deployment, up: Upstream, table: Table) -> UpstreamConnection:
        """A connection to `up`: an idle one still in its host's answer, or a new one through the
        region-checked connector (SPEC §8)."""
        tls = dep.plane.tls
        conn = self.pool.take_idle(up, tls, self.connector.still_current)
        if conn is not None:
            return conn
        region = table.regions[dep.plane.region]
        ctx = self.connector.ssl_for(dep.plane) if up.scheme == "https" else None
        key = self.pool.key(up, tls)
        _, conn, address = await self.connector.open(
            up.host, up.port, region, lambda: UpstreamConnection(self.pool, key),
            timeout=dep.timeouts.connect_seconds, tls=ctx,
        )  # fmt: skip
        conn.address = address
        self.pool.opened += 1
        return conn

    # -- held calls (SPEC §6) ------------------------------------------------------------------

    def _hold(
        self, req: Request, route: Route, request_id: str, started: float, held: Held | None, labels: tuple,
        reason: Reason,
    ) -> str:  # fmt: skip
        settings = self.state.table.gateway
        if held is None:
            held = Held(req, request_id, started)
        if not self.holds.add(held, route, labels, reason, settings.hold_timeout_seconds,
                              settings.max_held_calls_per_deployment):  # fmt: skip
            self.holds.finish(held)
            error = RateLimited(
                f"too many calls are waiting for deployment '{route.deployment.id}'; retry later",
                headers=(("retry-after", RETRY_AFTER_FULL),),
            )
            self._answer(req, error, request_id, labels, started)
            return "answered"
        return "held"

    def _release(self, held: Held) -> str:
        """Go on with a call taken out of the hold, re-resolved against the current table."""
        req = held.req
        try:
            route = self._route(req)
        except GatewayError as error:  # the table changed under it: removed, inactive, ...
            self.holds.finish(held)
            self._answer(req, error, held.request_id, held.labels, held.started)
            return "answered"
        outcome = self._dispatch(req, route, held.request_id, held.started, held)
        if outcome != "held":
            self.holds.finish(held)  # its hold deadline no longer applies
        return outcome

    def _table_swapped_release(self, table: Table) -> None:
        if self.holds.total:
            self.loop.call_soon(self._release_all)  # after every swap callback has seen the new table

    def _release_all(self) -> None:
        for held in self.holds.take_all():
            self._release(held)

    def _slot_freed(self, key: tuple[str, str]) -> None:
        # One slot freed: the longest-waiting call takes it; one answered without a slot passes it on.
        while (held := self.holds.next_for_slot(key)) is not None:
            if self._release(held) != "answered":
                return

    def _hold_expired(self, held: Held) -> None:
        dep_id = held.key[1]
        if held.reason == "wake":
            error = ModelNotReady(
                f"deployment '{dep_id}' did not become ready within the hold timeout; retry later",
                headers=(("retry-after", RETRY_AFTER_NOT_READY),),
            )
        else:
            error = ModelNotReady(
                f"deployment '{dep_id}' had no free slot within the hold timeout; retry later",
                headers=(("retry-after", RETRY_AFTER_FULL),),
            )
        self._answer(held.req, error, held.request_id, held.labels, held.started)

    def _hold_dropped(self, held: Held) -> None:
        """The client went away while held: nothing was sent anywhere."""
        self._observe(held.labels, 499, held.started)
        held.req.conn.finish(held.req)

    # -- wake ------------------------------------------------------------------------------

    def _wake(self, req: Request, route: Route, request_id: str) -> None:
        """202 now; ask the plane to wake the deployment in the background (SPEC §6)."""
        dep = route.deployment
        body = json.dumps(
            {"model_id": route.model.id, "deployment_id": dep.id, "environment": route.environment or None,
             "status": dep.status, "request_id": request_id}
        ).encode()  # fmt: skip
        req.conn.send_simple(202, body, (("x-baseten-request-id", request_id),))
        task = self.loop.create_task(self._send_wake(route, request_id))
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _hold_wake(self, route: Route, timeout: float) -> None:
        await self._send_wake(route, new_request_id(), timeout)

    async def _send_wake(self, route: Route, request_id: str, timeout: float | None = None) -> None:
        dep = route.deployment
        up = dep.plane.url
        head = [
            b"POST /wake HTTP/1.1\r\n", self._identity(route, up),
            b"x-baseten-request-id: %s\r\ncontent-length: 0\r\n\r\n" % request_id.encode(),
        ]  # fmt: skip
        try:
            conn = await self._connect(dep, up, self.state.table)
        except GatewayError as error:
            log.warning("wake of %s/%s failed: %s", route.model.id, dep.id, error.message)
            return
        sink = Discard(self.loop)
        conn.start(sink, head)
        try:
            async with asyncio.timeout(timeout or dep.timeouts.response_start_seconds):
                status = await sink.done
        except (TimeoutError, GatewayError) as error:
            conn.close()
            log.warning("wake of %s/%s got no answer: %s", route.model.id, dep.id, error)
            return
        conn.release()
        log.info("wake of %s/%s answered %s", route.model.id, dep.id, status)
