"""Forwarding one HTTP call to its plane (SPEC §4): heads rewritten, bodies streamed.

`Exchange` is driven by callbacks from both connections: request-body chunks from
the client are written to the plane as they arrive, response events from the plane
are written to the client in the same loop iteration, and each side's transport
pause/resume throttles the other, so memory stays bounded whatever the body size.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from gateway.calls.info import CallInfo
from gateway.errors import ConnectionReset, GatewayError, PayloadTooLarge, UpstreamBroken, UpstreamTimeout
from gateway.headers import PROTECTED, forwarded_value, shadows_protected
from gateway.http.server import HttpConnection, Request, status_line
from gateway.routing.model import Timeouts
from gateway.upstream.pool import UpstreamConnection

MAX_BODY_BYTES = 100 * 1024 * 1024  # SPEC §4
MAX_KEPT_BODY_BYTES = 1024 * 1024  # a body kept for a retry after a reset (SPEC §12 retry_on_reset)

# RFC 9110 §7.6.1 hop-by-hop fields, plus what the gateway sets itself or must not forward.
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
)
# Identity, credentials and client-forged proxy fields: gateway/headers.py, shared with gRPC.
# `http2-settings` goes with an h2c upgrade offer, which the gateway ignores (RFC 9113 §3.1, issue 13).
REQUEST_DROP = HOP_BY_HOP | PROTECTED | {b"host", b"content-length", b"expect", b"http2-settings"}
TRACE_FIELDS = frozenset({b"traceparent", b"tracestate"})  # replaced by the gateway's own when it traces (issue 13)
RESPONSE_DROP = HOP_BY_HOP | {b"x-baseten-request-id", b"x-baseten-deployment-id"}  # both set by the gateway
PAUSE_UPSTREAM = 8  # client reading paused because the plane is not reading our writes


def new_request_id() -> str:
    return os.urandom(16).hex()


def request_head(
    req: Request,
    target: str,
    identity: list[bytes],
    request_id: str,
    scheme: str,
    body_length: int | None = None,
    trace: bytes | None = None,
) -> list[bytes]:
    """The head sent to the plane, as parts to write; `identity` holds the host and x-baseten-* lines.

    With `body_length`, the body is framed by that Content-Length whatever the client sent (a
    shadow copy is sent whole). With `trace` (tracing on) the gateway's traceparent/tracestate
    lines replace the client's (SPEC §4: without tracing they pass through).
    """
    conn = req.conn
    parts = [
        b"%s %s HTTP/1.1\r\n" % (req.method.encode(), target.encode("latin-1")),
        *identity,
        b"x-baseten-request-id: %s\r\nx-forwarded-for: %s\r\nx-forwarded-proto: %s\r\nforwarded: %s\r\n"
        % (request_id.encode(), conn.peer.encode(), scheme.encode(), forwarded_value(conn.peer, req.host, scheme)),
    ]
    if req.host is not None:
        parts.append(b"x-forwarded-host: %s\r\n" % req.host.encode("latin-1"))
    drop = REQUEST_DROP.union(req.connection_tokens) if req.connection_tokens else REQUEST_DROP
    if trace is not None:
        parts.append(trace)
        drop = drop | TRACE_FIELDS
    for name, value in req.headers:
        # `x_baseten_model_id` is `x-baseten-model-id` to a CGI-style plane (issue 9 §3)
        if name not in drop and not (b"_" in name and shadows_protected(name)):
            parts.append(b"%s: %s\r\n" % (name, value))
    if body_length is not None:
        parts.append(b"content-length: %d\r\n\r\n" % body_length)
    elif req.chunked:
        parts.append(b"transfer-encoding: chunked\r\n\r\n")
    elif req.content_length is not None:
        parts.append(b"content-length: %d\r\n\r\n" % req.content_length)
    else:
        parts.append(b"\r\n")
    return parts


class Exchange:
    """One call in flight between a client connection and a plane connection.

    `on_done(exchange)` is called exactly once, when the response is complete, the
    call failed, or the client went away.
    """

    __slots__ = (
        "req", "client", "upstream", "request_id", "loop", "on_done", "finished", "out", "head_sent", "status",
        "chunked_out", "request_sent", "error", "timeouts", "started", "last_activity", "head_only",
        "context", "answered_by", "kept", "kept_size", "on_reset", "info",
    )  # fmt: skip

    def __init__(
        self, req: Request, upstream: UpstreamConnection, request_id: str, timeouts: Timeouts,
        on_done: Callable[[Exchange], None], context: Any = None, deployment_id: str = "",
    ) -> None:  # fmt: skip
        self.req = req
        self.client: HttpConnection = req.conn
        self.upstream = upstream
        self.request_id = request_id
        self.loop = self.client.loop
        self.on_done = on_done
        self.context = context  # the caller's own state for on_done (route, labels, start time)
        self.finished = False
        self.out: list[bytes] = []
        self.head_sent = False
        self.status = 0
        self.chunked_out = False
        self.request_sent = False
        self.error: GatewayError | None = None
        self.timeouts = timeouts
        self.started = self.last_activity = self.loop.time()
        self.head_only = req.method == "HEAD"
        # The gateway's own response fields: the request id (SPEC §4) and the deployment that answered (§6).
        self.answered_by = b"x-baseten-request-id: %s\r\n" % request_id.encode()
        # Retry after a reset (SPEC §12 retry_on_reset): the body as sent, while it stays small, and
        # who decides (`on_reset(exchange, error)` -> True when it took the call over).
        self.kept: list[bytes] | None = None
        self.kept_size = 0
        self.on_reset: Callable[[Exchange, GatewayError], bool] | None = None
        self.info: CallInfo | None = None  # an observed call's (issue 13): bytes and first byte counted into it
        if deployment_id:
            self.answered_by += b"x-baseten-deployment-id: %s\r\n" % deployment_id.encode()

    def __repr__(self) -> str:
        return f"<Exchange {self.request_id[:8]} status={self.status} head_sent={self.head_sent}>"

    # -- start ---------------------------------------------------------------------------

    def retry_after_reset(self, on_reset: Callable[[Exchange, GatewayError], bool]) -> None:
        """Keep the request body (up to MAX_KEPT_BODY_BYTES) so `on_reset` may send the call again
        if the plane's connection breaks before any answer byte; call before `start`."""
        req = self.req
        if req.content_length is None or req.content_length <= MAX_KEPT_BODY_BYTES:
            self.kept, self.on_reset = [], on_reset

    def start(self, head: list[bytes]) -> None:
        req, client, upstream = self.req, self.client, self.upstream
        client.on_lost = self.client_lost
        client.write_paused_callbacks.append(upstream.pause_reading)
        body = req.body
        if not req.has_body:
            self.request_sent = True
        elif body.complete and not req.chunked and body.error is None:
            if self.kept is not None:
                self._keep(body.chunks, body.buffered)
            head += body.chunks  # the whole body is here already: one write for head and body
            body.chunks, body.buffered = [], 0
            self.request_sent = True
        upstream.start(self, head, head_only=self.head_only, body_pending=not self.request_sent)
        if not self.request_sent:
            if req.expect_continue and not body.complete:
                client.send_continue()
            body.attach(self)

    # -- request body sink (called by Body) -------------------------------------------------

    def replay(self, head: list[bytes], body: list[bytes]) -> None:
        """Start as the retry of a call whose first connection broke: the kept body goes with the
        head (framed by its length, `request_head(body_length=...)`), whole."""
        self.client.on_lost = self.client_lost
        self.client.write_paused_callbacks.append(self.upstream.pause_reading)
        self.request_sent = True
        self.upstream.start(self, head + body, head_only=self.head_only)

    def _keep(self, chunks: list[bytes], size: int) -> None:
        kept = self.kept
        if kept is None:
            return
        self.kept_size += size
        if self.kept_size > MAX_KEPT_BODY_BYTES:
            self.kept = None  # too big to keep: this call is not retried
        else:
            kept += chunks

    def write(self, data: bytes) -> None:
        if self.kept is not None:
            self._keep([data], len(data))
        if self.req.chunked:
            self.upstream.writelines([b"%x\r\n" % len(data), data, b"\r\n"])
        else:
            self.upstream.write(data)

    def write_eof(self) -> None:
        if self.req.chunked:
            self.upstream.write(b"0\r\n\r\n")
        self.request_sent = True
        self.upstream.request_done()

    def fail(self, error: GatewayError) -> None:
        """The request body broke a limit: abort the plane call (SPEC §4 413)."""
        self._abort(error)

    def upstream_write_paused(self, paused: bool) -> None:
        if paused:
            self.client.pause_reading(PAUSE_UPSTREAM)
        else:
            self.client.resume_reading(PAUSE_UPSTREAM)

    # -- response events (called by UpstreamConnection) -------------------------------------

    def on_response_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        if self.info is not None:
            self.info.first_byte = self.loop.time()
        req, client = self.req, self.client
        out = self.out
        out.append(status_line(status, reason or None))
        has_length = False
        tokens = self.upstream.connection_tokens  # fields the plane's Connection header names are hop-by-hop too
        drop = RESPONSE_DROP.union(tokens) if tokens else RESPONSE_DROP
        for name, value in headers:
            if name in drop:
                continue
            if name == b"content-length":
                has_length = True
            out.append(b"%s: %s\r\n" % (name, value))
        out.append(self.answered_by)
        if not (has_length or self.head_only or status in (204, 304)):
            if req.version == "1.1":
                self.chunked_out = True
                out.append(b"transfer-encoding: chunked\r\n")
            else:
                client.must_close = True  # HTTP/1.0: the body ends when the connection does
        if client.must_close:
            out.append(b"connection: close\r\n\r\n")
        elif req.version == "1.0":
            out.append(b"connection: keep-alive\r\n\r\n")
        else:
            out.append(b"\r\n")
        self.head_sent = True
        client.response_started = True

    def on_response_body(self, data: bytes) -> None:
        if self.info is not None:
            self.info.bytes_out += len(data)
        if self.chunked_out:
            self.out += (b"%x\r\n" % len(data), data, b"\r\n")
        else:
            self.out.append(data)

    def on_response_complete(self) -> None:
        if self.chunked_out:
            self.out.append(b"0\r\n\r\n")
        self.flush()
        self._finish()

    def flush(self) -> None:
        if self.out:
            out, self.out = self.out, []
            self.client.writelines(out)
            self.last_activity = self.loop.time()

    def on_upstream_lost(self, error: GatewayError) -> None:
        self._abort(error)

    # A plain exchange never asks for an upgrade, so the pool never tunnels it; defensively:
    def on_upgrade(self, tail: bytes) -> None:
        self._abort(UpstreamBroken("plane switched protocols without being asked to"))

    def on_tunnel_data(self, data: bytes) -> None:
        self._abort(UpstreamBroken("plane switched protocols without being asked to"))

    def on_tunnel_closed(self) -> None:
        self._abort(UpstreamBroken("plane closed the connection mid-call"))

    # -- endings --------------------------------------------------------------------------

    def client_lost(self) -> None:
        """The client went away: cancel the plane call by closing its connection."""
        self.status = self.status or 499
        self.upstream.close()
        self._finish()

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        self.req.body.detach()
        if self.request_sent and not self.upstream.closed:
            self.upstream.release()
        else:
            self.upstream.close()  # a half-sent request leaves the connection unusable
        self.on_done(self)

    def _abort(self, error: GatewayError) -> None:
        if self.finished:
            return
        if (
            self.on_reset is not None
            and isinstance(error, ConnectionReset)
            and not self.head_sent  # nothing of the answer reached the client
            and self.kept is not None
            and self.req.body.complete
            and self.on_reset(self, error)
        ):
            self.finished = True  # the handler goes on with a new exchange; this one ends quietly
            self.req.body.detach()
            self.upstream.close()
            return
        self.error = error
        self.upstream.close()
        self.out = []
        if self.head_sent:
            self.client.abort()  # a truncated response must look truncated, not complete
        else:
            self.client.must_close = self.client.must_close or not self.req.body.complete
            self.status = error.status
            self.client.send_error(error, (("x-baseten-request-id", self.request_id),))
        self._finish()

    # -- timeouts: checked by a sweeper, so no timer is armed per call --------------------------

    def check_deadlines(self, now: float) -> None:
        t = self.timeouts
        if now - self.started >= t.total_seconds:
            self._abort(UpstreamTimeout(f"the call did not finish within {t.total_seconds:g} s"))
        elif not self.head_sent and now - self.started >= t.response_start_seconds:
            self._abort(UpstreamTimeout(f"the plane did not start answering within {t.response_start_seconds:g} s"))
        elif self.head_sent and now - self.last_activity >= t.idle_seconds:
            self._abort(UpstreamTimeout(f"the plane sent nothing for {t.idle_seconds:g} s"))


