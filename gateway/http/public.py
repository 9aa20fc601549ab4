"""The public listener's handler: resolve, then forward (or answer) one call.

The common case runs without a task: the route comes from a per-table cache, an idle
pooled connection is taken, and the exchange is driven by socket callbacks until
`_done`. Only a call that needs a new plane connection goes through a task.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import NamedTuple

from gateway.asyncq.api import answer as answer_async
from gateway.asyncq.service import AsyncService
from gateway.calls.admission import RETRY_AFTER_FULL, RETRY_AFTER_NOT_READY
from gateway.calls.constants import RouteConstants
from gateway.calls.holds import Reason, Released
from gateway.calls.info import CallInfo
from gateway.calls.pipeline import CallRecord, Go, Pipeline
from gateway.calls.ratelimit import Permit
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
from gateway.http.h2 import H2Exchange, H2ShadowExchange, H2TunnelExchange
from gateway.http.hold import HeldRequest
from gateway.http.proxy import MAX_BODY_BYTES, Exchange, TunnelExchange, body_limit_error, new_request_id, request_head
from gateway.http.server import Request
from gateway.http.shadow import ShadowExchange, Shadows, Tee, picked
from gateway.metrics import Metrics
from gateway.routing.model import Deployment, Table, Upstream
from gateway.routing.resolve import Call, RequestLookup, Route, resolve
from gateway.state import TableState
from gateway.upstream.balance import Endpoint, should_retry
from gateway.upstream.pool import Pool, UpstreamConnection

log = logging.getLogger("gateway.public")
UNROUTED = ("", "", "", "", "http")


class Context(NamedTuple):
    """What a call carries from its start to `_done`."""

    record: CallRecord  # the pipeline's accounting of the call
    route: Route
    table: Table
    constants: RouteConstants  # the route's labels and identity fields
    tee: Tee | None = None  # a sampled call's shadow copy in the making (SPEC §6)


# The exchange of a call by (on an HTTP/2 stream, kind).
EXCHANGES: dict[tuple[bool, str], type[Exchange]] = {
    (False, "http"): Exchange, (False, "shadow"): ShadowExchange, (False, "websocket"): TunnelExchange,
    (True, "http"): H2Exchange, (True, "shadow"): H2ShadowExchange, (True, "websocket"): H2TunnelExchange,
}  # fmt: skip
RETRIED_ENDPOINTS = frozenset({"predict", "run_remote", "sync"})  # SPEC §12 retry_on_reset: calls, not sessions


ASYNC_ACTIONS = frozenset({"async", "async_status"})
LOGGED_FIELDS = frozenset({b"user-agent", b"referer", b"traceparent", b"tracestate"})  # CallInfo's (issue 13)
ROUTE_CACHE_SIZE = 8192
SWEEP_SECONDS = 0.25


class PublicHandler:
    """The HTTP/1.1 (and WebSocket) adapter of the call pipeline: parse, resolve, `Pipeline.admit`,
    then carry the decision out on the wire."""

    def __init__(self, state: TableState, pool: Pool, metrics: Metrics, scheme: str, pipeline: Pipeline) -> None:
        self.state = state
        self.pool = pool
        self.metrics = metrics
        self.scheme = scheme
        self.loop = asyncio.get_running_loop()
        self.routes: dict[tuple, Route | RequestLookup] = {}  # successful decisions of the current table
        self.exchanges: set[Exchange] = set()
        self.pipeline = pipeline  # the worker's, shared with gRPC; its owner (runner.DataPlane) closes it
        self.connector = pipeline.connector
        self.sweeper = self.loop.call_later(SWEEP_SECONDS, self._sweep)
        state.on_swap.append(self._table_swapped)
        self.shadows = Shadows(self.loop, metrics, self._connect, scheme)
        self.asyncs: AsyncService | None = None  # the worker's async queue (SPEC §10); None: 501

    def _table_swapped(self, table: Table) -> None:
        # New dicts, not clear(): a call in flight keeps the decisions of its own table.
        self.routes = {}
        self.pool.close_idle()  # planes may have moved, or their region's networks changed

    def close(self) -> None:
        self.sweeper.cancel()
        self.shadows.close()

    # -- the request path -------------------------------------------------------------------

    def __call__(self, req: Request) -> None:
        request_id = new_request_id()
        started = self.loop.time()
        try:
            route = self._route(req)
            self._admit(req, route)
            permit = self.pipeline.limit(route.api_key)  # every call of a key counts: async submits too
        except GatewayError as error:
            self._answer(req, error, request_id, UNROUTED, started)
            return
        if isinstance(route, RequestLookup) or route.action in ASYNC_ACTIONS:
            req.conn.spawn(req, self._async(req, route, request_id, started, permit))
            return
        if route.action == "wake":
            permit.release()
            self._wake(req, route, request_id)
            self._observe(self.pipeline.constants.of(route).labels["http"], 202, started, req, request_id, route)
            req.conn.finish(req)
            return
        self._dispatch(req, route, request_id, started, None, permit)

    def _dispatch(
        self, req: Request, route: Route, request_id: str, started: float, held: HeldRequest | None, permit: Permit
    ) -> Released:  # fmt: skip
        """Send the call to its deployment, or hold it (scaled to zero, backpressure), or refuse it (SPEC §6).
        `permit` (the key's rate_limit slots) goes to the call's record, or is released here."""
        dep = route.deployment
        protocol = "websocket" if route.endpoint == "websocket" else "http"
        constants = self.pipeline.constants.of(route)
        labels = constants.labels[protocol]
        decision = self.pipeline.admit(route, released=held is not None)
        if not isinstance(decision, Go):
            if isinstance(decision, GatewayError):
                permit.release()
                self._answer(req, decision, request_id, labels, started)
                return "answered"
            return self._hold(req, route, request_id, started, held, labels, decision, permit)
        tee = None
        env = route.model.environments.get(route.environment)
        if env is not None and (env.shadow is not None or env.shadow_rules) and protocol == "http":
            targets = picked(env, route.model.id, req.routing_key or route.api_key.name, time.time())
            tee = self.shadows.tee(req, route, targets, self.state.table) if targets else None
        ep = decision.endpoint
        if ep is None:  # admit gives HTTP calls an endpoint; defensively, 503 rather than a crash
            permit.release()
            self._answer(req, ModelUnavailable(f"deployment '{dep.id}' has no address"), request_id, labels, started)
            return "answered"
        info = None
        if self.pipeline.observer is not None:
            info = self._info(req, request_id, route, protocol)
            if info is not None:
                info.shadowed = tee is not None
        record = self.pipeline.begin(labels, decision, started, info, permit=permit)
        context = Context(record, route, self.state.table, constants, tee)
        conn = self.pool.take_idle(ep.upstream, dep.plane.tls, self.connector.still_current)
        if conn is not None:
            self._start(req, route, ep.upstream, conn, request_id, context)
        else:
            req.conn.spawn(req, self._connect_and_start(req, route, request_id, context, ep), finish=False)
        return "sent"

    async def _async(
        self, req: Request, route: Route | RequestLookup, request_id: str, started: float, permit: Permit
    ) -> None:  # fmt: skip
        """An async inference call (SPEC §10): the queue's API answers it."""
        try:
            status = await answer_async(self.asyncs, req, route, request_id)
        finally:
            permit.release()
        labels = UNROUTED if isinstance(route, RequestLookup) else self.pipeline.constants.of(route).labels["http"]
        self._observe(labels, status, started, req, request_id, route)

    def _route(self, req: Request) -> Route | RequestLookup:
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

    def _admit(self, req: Request, route: Route | RequestLookup) -> None:
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

    async def _connect_and_start(
        self, req: Request, route: Route, request_id: str, context: Context, ep: Endpoint,
        replay: tuple[list[bytes], int] | None = None,
    ) -> None:  # fmt: skip
        """Connect to `ep` (another replica once if that fails, issue 5) and start the exchange; with
        `replay` (body, size) start it as the retry after a reset, which takes no second connect retry."""
        dep, record = route.deployment, context.record
        tried: set[Endpoint] = set()
        attempt = 1 if replay is None else 2  # a replay is already the call's one retry
        while True:
            try:
                conn = await self._connect(dep, ep.upstream, context.table)
                break
            except GatewayError as error:
                record.attempt_failed(error)
                tried.add(ep)
                retry = self._retry_endpoint(record, tried, attempt)
                if retry is None:
                    self._end(req, context, str(error.status))
                    req.conn.send_error(error, (("x-baseten-request-id", request_id),))
                    req.conn.finish(req)
                    return
                ep, attempt = retry, attempt + 1  # nothing of the request was sent: safe on another replica (issue 5)
        if req.conn.closed:
            self.pool.put_idle(conn)  # unused and clean: keep it for the next call
            self._end(req, context, "499", 499)
            return
        if replay is None:
            self._start(req, route, ep.upstream, conn, request_id, context)  # callbacks finish it
            return
        body, size = replay
        exchange = EXCHANGES[req.conn.h2, "http"](req, conn, request_id, dep.timeouts, self._done, context, dep.id)
        exchange.replay(self._head(exchange, ep.upstream, size), body)

    def _retry_endpoint(self, record: CallRecord, tried: set[Endpoint], attempt: int) -> Endpoint | None:
        if not should_retry(
            bytes_sent=0, streaming=False, protocol="http", attempt=attempt, max_attempts=2, outcome="connect_failure"
        ) or not self.pipeline.budget.can_retry():  # fmt: skip
            return None
        ep = record.endpoints.pick_or_least_loaded(exclude=frozenset(tried))
        if ep is not None:
            record.retry_on(ep)
        return ep

    def _start(
        self, req: Request, route: Route, up: Upstream, conn: UpstreamConnection, request_id: str, context: Context
    ) -> None:  # fmt: skip
        args = (req, conn, request_id, route.deployment.timeouts, self._done, context, route.deployment.id)
        if route.endpoint == "websocket":
            exchange: Exchange = EXCHANGES[req.conn.h2, "websocket"](*args)
        elif context.tee is not None:
            exchange = EXCHANGES[req.conn.h2, "shadow"](*args, tee=context.tee)  # type: ignore[call-arg]
        else:
            exchange = EXCHANGES[req.conn.h2, "http"](*args)
        if route.endpoint in RETRIED_ENDPOINTS and route.deployment.retry_on_reset:
            exchange.retry_after_reset(self._retry_after_reset)
        exchange.start(self._head(exchange, up))

    def _head(self, exchange: Exchange, up: Upstream, body_length: int | None = None) -> list[bytes]:
        """Register `exchange` (a first attempt or the retry after a reset) and give the head it sends to `up`."""
        context: Context = exchange.context
        record, req = context.record, exchange.req
        # The key's limits on its answers too (IETF RateLimit fields; a refusal has them as well).
        if record.permit.counters:
            exchange.answered_by += record.permit.header_lines(self.loop.time())
        exchange.info = info = record.info
        self.exchanges.add(exchange)
        return request_head(
            req, context.route.upstream_target, self._identity(context, up), exchange.request_id, req.conn.scheme,
            body_length=body_length, trace=info.trace_lines() if info is not None and info.trace else None,
        )  # fmt: skip

    # -- one retry after a reset (SPEC §12 retry_on_reset, issue 10) ---------------------------

    def _retry_after_reset(self, exchange: Exchange, error: GatewayError) -> bool:
        """The plane's connection broke before any answer byte: send the call again, once, with the
        same request id (a plane may deduplicate), on another replica; on the same one only when the
        broken connection was a reused one (the plane closed it as we wrote: a fresh one is safe)."""
        context: Context = exchange.context
        record, req = context.record, exchange.req
        failed = record.endpoint
        body = exchange.kept  # Exchange only asks with a body it kept whole
        if failed is None or body is None or not self.pipeline.budget.can_retry():
            return False
        retry = record.endpoints.pick_or_least_loaded(exclude=frozenset({failed}))
        if retry is None and exchange.upstream.requests > 1:
            retry = failed
        if retry is None:
            return False
        record.attempt_failed(error)
        record.retry_on(retry)
        self.exchanges.discard(exchange)
        work = self._connect_and_start(
            req, context.route, exchange.request_id, context, retry, (body, exchange.kept_size)
        )
        req.conn.spawn(req, work, finish=False)
        return True

    def _done(self, exchange: Exchange) -> None:
        self.exchanges.discard(exchange)
        context: Context = exchange.context
        # Only the plane's faults eject a replica: a 413 mid-upload or a client gone never does (issue 10).
        self._end(exchange.req, context, str(exchange.status), exchange.status, exchange.error)
        exchange.req.conn.finish(exchange.req)

    def _end(
        self, req: Request, context: Context, code: str, status: int = 0, error: GatewayError | None = None
    ) -> None:
        record = context.record
        if record.info is not None:  # the request body's size, for the access log
            record.info.bytes_in += req.body.received
        record.end(code, status, error)

    def _answer(self, req: Request, error: GatewayError, request_id: str, labels: tuple, started: float) -> None:
        req.conn.send_error(error, (("x-baseten-request-id", request_id),))
        self._observe(labels, error.status, started, req, request_id)
        req.conn.finish(req)

    def _observe(
        self, labels: tuple, status: int, started: float, req: Request, request_id: str, route: object = None
    ) -> None:  # fmt: skip
        """Count a call the pipeline never admitted (refused, answered by the gateway, or held and dropped)."""
        info = None
        if self.pipeline.observer is not None:
            info = self._info(req, request_id, route, labels[4])
            if info is not None:
                info.bytes_in = req.body.received
        self.pipeline.unadmitted(labels, str(status), started, info)

    def _info(self, req: Request, request_id: str, route: object, protocol: str) -> CallInfo | None:
        """What the access log and tracing record of an HTTP call (an observer is on); None when
        neither wants it (tracing only, and the call is not traced)."""
        agent = referer = parent = state = b""
        for name, value in req.headers:  # one pass over the head, no call per field (calls_per_call.py)
            if name in LOGGED_FIELDS:
                if name == b"user-agent":
                    agent = value
                elif name == b"referer":
                    referer = value
                elif name == b"traceparent":
                    parent = value
                else:
                    state = value
        parent_text = parent.decode("latin-1") if parent else ""
        observer = self.pipeline.observer
        # The access log alone (no tracing): not traced, without a call to ask (calls_per_call.py).
        traced = False if observer.tracing is None else observer.wanted(parent_text)  # type: ignore[union-attr]
        if traced is None:
            return None
        return CallInfo(
            request_id, req.conn.peer, req.host or "", req.method, req.target, protocol, route,
            agent.decode("latin-1") if agent else "", referer.decode("latin-1") if referer else "", parent_text,
            state.decode("latin-1") if state else "", traced,
        )  # fmt: skip

    def _sweep(self) -> None:
        now = self.loop.time()
        for exchange in list(self.exchanges):
            exchange.check_deadlines(now)
        self.sweeper = self.loop.call_later(SWEEP_SECONDS, self._sweep)

    # -- upstream selection and connections ---------------------------------------------------

    def _identity(self, context: Context, up: Upstream) -> list[bytes]:
        constants = self.pipeline.constants
        return [constants.hosts.get(up) or constants.host_line(up), context.constants.identity]

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

    # -- held calls (SPEC §6; the hold itself is the pipeline's) ------------------------------

    def _hold(
        self, req: Request, route: Route, request_id: str, started: float, held: HeldRequest | None, labels: tuple,
        reason: Reason, permit: Permit,
    ) -> Released:  # fmt: skip
        if held is None:
            held = HeldRequest(self, req, request_id, started)
        held.permit = permit  # kept while held: a held call is an open call of its key
        deadline = held.started + self.state.table.gateway.hold_timeout_seconds
        if not self.pipeline.hold(held, route, labels, reason, deadline):
            self.pipeline.holds.finish(held)
            permit.release()
            error = RateLimited(
                f"too many calls are waiting for deployment '{route.deployment.id}'; retry later",
                headers=(("retry-after", RETRY_AFTER_FULL),),
            )
            self._answer(req, error, request_id, labels, started)
            return "answered"
        req.conn.on_lost = lambda: self._held_client_lost(held)
        return "held"

    def release_held(self, held: HeldRequest) -> Released:
        """Go on with a call taken out of the hold, re-resolved against the current table."""
        req = held.req
        req.conn.on_lost = None
        try:
            route = self._route(req)
            if isinstance(route, RequestLookup):  # cannot happen: only routed calls are held
                raise ModelUnavailable("the call cannot be routed anymore")
        except GatewayError as error:  # the table changed under it: removed, inactive, ...
            held.permit.release()
            self._answer(req, error, held.request_id, held.labels, held.started)
            return "answered"
        return self._dispatch(req, route, held.request_id, held.started, held, held.permit)

    def held_expired(self, held: HeldRequest) -> None:
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
        held.req.conn.on_lost = None
        held.permit.release()
        self._answer(held.req, error, held.request_id, held.labels, held.started)

    def _held_client_lost(self, held: HeldRequest) -> None:
        """The client went away while held: nothing was sent anywhere."""
        if self.pipeline.holds.drop(held):
            held.permit.release()
            self._observe(held.labels, 499, held.started, held.req, held.request_id)
            held.req.conn.finish(held.req)

    # -- wake ------------------------------------------------------------------------------

    def _wake(self, req: Request, route: Route, request_id: str) -> None:
        """202 now; the pipeline asks the plane to wake the deployment in the background (SPEC §6)."""
        dep = route.deployment
        body = json.dumps(
            {"model_id": route.model.id, "deployment_id": dep.id, "environment": route.environment or None,
             "status": dep.status, "request_id": request_id}
        ).encode()  # fmt: skip
        req.conn.send_simple(202, body, (("x-baseten-request-id", request_id),))
        self.pipeline.wake_soon(route, request_id)
