"""HTTP/2 on the public listener (issue 13): each stream an HTTP call of the same pipeline as HTTP/1.1.

The connection is the gRPC listener's frame layer (`gateway.grpc.h2server`, with all its flood
limits: benchmarks/h2_floods.md); `HttpConnection` hands it a connection that chose `h2` by ALPN or
opened with the h2c preface. `PublicApp` sends a stream whose content-type is `application/grpc*`
to the gRPC relay and any other to `H2Call`: the `HttpConnection` of one stream, carrying a
`Request` through the public handler unchanged (resolve, auth, admission, holds, canary and shadow,
retry_on_reset, §4 forwarding, error bodies, size limits) to the plane over HTTP/1.1.

Flow control is the backpressure both ways: request DATA is acknowledged (WINDOW_UPDATE) as the
plane takes it, as HTTP/1.1 reads the socket (the body buffer's and the plane's pauses hold the
credit back); response data goes out as the peer's windows allow, and while it waits the plane's
connection is not read. The plane's connection-specific fields (RFC 9113 §8.2.2) are dropped.
"""

from __future__ import annotations

import base64
import os
from typing import Any

from gateway.errors import ClientError, GatewayError, InternalError
from gateway.grpc.h2server import STREAM_WINDOW, App, Handler, Headers, ServerStream
from gateway.grpc.wire import INTERNAL_ERROR, PROTOCOL_ERROR
from gateway.http.proxy import RESPONSE_DROP, UPGRADE_DROP, Exchange, TunnelExchange
from gateway.http.server import Handler as HttpHandler
from gateway.http.server import HttpConnection, Request, RequestTimeout, body_too_slow, read_fields
from gateway.http.shadow import ShadowExchange

GRPC = b"application/grpc"