def body_limit_error(req: Request) -> PayloadTooLarge | None:
    if req.content_length is not None and req.content_length > MAX_BODY_BYTES:
        return PayloadTooLarge(f"request body of {req.content_length} bytes exceeds {MAX_BODY_BYTES} bytes")
    return None


# RFC 6455 §4: the 101 response the client must see; Upgrade/Connection are hop-by-hop elsewhere.
UPGRADE_DROP = RESPONSE_DROP - {b"connection", b"upgrade"}


class TunnelExchange(Exchange):
    """A WebSocket session: the upgrade request goes to the plane; on its 101, bytes flow both ways.

    The relay does not parse frames: text and binary messages of any size, ping/pong, and close
    frames with their codes and reasons pass through untouched, in both directions (as nginx
    relays WebSocket). When either side's connection ends, the other is closed at once.
    """

    __slots__ = ("tunnel",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tunnel = False

    def start(self, head: list[bytes]) -> None:
        head.insert(-1, b"connection: upgrade\r\nupgrade: %s\r\n" % (self.req.upgrade or b"websocket"))
        self.client.on_lost = self.client_lost
        self.client.write_paused_callbacks.append(self.upstream.pause_reading)
        self.request_sent = True
        self.upstream.start(self, head, upgrade=True)

    def on_response_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        if status != 101:
            self.client.must_close = True  # the plane refused the upgrade: relay its answer, then close
            super().on_response_head(status, reason, headers)
            return
        self.status = 101
        if self.info is not None:
            self.info.first_byte = self.loop.time()
        out = self.out
        out.append(status_line(101, reason or None))
        for name, value in headers:
            if name not in UPGRADE_DROP:
                out.append(b"%s: %s\r\n" % (name, value))
        out += (self.answered_by, b"\r\n")
        self.head_sent = True
        self.client.response_started = True

    def on_upgrade(self, tail: bytes) -> None:
        self.tunnel = True
        self.last_activity = self.loop.time()
        self.client.start_tunnel(self.to_upstream)
        if tail:
            self.on_tunnel_data(tail)

    def to_upstream(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        if self.info is not None:
            self.info.bytes_in += len(data)
        self.upstream.write(data)

    def on_tunnel_data(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        if self.info is not None:
            self.info.bytes_out += len(data)
        self.client.write(data)

    def on_tunnel_closed(self) -> None:
        """The plane's side ended: end the client's too (its close frame, if any, is already relayed)."""
        self.client.close()
        self._finish()

    def client_lost(self) -> None:
        if self.tunnel:
            self.upstream.close()
            self._finish()
        else:
            super().client_lost()

    def check_deadlines(self, now: float) -> None:
        if not self.tunnel:
            super().check_deadlines(now)
        elif now - self.last_activity >= self.timeouts.idle_seconds:
            # A session silent both ways (pings count) for the idle limit is closed.
            self.client.close()
            self.upstream.close()
            self._finish()
