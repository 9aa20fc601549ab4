"""HTTP/1.1 server: httptools parsing on an asyncio Protocol.

The connection parses bytes into `Request`s and hands each to the application's
handler, one at a time (pipelined requests wait their turn). The handler may answer
synchronously (no task, the proxy's fast path) or spawn a task for slower work.
Request bodies are pushed into `Body`, which either buffers a little or, once the
application attaches a sink, forwards each chunk as it arrives. Writes go straight
to the transport; flow control is the transport's pause/resume callbacks.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Protocol

import httptools

from gateway.errors import ClientError, GatewayError, InternalError, PayloadTooLarge, UnsupportedTransferCoding
from gateway.headers import absolute_form
from gateway.tls import sni_of

log = logging.getLogger("gateway.http")

MAX_HEADER_BYTES = 64 * 1024
MAX_HEADERS = 128
BODY_BUFFER_HIGH_WATER = 256 * 1024  # buffered before a sink is attached, then reading pauses
MAX_URL_BYTES = 16 * 1024  # request-target; longer gets 414
HEAD_TIMEOUT_SECONDS = 10.0  # a request head must arrive within this of its first byte (slowloris)
KEEPALIVE_TIMEOUT_SECONDS = 75.0  # an idle keep-alive connection is closed after this (nginx's default)
BODY_TIMEOUT_SECONDS = 60.0  # a request body that stalls this long (while we are reading) gets 408
# ... and one that trickles: past BODY_TIMEOUT_SECONDS of reading, it must have averaged this rate
# (Apache mod_reqtimeout's `body=20,MinRate=500`; nginx's per-read client_body_timeout alone lets
# 1 byte per 5 s hold a connection for the 1200 s call limit, issue 9 §3).
BODY_MIN_RATE = 500  # bytes per second of reading time
SWEEP_SECONDS = 1.0
LINGER_SECONDS = 2.0  # after an early answer (413, 401, ...) to a body still arriving
LINGER_MAX_BYTES = 16 * 1024 * 1024
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # an h2c client with prior knowledge (RFC 9113 §3.3)

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_STATUS_LINES = {code: b"HTTP/1.1 %d %s\r\n" % (code, phrase) for code, phrase in _REASONS.items()}


def status_line(status: int, reason: bytes | None = None) -> bytes:
    if reason is None:
        line = _STATUS_LINES.get(status)
        if line is not None:
            return line
        reason = _REASONS.get(status, b"")
    return b"HTTP/1.1 %d %s\r\n" % (status, reason)


class Sink(Protocol):
    def write(self, data: bytes) -> None: ...
    def write_eof(self) -> None: ...
    def fail(self, error: GatewayError) -> None: ...


class Body:
    """A request body as it arrives: buffered until a sink is attached, then pushed."""

    __slots__ = ("conn", "chunks", "buffered", "received", "complete", "sink", "limit", "error")

    def __init__(self, conn: HttpConnection) -> None:
        self.conn = conn
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.received = 0
        self.complete = False
        self.sink: Sink | None = None
        self.limit: int | None = None
        self.error: GatewayError | None = None

    def feed(self, data: bytes) -> None:
        self.received += len(data)
        if self.limit is not None and self.received > self.limit:
            self.fail(PayloadTooLarge(f"request body exceeds {self.limit} bytes"))
            return
        if self.sink is not None:
            self.sink.write(data)
            return
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered > BODY_BUFFER_HIGH_WATER:
            self.conn.pause_reading(HttpConnection.PAUSE_BODY)

    def feed_eof(self) -> None:
        self.complete = True
        if self.sink is not None:
            self.sink.write_eof()

    def fail(self, error: GatewayError) -> None:
        if self.error is None:
            self.error = error
            self.conn.on_body_error(error)
            if self.sink is not None:
                self.sink.fail(error)

    def attach(self, sink: Sink) -> None:
        """Forward everything received so far and everything that follows to `sink`."""
        self.sink = sink
        if self.error is not None:
            sink.fail(self.error)
            return
        chunks, self.chunks, self.buffered = self.chunks, [], 0
        for chunk in chunks:
            sink.write(chunk)
        self.conn.resume_reading(HttpConnection.PAUSE_BODY)
        if self.complete:
            sink.write_eof()

    def detach(self) -> None:
        self.sink = None

    async def read_all(self, limit: int) -> bytes:
        """The whole body (for small admin calls); 413 past `limit`."""
        while not self.complete:
            if self.received > limit:
                raise PayloadTooLarge(f"request body exceeds {limit} bytes")
            waiter = self.conn.loop.create_future()
            self.conn.body_waiter = waiter
            self.conn.resume_reading(HttpConnection.PAUSE_BODY)
            await waiter
        data = b"".join(self.chunks)
        if len(data) > limit:
            raise PayloadTooLarge(f"request body exceeds {limit} bytes")
        return data


class Request:
    __slots__ = (
        "conn", "method", "target", "version", "keep_alive", "headers", "host", "authorization",
        "content_length", "chunked", "expect_continue", "routing_key", "connection_tokens", "body",
        "upgrade",
    )  # fmt: skip

    def __init__(self, conn: HttpConnection) -> None:
        self.conn = conn
        self.method = ""
        self.target = ""
        self.version = "1.1"
        self.keep_alive = True
        self.headers: list[tuple[bytes, bytes]] = []  # names lowercased, in order
        self.host: str | None = None
        self.authorization: str | None = None
        self.content_length: int | None = None
        self.chunked = False
        self.expect_continue = False
        self.routing_key: str | None = None
        self.connection_tokens: tuple[bytes, ...] = ()
        self.body = Body(conn)
        self.upgrade: bytes | None = None

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.target[:80]!r} host={self.host!r}>"


def read_fields(req: Request) -> None:
    """Read the request's header fields (`req.headers`, names lowercased, kept to forward) for
    routing and framing: one pass once the head is complete, the same for HTTP/1.1 and h2."""
    for name, value in req.headers:
        if name not in READ_FIELDS:
            continue
        if name == b"host":
            if req.host is not None:
                raise ClientError("more than one Host header")  # RFC 9112 §3.2
            req.host = value.decode("latin-1")
        elif name == b"authorization":
            if req.authorization is not None:
                # One credential per request (RFC 9110 §11.6.2 has no list form): which of two a
                # gateway and a plane would each pick is exactly the ambiguity to refuse.
                raise ClientError("more than one Authorization header")
            req.authorization = value.decode("latin-1")
        elif name == b"content-length":
            if not value.isdigit() or (req.content_length is not None and req.content_length != int(value)):
                raise ClientError("invalid Content-Length")
            req.content_length = int(value)
        elif name == b"transfer-encoding":
            # llhttp rejects a coding list whose last item is not "chunked"; any other coding before
            # it would be forwarded unannounced (the body re-chunked, its gzip bytes taken as content).
            if value.strip().lower() != b"chunked" or req.chunked:
                raise UnsupportedTransferCoding(
                    "only the chunked transfer coding is accepted; send other codings as Content-Encoding"
                )
            req.chunked = True
        elif name == b"expect":
            req.expect_continue = value.lower() == b"100-continue"
        elif name == b"x-baseten-routing-key":
            req.routing_key = value.decode("latin-1")
        elif name == b"connection":
            req.connection_tokens += tuple(t.strip().lower() for t in value.split(b","))
        elif name == b"upgrade":
            req.upgrade = value


READ_FIELDS = frozenset({b"host", b"authorization", b"content-length", b"transfer-encoding", b"expect",
                         b"x-baseten-routing-key", b"connection", b"upgrade"})  # fmt: skip


# A handler answers a request and then calls `request.conn.finish(request)`, either before it
# returns (the synchronous fast path) or later from a callback or a task started with `spawn`.
Handler = Callable[[Request], None]


def async_handler(fn: Callable[[Request], Awaitable[None]]) -> Handler:
    """Adapt a coroutine handler: each request runs in a task and finishes when it returns."""
    return lambda req: req.conn.spawn(req, fn(req))


class HttpConnection(asyncio.Protocol):
    """One client connection. `handler(request)` must write a complete response."""

    PAUSE_BODY = 1
    PAUSE_PIPELINE = 2
    PAUSE_WRITE = 4  # the client is not reading what we send
    h2 = False  # a stream of an HTTP/2 connection (gateway.http.h2.H2Call), not a connection of its own

    def __init__(
        self, handler: Handler, *, scheme: str = "http", tracker: set | None = None,
        h2: Callable[[], asyncio.Protocol] | None = None,
    ) -> None:  # fmt: skip
        self.handler = handler
        self.h2_protocol = h2  # serves the connections that choose HTTP/2 (ALPN h2, or the h2c preface)
        self.sniffed: bytes | None = b"" if h2 is not None and scheme == "http" else None
        self.scheme = scheme
        self.tracker = tracker
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer = ""
        self.sni: str | None = None  # the TLS server name the client asked for
        self.req: Request = _NO_REQUEST  # being parsed (httptools calls on_message_begin first)
        self.current: Request | None = None  # being answered
        self.starting: Request | None = None  # parsed in this read, answered at its end
        self.pipeline: collections.deque[Request] = collections.deque()
        self.task: asyncio.Task | None = None
        self.header_bytes = 0
        self.in_trailers = False  # the current message's head is complete: fields are trailers
        self.body_reading = 0.0  # seconds spent waiting for the current request's body (not paused)
        self.body_clock: float | None = None
        self.url_parts: list[bytes] = []
        self.paused = 0
        self.closed = False
        self.response_started = False
        self.must_close = False
        self.body_waiter: asyncio.Future | None = None
        self.write_paused_callbacks: list[Callable[[bool], None]] = []
        self.on_lost: Callable[[], None] | None = None
        self.lingering = False
        self.lingered = 0
        self.tunnel: Callable[[bytes], None] | None = None  # after a protocol upgrade: raw bytes go here
        self.upgrade_tail = b""
        self.last_read = 0.0
        self.head_started: float | None = None  # a request head is being received since then
        self.draining = False  # close after the current response (the listener is shutting down)

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.last_read = self.loop.time()
        ssl_object = transport.get_extra_info("ssl_object")
        if self.h2_protocol is not None and ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
            self._hand_over(b"")
            return
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else ""
        self.sni = sni_of(transport)  # the handshake is done by now
        if self.tracker is not None:
            self.tracker.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.tracker is not None:
            self.tracker.discard(self)
        if self.on_lost is not None:
            callback, self.on_lost = self.on_lost, None
            callback()
        if self.body_waiter is not None and not self.body_waiter.done():
            self.body_waiter.set_exception(ConnectionError("client went away"))

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel(data)
            return
        self.last_read = self.loop.time()
        if self.sniffed is not None:
            data = self._sniff(data)
        if self.lingering:
            self.lingered += len(data)
            if self.lingered > LINGER_MAX_BYTES:
                self.close()
            return
        try:
            self._feed(data)
        finally:
            req, self.starting = self.starting, None
            if req is not None:
                self._start(req)  # after the whole read is parsed: a small body is complete by now

    def _sniff(self, data: bytes) -> bytes:
        """The first bytes of a cleartext connection: the h2c preface hands it to the HTTP/2 server."""
        data = self.sniffed + data  # type: ignore[operator]
        if len(data) < len(H2_PREFACE) and H2_PREFACE.startswith(data):
            self.sniffed = data
            if self.head_started is None:
                self.head_started = self.loop.time()  # a preface is a head too: HEAD_TIMEOUT_SECONDS (slowloris)
            return b""
        self.sniffed = None
        if data.startswith(H2_PREFACE):
            self._hand_over(data)
            return b""
        return data

    def _hand_over(self, data: bytes) -> None:
        protocol = self.h2_protocol() if self.h2_protocol is not None else None
        if self.tracker is not None:
            self.tracker.discard(self)
        self.closed = True
        if protocol is None or self.transport is None:
            return
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        if data:
            protocol.data_received(data)

    def _feed(self, data: bytes) -> None:
        if not data:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            if self.req.upgrade is not None and self.req.upgrade.strip().lower() == b"h2c":
                self._refuse_h2c(data[upgrade.args[0] :])
                return
            # The handler of the upgrade request decides (and answers); nothing after it is parsed.
            # Bytes after the head already belong to the upgraded protocol: keep them for the tunnel.
            self.upgrade_tail = data[upgrade.args[0] :]
            self.req.keep_alive = False  # unless it becomes a tunnel, the connection ends with this answer
            self.must_close = True
            self.pause_reading(self.PAUSE_BODY)
            if self.current is None and self.starting is None:
                self._reject(ClientError("unexpected protocol upgrade"))
        except httptools.HttpParserError as exc:
            if self.current is not None and self.current.body.error is not None:
                return  # a body limit tripped inside a callback; already being answered
            self.starting = None
            cause = exc.__context__
            error = cause if isinstance(cause, GatewayError) else ClientError(f"malformed HTTP request: {exc}")
            self._reject(error)

    def _refuse_h2c(self, tail: bytes) -> None:
        """An h2c upgrade offer (curl --http2 on http://) is ignored and answered in HTTP/1.1 (RFC 9110
        §7.8). llhttp stopped after the head (it skips the body of an upgrade): the body is read here."""
        req = self.req
        req.upgrade = None
        req.body.complete = not req.has_body  # llhttp called the head a complete message
        self.parser = httptools.HttpRequestParser(self)
        if req.chunked:  # rare: its end is found by a parser of its own, and the connection ends with it
            self.must_close = req.keep_alive = False
            self.tunnel = _ChunkedBody(self).feed
        elif req.content_length:
            self.tunnel = _LengthBody(self, req.content_length).feed
        if tail:
            self.data_received(tail)

    def eof_received(self) -> bool | None:
        return None  # close our side too once the client half-closes

    def pause_writing(self) -> None:
        self.paused_write(True)

    def resume_writing(self) -> None:
        self.paused_write(False)

    def paused_write(self, paused: bool) -> None:
        for callback in self.write_paused_callbacks:
            callback(paused)

    # -- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.req = Request(self)
        self.in_trailers = False
        self.body_reading, self.body_clock = 0.0, None
        self.header_bytes = 0
        self.url_parts = []
        self.head_started = self.loop.time()

    def on_url(self, url: bytes) -> None:
        self.header_bytes += len(url)
        if self.header_bytes > MAX_URL_BYTES:
            raise _UriTooLong(f"request target longer than {MAX_URL_BYTES} bytes")
        self.url_parts.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.req
        self.header_bytes += len(name) + len(value)
        if self.header_bytes > MAX_HEADER_BYTES or len(req.headers) >= MAX_HEADERS:
            raise _HeadersTooLarge("request headers too large")
        if self.in_trailers:
            # Chunked trailer fields are never header fields (RFC 9110 §6.5.1): they are not used for
            # auth or routing and not forwarded; they still count towards the head limits above.
            return
        req.headers.append((name.lower(), value))  # read in one pass when the head is complete (read_fields)

    def on_headers_complete(self) -> None:
        self.head_started = None
        self.in_trailers = True  # any field from here on is a trailer field
        req = self.req
        read_fields(req)
        req.method = self.parser.get_method().decode("ascii")
        req.version = self.parser.get_http_version()
        req.keep_alive = self.parser.should_keep_alive()
        req.target = b"".join(self.url_parts).decode("latin-1")
        if req.target[:1] != "/" and (absolute := absolute_form(req.target, req.host)) is not None:
            req.host, req.target = absolute  # the target's authority routes (RFC 9112 §3.2.2)
        if self.current is None and self.starting is None:
            self.starting = req
        else:
            self.pipeline.append(req)
            self.pause_reading(self.PAUSE_PIPELINE)

    def on_body(self, body: bytes) -> None:
        self.req.body.feed(body)

    def on_message_complete(self) -> None:
        req = self.req
        req.body.feed_eof()
        if self.body_waiter is not None and not self.body_waiter.done():
            self.body_waiter.set_result(None)

    # -- request lifecycle ----------------------------------------------------------------

    def _start(self, req: Request) -> None:
        self.current = req
        self.response_started = False
        self.must_close = not req.keep_alive or self.draining
        try:
            self.handler(req)  # answers now, or later through `spawn` / callbacks, then calls `finish`
        except Exception:  # the worker must survive any handler bug
            self._crashed(req)

    def spawn(self, req: Request, work: Awaitable[None], *, finish: bool = True) -> None:
        """Go on answering `req` in a task (the slow path: connects, admin calls).

        With `finish=False` the work (or a callback it sets up) calls `finish` itself.
        """
        self.task = self.loop.create_task(self._run(req, work, finish))

    async def _run(self, req: Request, work: Awaitable[None], finish: bool) -> None:
        try:
            await work
        except asyncio.CancelledError:
            self.close()
            raise
        except Exception:
            self._crashed(req)
            return
        if finish:
            self.finish(req)

    def _crashed(self, req: Request) -> None:
        log.exception("unhandled error answering %r", req)
        if not self.response_started and not self.closed:
            self.must_close = True
            self.send_error(InternalError("internal error"))
        self.close()
        self.finish(req)

    def finish(self, req: Request) -> None:
        """The response to `req` is complete: go on with the next request or close."""
        if self.current is not req:
            return
        self.current = None
        self.task = None
        self.on_lost = None
        self.write_paused_callbacks.clear()
        if self.closed:
            return
        if not req.body.complete:
            # Unread body bytes would be parsed as the next request: close, but linger so a
            # client still sending its body reads our answer instead of a connection reset.
            self.linger()
            return
        if self.must_close or self.draining:
            self.close()
            return
        if self.pipeline:
            self._start(self.pipeline.popleft())
            if not self.pipeline:
                self.resume_reading(self.PAUSE_PIPELINE)
        else:
            self.resume_reading(self.PAUSE_PIPELINE)

    def on_body_error(self, error: GatewayError) -> None:
        """A body limit tripped mid-stream: stop reading; the handler answers or we close."""
        self.must_close = True
        self.pause_reading(self.PAUSE_BODY)
        if self.current is None or self.current.body.error is not error:
            return
        if self.body_waiter is not None and not self.body_waiter.done():
            self.body_waiter.set_exception(error)

    def _reject(self, error: GatewayError) -> None:
        self.must_close = True
        if self.current is not None or self.response_started:
            self.close()
            return
        self.send_error(error)
        self.close()

    # -- writing ------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)  # type: ignore[union-attr]

    def writelines(self, data: list[bytes]) -> None:
        if not self.closed:
            self.transport.writelines(data)  # type: ignore[union-attr]

    def send_simple(
        self, status: int, body: bytes, headers: tuple[tuple[str, str], ...] | list = (), *,
        content_type: bytes = b"application/json",
    ) -> None:  # fmt: skip
        """A complete, small response in one write."""
        self.response_started = True
        parts = [status_line(status), b"content-type: ", content_type, b"\r\ncontent-length: %d\r\n" % len(body)]
        for k, v in headers:
            parts.append(b"%s: %s\r\n" % (k.encode("latin-1"), v.encode("latin-1")))
        if self.must_close:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        parts.append(body)
        self.writelines(parts)  # closing (or lingering) is up to `finish`

    def send_error(self, error: GatewayError, extra: tuple[tuple[str, str], ...] = ()) -> None:
        req = self.current
        if req is not None and not req.body.complete:
            self.must_close = True  # the rest of the body will not be read
        self.send_simple(error.status, error.body(), error.headers + extra)

    def send_continue(self) -> None:
        self.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def pause_reading(self, reason: int) -> None:
        if not self.paused and not self.closed:
            self.transport.pause_reading()  # type: ignore[union-attr]
        self.paused |= reason

    def resume_reading(self, reason: int) -> None:
        if not self.paused & reason:
            return
        self.paused &= ~reason
        if not self.paused and not self.closed:
            self.transport.resume_reading()  # type: ignore[union-attr]

    def start_tunnel(self, sink: Callable[[bytes], None]) -> None:
        """After a successful upgrade (101): every byte the client sends goes to `sink`, unparsed."""
        self.tunnel = sink
        tail, self.upgrade_tail = self.upgrade_tail, b""
        if tail:
            sink(tail)
        self.resume_reading(self.PAUSE_BODY)

    def linger(self, seconds: float = LINGER_SECONDS) -> None:
        """Half-close: send EOF after the response, discard what the client still sends, then close."""
        if self.closed or self.transport is None:
            return
        self.lingering = True
        self.paused = 0
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.transport.resume_reading()
        self.loop.call_later(seconds, self.close)

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection at once (a truncated stream must look truncated)."""
        if self.transport is not None:
            self.closed = True
            self.transport.abort()


