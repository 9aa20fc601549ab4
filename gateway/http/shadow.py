"""Shadow traffic (SPEC §6): a sampled copy of an HTTP call, sent fire-and-forget.

`ShadowExchange` is the primary call's `Exchange` with a tee: each request-body chunk it writes
to the primary plane is also copied, up to the shadow's `max_body_bytes`. A body that passes the
cap (by Content-Length at once, or chunked once it passes it) is not shadowed: the copy is
dropped whole, never truncated. When the primary's request body is complete, the copy is queued.

`Shadows` sends queued copies: a bounded queue (QUEUE_MAX_CALLS and QUEUE_MAX_BYTES; a copy
that does not fit is dropped and counted), at most MAX_SENDERS copies in flight, never retried,
each given at most SEND_TIMEOUT_SECONDS; answers are read and discarded. Nothing here touches the
client's connection, so the client's response, latency and errors never depend on the shadow.

Outcomes, in `gateway_shadow_requests_total{...,outcome}`:
`success` (the shadow answered 1xx-3xx), `error_status` (it answered 4xx/5xx), `failed` (no
connection, broken, or timed out), `dropped` (the queue was full), `too_large` (the body passed
the cap), `cancelled` (the client went away and the rule propagates client cancellation, issue 12).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from gateway.errors import GatewayError, UpstreamBroken
from gateway.http.proxy import Exchange, new_request_id, request_head
from gateway.http.server import Request
from gateway.metrics import Metrics
from gateway.routing.model import Deployment, Environment, Shadow, Table, Upstream
from gateway.routing.resolve import Route, in_canary

log = logging.getLogger("gateway.shadow")

QUEUE_MAX_CALLS = 128
QUEUE_MAX_BYTES = 32 * 1024 * 1024
MAX_SENDERS = 8
SEND_TIMEOUT_SECONDS = 30.0  # or the shadow deployment's own total timeout, if shorter
SHADOW_HEADER = b"x-baseten-shadow: 1\r\n"


def sampled(shadow: Shadow, rng: Callable[[], float] = random.random) -> bool:
    """Whether this call is copied: `percent` of calls, drawn per call."""
    return rng() * 100.0 < shadow.percent


def picked(
    env: Environment, model_id: str, caller: str, now: float, rng: Callable[[], float] = random.random
) -> list[Shadow]:
    """The shadows this call is copied to: the table's shadow, then the admin API's rules (issue 12).

    A rule past its `expires_at` sends nothing (checked per call, so no reload is needed at the
    expiry); USER_SESSION picks by the caller's stable bucket (the routing key, else the API key, as
    the canary does), RANDOM draws per call.
    """
    shadows = [env.shadow] if env.shadow is not None and sampled(env.shadow, rng) else []
    for rule in env.shadow_rules:
        shadow = rule.shadow
        if shadow is None or (shadow.expires_at is not None and shadow.expires_at <= now):
            continue
        if shadow.sampling_mode == "USER_SESSION":
            if in_canary(shadow.percent, model_id, env.name, caller, salt=f"shadow{rule.id}"):
                shadows.append(shadow)
        elif sampled(shadow, rng):
            shadows.append(shadow)
    return shadows


class Copy(NamedTuple):
    """A shadow copy ready to send."""

    labels: tuple  # model, environment, shadow deployment, its region, protocol
    deployment: Deployment
    upstream: Upstream
    table: Table
    parts: list[bytes]  # head and body
    size: int
    head_only: bool  # a HEAD call: the answer has no body
    cancelled: asyncio.Future | None  # set when the client went away (propagate_client_cancellation)


class Tee:
    """What a sampled call needs to become shadow copies: the route, its shadows and one capped body copy."""

    __slots__ = ("shadows", "route", "targets", "table", "parts", "size", "cancels")

    def __init__(self, shadows: Shadows, route: Route, targets: list[Shadow], table: Table) -> None:
        self.shadows = shadows
        self.route = route
        self.targets = targets
        self.table = table
        self.parts: list[bytes] | None = []  # None once the body passed every cap
        self.size = 0
        self.cancels: list[asyncio.Future] = []

    def labels(self, shadow: Shadow) -> tuple:
        dep = shadow.deployment
        return (self.route.model.id, self.route.environment, dep.id, dep.region, "http")

    def add(self, data: bytes) -> None:
        if self.parts is None:
            return
        self.size += len(data)
        for shadow in [t for t in self.targets if self.size > t.max_body_bytes]:
            self.targets.remove(shadow)
            self.shadows.count(self.labels(shadow), "too_large")
        if self.targets:
            self.parts.append(data)
        else:
            self.parts = None

    def complete(self, req: Request) -> None:
        if self.parts is not None:
            for shadow in self.targets:
                self.shadows.submit(self._copy(req, shadow))
            self.parts = None

    def client_lost(self) -> None:
        """Cancel the copies of the rules that follow the client's cancellation (queued or in flight)."""
        self.parts = None
        for cancel in self.cancels:
            if not cancel.done():
                cancel.set_result(None)

    def _copy(self, req: Request, shadow: Shadow) -> Copy:
        dep = shadow.deployment
        up = random.choice(dep.endpoints) if dep.endpoints else dep.plane.url
        identity = (
            b"host: %s\r\nx-baseten-model-id: %s\r\nx-baseten-environment: %s\r\nx-baseten-deployment-id: %s\r\n%s"
            % (up.authority.encode(), dep.model_id.encode(), (shadow.environment or self.route.environment).encode(),
               dep.id.encode(), SHADOW_HEADER)
        )  # fmt: skip
        scheme = self.shadows.scheme
        head = request_head(
            req, self.route.upstream_target, [identity], new_request_id(), scheme, body_length=self.size
        )
        parts = head + self.parts  # type: ignore[operator]
        cancel = None
        if shadow.propagate_cancellation:
            cancel = self.shadows.loop.create_future()
            self.cancels.append(cancel)
        return Copy(self.labels(shadow), dep, up, self.table, parts, self.size, req.method == "HEAD", cancel)