class H2Output:
    """The response side of an `Exchange` on an HTTP/2 stream: HEADERS and DATA frames, not HTTP/1.1 bytes."""

    __slots__ = ()

    def on_response_head(self: Any, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        tokens = self.upstream.connection_tokens  # fields the plane's Connection header names are hop-by-hop too
        self._respond(status, status, headers, RESPONSE_DROP.union(tokens) if tokens else RESPONSE_DROP)

    def _respond(self: Any, status: int, shown: int, headers: list[tuple[bytes, bytes]], drop: frozenset) -> None:
        """HEADERS with `shown` as :status, the plane's fields but `drop`, and the gateway's own."""
        self.status = status
        fields = [(b":status", b"%d" % shown)]
        fields += [(name, value) for name, value in headers if name not in drop]
        fields += [tuple(line.split(b": ", 1)) for line in self.answered_by.split(b"\r\n") if line]
        self.client.stream.respond(fields)
        self.head_sent = True
        self.client.response_started = True

    def on_response_body(self: Any, data: bytes) -> None:
        self.last_activity = self.loop.time()
        if not self.client.stream.send_data(data):
            self.upstream.pause_reading(True)  # until the client's windows open (H2Call.client_drained)

    def on_response_complete(self: Any) -> None:
        self.client.stream.send_trailers([])  # END_STREAM once the data still queued is written
        self._finish()

    def flush(self: Any) -> None:
        pass  # each DATA frame is queued on the stream as it arrives


class H2Exchange(H2Output, Exchange):
    __slots__ = ()


class H2ShadowExchange(H2Output, ShadowExchange):
    __slots__ = ()


# What the plane's 101 carries that an extended CONNECT's 200 does not (RFC 8441 §5: no key, no accept).
TUNNEL_DROP = UPGRADE_DROP | {b"connection", b"upgrade", b"sec-websocket-accept"}


class H2TunnelExchange(H2Output, TunnelExchange):
    """A WebSocket over an HTTP/2 stream (RFC 8441): the plane gets an HTTP/1.1 upgrade, the client a
    200 on its extended CONNECT, and the stream's DATA carries the WebSocket bytes both ways."""

    __slots__ = ()

    def on_response_head(self: Any, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        if status == 101:
            self._respond(101, 200, headers, TUNNEL_DROP)
        else:  # refused: its answer is relayed and the stream ends with it
            H2Output.on_response_head(self, status, reason, headers)

    on_tunnel_data = H2Output.on_response_body

    def on_tunnel_closed(self: Any) -> None:
        """The plane's side ended: the stream ends too (after the close frame, already relayed)."""
        self.client.stream.send_trailers([])
        self._finish()


class H2Call(HttpConnection):
    """One HTTP call on an HTTP/2 stream: the connection its `Request` and `Exchange` talk to, and
    the h2 server's handler of the stream. What is not HTTP/1.1 framing is HttpConnection's own."""

    h2 = True

    def __init__(self, handler: HttpHandler, stream: ServerStream) -> None:  # no parser, no transport: a stream
        self.handler = handler
        self.stream = stream
        self.tracker = None
        self.loop = stream.conn.loop
        client = stream.client
        self.peer = client[0] if client else ""
        self.sni = stream.sni
        self.scheme = stream.scheme
        self.current: Request | None = None
        self.task = None
        self.paused = 0
        self.owed = 0  # request bytes received while paused: acknowledged on resume
        self.closed = False
        self.response_started = False
        self.must_close = False
        self.draining = False
        self.body_waiter = None
        self.write_paused_callbacks = []
        self.on_lost = None
        self.tunnel = None
        # The HTTP/1.1 body rule, per stream (server.body_too_slow, swept by gateway.http.h2sweep):
        self.last_read = self.loop.time()  # the last DATA of this stream (or when we began waiting for it)
        self.body_reading = 0.0
        self.body_clock: float | None = None
        self.timed_out = False

    def __repr__(self) -> str:
        return f"<H2Call {self.stream!r} {self.current!r}>"

    def request(self, fields: Headers) -> Request:
        """The `Request` of the stream's HEADERS (checked by `malformed.request_problem` already)."""
        req = self.current = Request(self)
        req.version = "2"
        cookies = []
        protocol = None
        for name, value in fields:
            if name[:1] == b":":
                if name == b":protocol":
                    protocol = value
                elif name == b":method":
                    req.method = value.decode("ascii", "replace")
                elif name == b":path":
                    req.target = value.decode("latin-1")
                elif name == b":authority":
                    req.host = value.decode("latin-1")  # routes like Host (RFC 9113 §8.3.1)
                continue
            if name == b"cookie":
                cookies.append(value)  # one field again for HTTP/1.1 (RFC 9113 §8.2.3)
                continue
            if name != b"host" or req.host is None:  # a host beside :authority is the same (request_problem)
                req.headers.append((name, value))
        if cookies:
            req.headers.append((b"cookie", b"; ".join(cookies)))
        read_fields(req)
        if protocol is not None:
            return self._extended_connect(req, protocol)
        if self.stream.ended:
            if req.content_length:
                raise ClientError("the request ended before its Content-Length")
            req.content_length = None
            req.body.feed_eof()
        elif req.content_length is None:
            req.chunked = True  # the plane reads a body of unknown length as chunks (RFC 9112 §7.1)
        elif req.content_length <= STREAM_WINDOW:
            # After an early answer (401, 404, ...) the rest of such a body is dropped as it comes,
            # without RST_STREAM(NO_ERROR), which some clients (curl 7.88) take for a failed request.
            self.stream.quiet = True
        return req

    def _extended_connect(self, req: Request, protocol: bytes) -> Request:
        """RFC 8441: a CONNECT with `:protocol websocket` is, to the plane, an HTTP/1.1 upgrade
        request (RFC 6455 §4.1, with a key of the gateway's; the client's stream carries no body)."""
        req.method = "GET"
        req.upgrade = protocol
        req.connection_tokens = (b"upgrade",)
        req.headers.append((b"sec-websocket-key", base64.b64encode(os.urandom(16))))
        req.body.feed_eof()
        return req

    # -- the stream's events (h2server.Handler)

    def client_data(self, data: bytes, flow: int) -> None:
        req = self.current
        if req is None or self.stream.done:
            self.stream.ack(flow)
            return
        if self.tunnel is not None:
            self.tunnel(data)
            self._took(flow)
            return
        self.last_read = self.stream.conn.last_read  # the read that brought this DATA
        body = req.body
        if req.content_length is not None and body.received + len(data) > req.content_length:
            self._malformed("more DATA than the request's Content-Length")  # RFC 9113 §8.1.1
            return
        body.feed(data)
        self._took(flow)

    def _took(self, flow: int) -> None:
        if self.paused:
            self.owed += flow
        else:
            self.stream.ack(flow)

    def client_end(self) -> None:
        req = self.current
        if self.tunnel is not None:  # the client's side of the WebSocket ended (its FIN): so does the session
            self.stream.send_trailers([])
            self.connection_lost(None)
            return
        if req is None or req.body.complete:
            return
        if req.content_length is not None and req.body.received != req.content_length:
            self._malformed("less DATA than the request's Content-Length")
            return
        req.body.feed_eof()
        if self.body_waiter is not None and not self.body_waiter.done():
            self.body_waiter.set_result(None)

    def client_reset(self) -> None:
        self.connection_lost(None)

    def client_drained(self) -> None:
        for callback in list(self.write_paused_callbacks):
            callback(False)

    def _malformed(self, problem: str) -> None:
        self.stream.abort(PROTOCOL_ERROR)
        self.connection_lost(None)

    # -- what the handler and the exchange call (HttpConnection's interface)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            super().connection_lost(exc)

    def finish(self, req: Request) -> None:
        if self.current is not req:
            return
        self.on_lost = None
        self.task = None
        self.write_paused_callbacks.clear()
        if not (self.stream.done or self.response_started):
            self.send_error(InternalError("the call ended without an answer"))

    def send_simple(
        self, status: int, body: bytes, headers: tuple[tuple[str, str], ...] | list = (), *,
        content_type: bytes = b"application/json",
    ) -> None:  # fmt: skip
        self.response_started = True
        fields = [(b":status", b"%d" % status), (b"content-type", content_type), (b"content-length", b"%d" % len(body))]
        fields += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        stream = self.stream
        stream.respond(fields, end=not body)
        if body:
            stream.send_data(body)
            stream.send_trailers([])

    def send_continue(self) -> None:
        self.stream.respond([(b":status", b"100")])  # an interim response (RFC 9113 §8.1)
        self.last_read = self.loop.time()  # the client sends its body from now on

    def pause_reading(self, reason: int) -> None:
        self.paused |= reason

    def resume_reading(self, reason: int) -> None:
        if not self.paused & reason:
            return
        self.paused &= ~reason
        if not self.paused:
            self.last_read = self.loop.time()  # a stall is counted from when we read again (server.sweep)
            if self.owed:
                owed, self.owed = self.owed, 0
                self.stream.ack(owed)

    def start_tunnel(self, sink: Any) -> None:
        self.tunnel = sink

    def write(self, data: bytes) -> None:
        self.stream.send_data(data)

    def writelines(self, data: list[bytes]) -> None:
        self.stream.send_data(b"".join(data))

    def close(self) -> None:
        if self.stream.trailers is None:  # the answer is not complete (else the stream ends after it)
            self.abort()

    def abort(self) -> None:
        """A truncated answer must look truncated: the stream is reset, never ended."""
        self.closed = True
        self.stream.abort(INTERNAL_ERROR)

    # -- the slow-body rule (gateway.http.h2sweep)

    def sweep(self, now: float, arriving: int, held_back: bool) -> bool:
        """The HTTP/1.1 rule for a request body that stalls or trickles (`server.body_too_slow`), on this
        stream: 408 (RST_STREAM once the answer has begun) and the plane call aborted; True if so.
        `arriving`: bytes of a DATA frame of this stream still coming in; `held_back`: the client waits
        for the connection's window, which we withhold (other streams' plane calls are slow)."""
        req = self.current
        if req is None or self.closed or self.tunnel is not None or self.stream.done or req.body.complete:
            return False
        if held_back:
            self.body_clock = None
            self.last_read = now  # not the client's stall: counted again once the window opens
            return False
        if arriving:
            self.last_read = max(self.last_read, self.stream.conn.last_read)
        problem = body_too_slow(self, req, now, arriving)
        if problem is None:
            return False
        self.timed_out = True
        if not self.response_started:
            self.send_error(RequestTimeout(problem))  # then RST_STREAM(NO_ERROR) if the body was still coming
        self.connection_lost(None)  # the plane call is cancelled (or the hold left), as on the client's reset
        self.stream.abort(INTERNAL_ERROR)  # an answer begun is truncated, and must look it (no-op after the 408)
        return True


class PublicApp:
    """The app of the public listener's HTTP/2 connections: gRPC to the relay, HTTP to the public handler."""

    def __init__(self, handler: HttpHandler, grpc: App) -> None:
        self.handler = handler
        self.grpc = grpc

    def open(self, stream: ServerStream, headers: Headers) -> Handler:
        for name, value in headers:
            if name == b"content-type" and value[:16] == GRPC and value[16:17] in (b"", b"+", b";"):  # not grpc-web
                return self.grpc.open(stream, headers)
        call = H2Call(self.handler, stream)
        try:
            req = call.request(headers)
        except GatewayError as error:
            call.send_error(error)
            return call
        call._start(req)
        return call