class _LengthBody:
    """The Content-Length body of a request llhttp did not read (an h2c upgrade offer), then the next request."""

    def __init__(self, conn: HttpConnection, length: int) -> None:
        self.conn = conn
        self.left = length

    def feed(self, data: bytes) -> None:
        conn = self.conn
        body, rest = data[: self.left], data[self.left :]
        self.left -= len(body)
        if body:
            conn.on_body(body)
        if self.left == 0:
            conn.tunnel = None
            conn.on_message_complete()
            if rest:
                conn.data_received(rest)


class _ChunkedBody:
    """The chunked body of a request llhttp did not read; what follows it is not read (the connection closes)."""

    def __init__(self, conn: HttpConnection) -> None:
        self.conn = conn
        self.done = False
        self.parser = httptools.HttpRequestParser(self)
        self.parser.feed_data(b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self.conn.on_body(body)

    def on_message_complete(self) -> None:
        self.done = True
        self.conn.on_message_complete()

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if not self.done:
                self.conn.req.body.fail(ClientError("malformed chunked request body"))


_NO_REQUEST = Request.__new__(Request)  # placeholder until the first request line arrives


class _HeadersTooLarge(ClientError):
    status = 431


class _UriTooLong(ClientError):
    status = 414


class RequestTimeout(ClientError):
    status = 408


def sweep(conns: set[HttpConnection], now: float, serving: bool) -> None:
    """Close connections that hold a worker's resources without making progress (issue 5).

    - a request head still incomplete HEAD_TIMEOUT_SECONDS after its first byte: 408 (slowloris);
    - a request body we are reading that stalls for BODY_TIMEOUT_SECONDS, or averages under
      BODY_MIN_RATE after that long: 408 (time when we are not reading, because the plane is slow or
      the client waits for our 100 Continue, does not count);
    - an idle keep-alive connection after KEEPALIVE_TIMEOUT_SECONDS;
    - once the listener stops serving (drain): idle connections at once, busy ones after their response.
    """
    for conn in list(conns):
        if conn.closed or conn.tunnel is not None or conn.lingering:
            continue
        if not serving:
            conn.draining = conn.must_close = True  # the answer in progress says `connection: close`
        busy = conn.current is not None or conn.pipeline
        if conn.head_started is not None and now - conn.head_started > HEAD_TIMEOUT_SECONDS and not busy:
            conn._reject(RequestTimeout(f"request head not received within {HEAD_TIMEOUT_SECONDS:g} s"))
        elif not busy:
            if not serving or now - conn.last_read > KEEPALIVE_TIMEOUT_SECONDS:
                conn.close()
        elif conn.current is not None and (problem := body_too_slow(conn, conn.current, now)) is not None:
            conn.must_close = True
            if conn.response_started:
                conn.abort()
            else:
                conn.send_error(RequestTimeout(problem))
                conn.close()


def body_too_slow(conn: HttpConnection, req: Request, now: float, arriving: int = 0) -> str | None:
    """Why `req`'s body is too slow (`sweep`'s rule, for HTTP/1.1 and each HTTP/2 stream), or None.
    `arriving`: bytes of it received but not parsed yet (an HTTP/2 DATA frame still coming in)."""
    body = req.body
    waiting = not body.complete and not conn.paused and (body.sink is not None or not req.expect_continue)
    if not waiting:  # complete, or we are not reading: the client is not the one holding things up
        conn.body_clock = None
        return None
    if conn.body_clock is not None:
        conn.body_reading += now - conn.body_clock
    conn.body_clock = now
    if now - conn.last_read > BODY_TIMEOUT_SECONDS:
        return f"request body stalled for {BODY_TIMEOUT_SECONDS:g} s"
    if conn.body_reading > BODY_TIMEOUT_SECONDS + (body.received + arriving) / BODY_MIN_RATE:
        return f"request body arrives slower than {BODY_MIN_RATE} bytes/s"
    return None


class _Sweeper:
    """Runs `sweep` over one listener's connections every SWEEP_SECONDS while any remain."""

    def __init__(self, conns: set[HttpConnection]) -> None:
        self.conns = conns
        self.loop = asyncio.get_running_loop()
        self.server: asyncio.base_events.Server | None = None
        self.handle = self.loop.call_later(SWEEP_SECONDS, self.tick)

    def tick(self) -> None:
        serving = self.server is not None and self.server.is_serving()
        sweep(self.conns, self.loop.time(), serving)
        if serving or self.conns:
            self.handle = self.loop.call_later(SWEEP_SECONDS, self.tick)


async def serve(
    handler: Handler, host: str, port: int, *, scheme: str = "http", ssl=None, sock=None,
    reuse_port: bool = False, tracker: set | None = None, h2: Callable[[], asyncio.Protocol] | None = None,
) -> asyncio.base_events.Server:  # fmt: skip
    loop = asyncio.get_running_loop()
    conns: set[HttpConnection] = tracker if tracker is not None else set()
    factory = lambda: HttpConnection(handler, scheme=scheme, tracker=conns, h2=h2)  # noqa: E731
    sweeper = _Sweeper(conns)
    if sock is not None:
        server = await loop.create_server(factory, sock=sock, ssl=ssl, backlog=2048)
    else:
        server = await loop.create_server(factory, host, port, ssl=ssl, backlog=2048, reuse_port=reuse_port)
    sweeper.server = server
    return server