class ShadowExchange(Exchange):
    """The primary call, teeing its request body into `tee` (SPEC §6 shadow)."""

    __slots__ = ("tee",)

    def __init__(self, *args: Any, tee: Tee, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tee = tee

    def start(self, head: list[bytes]) -> None:
        req = self.req
        body = req.body
        if req.has_body and body.complete and not req.chunked and body.error is None:
            for chunk in body.chunks:  # sent with the head by Exchange.start
                self.tee.add(chunk)
        super().start(head)
        if self.request_sent:
            self.tee.complete(req)

    def write(self, data: bytes) -> None:
        super().write(data)
        self.tee.add(data)

    def write_eof(self) -> None:
        super().write_eof()
        self.tee.complete(self.req)

    def client_lost(self) -> None:
        self.tee.client_lost()
        super().client_lost()


Connect = Callable[[Deployment, Upstream, Table], Awaitable[Any]]


class Shadows:
    """The bounded queue of shadow copies and their senders."""

    def __init__(self, loop: asyncio.AbstractEventLoop, metrics: Metrics, connect: Connect, scheme: str) -> None:
        self.loop = loop
        self.metrics = metrics
        self.connect = connect
        self.scheme = scheme
        self.queue: collections.deque[Copy] = collections.deque()
        self.queued_bytes = 0
        self.senders: set[asyncio.Task] = set()

    def __repr__(self) -> str:
        return f"<Shadows {len(self.queue)} queued ({self.queued_bytes} bytes) | {len(self.senders)} sending>"

    def tee(self, req: Request, route: Route, targets: list[Shadow], table: Table) -> Tee | None:
        """A tee for a sampled call, or None when its declared body is already over every cap."""
        tee = Tee(self, route, [], table)
        for shadow in targets:
            if req.content_length is not None and req.content_length > shadow.max_body_bytes:
                self.count(tee.labels(shadow), "too_large")
            else:
                tee.targets.append(shadow)
        return tee if tee.targets else None

    def count(self, labels: tuple, outcome: str) -> None:
        self.metrics.shadow.inc(labels + (outcome,))

    def submit(self, copy: Copy) -> None:
        if len(self.queue) >= QUEUE_MAX_CALLS or self.queued_bytes + copy.size > QUEUE_MAX_BYTES:
            self.count(copy.labels, "dropped")
            return
        self.queue.append(copy)
        self.queued_bytes += copy.size
        if len(self.senders) < MAX_SENDERS:
            task = self.loop.create_task(self._sender())
            self.senders.add(task)
            task.add_done_callback(self.senders.discard)

    def close(self) -> None:
        for task in self.senders:
            task.cancel()

    async def _sender(self) -> None:
        while self.queue:
            copy = self.queue.popleft()
            self.queued_bytes -= copy.size
            try:
                outcome = await self._send(copy)
            except Exception:  # a bug must not stop the other copies
                log.exception("shadow copy to %s failed unexpectedly", copy.deployment.id)
                outcome = "failed"
            self.count(copy.labels, outcome)

    async def _send(self, copy: Copy) -> str:
        dep = copy.deployment
        if copy.cancelled is not None and copy.cancelled.done():
            return "cancelled"
        try:
            conn = await self.connect(dep, copy.upstream, copy.table)
        except GatewayError as error:
            log.debug("shadow copy to %s: no connection: %s", dep.id, error.message)
            return "failed"
        sink = Discard(self.loop)
        conn.start(sink, copy.parts, head_only=copy.head_only)
        try:
            async with asyncio.timeout(min(SEND_TIMEOUT_SECONDS, dep.timeouts.total_seconds)):
                if copy.cancelled is not None:
                    await asyncio.wait((sink.done, copy.cancelled), return_when=asyncio.FIRST_COMPLETED)
                    if not sink.done.done():
                        sink.done.cancel()
                        conn.close()  # the client went away: so does its copy (propagate_client_cancellation)
                        return "cancelled"
                status = await sink.done
        except (TimeoutError, GatewayError) as error:
            conn.close()
            log.debug("shadow copy to %s got no answer: %r", dep.id, error)
            return "failed"
        except asyncio.CancelledError:
            conn.close()
            raise
        conn.release()
        return "success" if status < 400 else "error_status"


class Discard:
    """An exchange that reads and drops a plane's answer (wake calls, shadow copies)."""

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

    def on_upgrade(self, tail: bytes) -> None:
        self.on_upstream_lost(UpstreamBroken("plane switched protocols"))

    def on_tunnel_data(self, data: bytes) -> None:
        pass

    def on_tunnel_closed(self) -> None:
        pass
