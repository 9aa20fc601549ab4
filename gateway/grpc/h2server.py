"""A small HTTP/2 server for the gRPC listener: the frame layer of wire.py on an asyncio protocol, driven by callbacks.

Hypercorn (which is built on the same `h2` library) was measured first and set aside:
- DATA that arrives on a stream after its response has completed (a client still uploading when
  the gateway or the plane answers early, the normal end of a failed client-streaming call)
  raises KeyError in hypercorn 0.18's HTTP/2 protocol and tears down the connection, failing
  every other call multiplexed on it;
- one stream whose app is slow to take its body fills that stream's app queue, and then the whole
  connection stops being read (head-of-line blocking across calls of one gRPC channel);
- in a trivial echo it served 1,491 calls/s, a bare asyncio protocol on `h2` 3,320 (32 calls in flight).

An ASGI app per stream (a task, a scope, receive/send coroutines) was this server's first shape;
the relay now forwards frames as they come, like nginx's grpc_pass, so the server hands each
stream's events straight to a handler object and takes its frames back through `ServerStream`:
no task and no future per call.

What this server does, and no more: prior-knowledge h2c and TLS (ALPN `h2`); per-stream flow
control as the backpressure: received DATA is acknowledged (WINDOW_UPDATE) only when the handler
says it has passed it on (`ServerStream.ack`), so a slow plane slows its own client stream and
nothing else, and the connection is always read; `client_reset` as soon as the client resets a
stream or the connection is lost; after the response's END_STREAM, a stream whose request is
still open is reset with NO_ERROR, as gRPC servers do (RFC 9113 §8.1), so the client stops
sending; GOAWAY when draining.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from typing import Protocol

from gateway.grpc import limits, wire
from gateway.grpc.malformed import request_problem, trailers_problem
from gateway.grpc.wire import H2Error
from gateway.tls import sni_of

log = logging.getLogger("gateway.grpc")

Headers = list[tuple[bytes, bytes]]

STREAM_WINDOW = 1 << 20  # bytes a client may send on one stream before the relay passes them on
CONNECTION_WINDOW = 16 << 20  # ... and on all streams of a connection
MAX_FRAME = 1 << 20
MAX_STREAMS = 1000
MAX_HEADER_LIST = 64 * 1024  # as the public listener's request head limit
IDLE_SECONDS = 300.0  # a connection with no stream and no bytes for this long is closed (clients reconnect)
SETTINGS = {
    wire.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
    wire.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
    wire.MAX_FRAME_SIZE: MAX_FRAME,
    wire.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
}
# Request fields are checked here for what HTTP/2 itself says of them (`malformed`: a malformed
# request is reset with PROTOCOL_ERROR and never reaches the app); what is forwarded to the plane
# is checked by `framing.read_head` (metadata keys, printable values, :path).
NO_ERROR = wire.NO_ERROR
INTERNAL_ERROR = wire.INTERNAL_ERROR


class Handler(Protocol):
    """What the app returns for a stream; the server calls it with the client's side of the exchange."""

    def client_data(self, data: bytes, flow: int) -> None: ...  # `flow` bytes to `ack` once passed on

    def client_end(self) -> None: ...  # the request is complete (END_STREAM)

    def client_reset(self) -> None: ...  # the client reset the stream or its connection is gone

    def client_drained(self) -> None: ...  # all data queued by `send_data` is written


class App(Protocol):
    def open(self, stream: ServerStream, headers: Headers) -> Handler: ...


class ServerStream:
    """One request/response exchange; the handler answers through it."""

    __slots__ = (
        "conn", "id", "handler", "ended", "finished", "reset", "owed", "pending", "trailers", "blocked",
        "send_window", "recv_window", "credit", "quiet",
    )  # fmt: skip

    def __init__(self, conn: H2Connection, stream_id: int) -> None:
        self.conn = conn
        self.id = stream_id
        self.send_window = conn.peer_initial_window  # the client's window for our response data
        self.recv_window = STREAM_WINDOW  # ours for its request data
        self.credit = 0  # acknowledged bytes not yet returned with WINDOW_UPDATE
        self.handler: Handler = DISCARD
        self.ended = False  # the client sent END_STREAM
        self.finished = False  # the response is complete (END_STREAM sent)
        self.reset = False  # the client reset the stream, or the connection is gone
        self.owed = 0  # flow-controlled bytes received and not yet acknowledged
        self.pending: deque[bytes | memoryview] = deque()  # response data waiting for window
        self.trailers: Headers | None = None  # trailers to send once `pending` is written
        self.blocked = False  # send_data returned False: the handler waits for client_drained
        self.quiet = False  # an early answer needs no RST_STREAM: the rest of the request fits the window

    def __repr__(self) -> str:
        state = "reset" if self.reset else "finished" if self.finished else "open"
        return f"<ServerStream {self.id} {state} pending={len(self.pending)} ended={self.ended}>"

    @property
    def client(self) -> tuple | None:
        return self.conn.client

    @property
    def scheme(self) -> str:
        return self.conn.scheme

    @property
    def sni(self) -> str | None:
        """The TLS server name the client's connection asked for (None on h2c)."""
        return self.conn.sni

    @property
    def done(self) -> bool:
        return self.reset or self.finished

    # -- the handler's side

    def respond(self, headers: Headers, end: bool = False) -> None:
        """Response HEADERS (`end`: a trailers-only response)."""
        if self.reset or self.finished:
            return
        self.conn.send_headers(self.id, headers, end)
        self.conn.flush_soon()
        if end:
            self._finish()

    def send_data(self, data: bytes | memoryview) -> bool:
        """Queue response data; True when it is all written (else `client_drained` follows once it is)."""
        if self.reset or self.finished or not data:
            return True  # nobody to send it to, or nothing to send: the handler need not wait
        self.pending.append(data)
        if self._drain() and not self.conn.write_paused:
            return True
        self.blocked = True
        self.conn.blocked.add(self)
        return False

    def send_trailers(self, headers: Headers) -> None:
        """End the response with trailers, after the data still queued."""
        if self.reset or self.finished:
            return
        self.trailers = headers
        self._drain()

    def ack(self, length: int) -> None:
        """Return `length` bytes of flow-control credit to the client (data passed on)."""
        if self.reset or self.finished:
            return  # its credit was returned when it closed
        self.owed -= length
        self.conn.acknowledge(self, length)

    def abort(self, code: int = INTERNAL_ERROR) -> None:
        """End the exchange with RST_STREAM (the handler will not complete the response)."""
        if self.reset or self.finished:
            return
        self.conn.reset_stream(self.id, code)
        self.reset = True
        self._close()

    # -- the connection's side

    def _drain(self) -> bool:
        """Write what the windows allow, then the trailers; True when nothing is left queued."""
        conn = self.conn
        pending = self.pending
        while pending:
            chunk = pending[0]
            size = min(len(chunk), conn.window_for(self))
            if size <= 0:
                conn.flush_soon()  # what did fit is written now
                return False
            if size == len(chunk):
                pending.popleft()
                conn.send_data(self, chunk, False)
            else:
                view = memoryview(chunk)
                pending[0] = view[size:]
                conn.send_data(self, view[:size], False)
        if self.trailers is not None:
            if self.trailers:
                conn.send_headers(self.id, self.trailers, True)
            else:
                conn.send_end(self.id)  # no trailers: END_STREAM on an empty DATA frame
            self.trailers = None
            conn.flush_soon()
            self._finish()
            return True
        conn.flush_soon()
        return True

    def _window_opened(self) -> None:
        if (self.pending or self.trailers is not None) and not self._drain():
            return
        if self.conn.write_paused or self.reset or self.finished:
            return
        self.conn.blocked.discard(self)
        if self.blocked:
            self.blocked = False
            self.handler.client_drained()

    def _on_data(self, data: bytes, flow: int) -> None:
        self.owed += flow
        self.handler.client_data(data, flow)

    def _on_end(self) -> None:
        self.ended = True
        self.handler.client_end()

    def _on_reset(self) -> None:
        if self.reset or self.finished:
            return
        self.reset = True
        self._close()
        self.handler.client_reset()

    def _finish(self) -> None:
        self.finished = True
        if not (self.ended or self.quiet):
            # The answer is complete while the client is still sending: tell it to stop (gRPC servers do).
            self.conn.reset_stream(self.id, NO_ERROR)
        self._close()

    def _close(self) -> None:
        conn = self.conn
        if self.owed:
            conn.acknowledge(None, self.owed)  # the stream is over: its data no longer holds the connection window
            self.owed = 0
        self.pending.clear()
        self.trailers = None
        conn.blocked.discard(self)
        conn.stream_closed(self)


class Discard:
    """The handler of a stream already answered: what still arrives is dropped."""

    def client_data(self, data: bytes, flow: int) -> None:
        pass

    def client_end(self) -> None:
        pass

    def client_reset(self) -> None:
        pass

    def client_drained(self) -> None:
        pass


DISCARD = Discard()


class H2Connection(wire.FrameConnection):
    stream_window = STREAM_WINDOW
    connection_window = CONNECTION_WINDOW
    max_frame = MAX_FRAME
    limit_reads = True  # a client that does not read its answers is not read either (limits.OUTPUT_HIGH_WATER)

    def __init__(self, server: H2Server) -> None:
        super().__init__(MAX_HEADER_LIST)
        self.server = server
        self.loop = server.loop
        self.streams: dict[int, ServerStream] = {}
        self.blocked: set[ServerStream] = set()  # streams with response data waiting for window or the socket
        self.highest = 0  # the highest stream id the client has opened
        self.draining = False
        self.flush_handle: asyncio.Handle | None = None
        self.idle_handle: asyncio.TimerHandle | None = None
        self.last_read = self.loop.time()
        self.scheme = "http"
        self.sni: str | None = None
        self.client: tuple | None = None
        # X-Forwarded-* and Forwarded by call authority: the client's address and scheme are this
        # connection's (relay.forwarding).
        self.forwarding: dict[str, tuple[tuple[bytes, bytes], ...]] = {}
        self.resets = limits.ResetBudget(self.last_read)
        # Streams whose HEADERS came in the read being handled: the app opens them once the read is
        # done, so that a RST_STREAM in the same read keeps the call from ever reaching a plane
        # (CVE-2023-44487, rapid reset). (stream, fields, END_STREAM)
        self.opening: list[tuple[ServerStream, Headers, bool]] = []

    def __repr__(self) -> str:
        return f"<H2Connection {self.client} streams={len(self.streams)}{' draining' if self.draining else ''}>"

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        self.client = transport.get_extra_info("peername")
        if transport.get_extra_info("ssl_object") is not None:
            self.scheme = "https"
            self.sni = sni_of(transport)
        transport.set_write_buffer_limits(limits.OUTPUT_HIGH_WATER, limits.OUTPUT_LOW_WATER)  # type: ignore[attr-defined]
        # The settings are in force from the first byte, not from the client's ACK: a client may use
        # the larger frame size and windows as soon as it has read them (RFC 9113 §6.5.3), and grpc
        # core does, in the same write as its ACK.
        self.start(self.server.settings)
        self.flush()
        self.idle_handle = self.loop.call_later(IDLE_SECONDS, self._idle_check)
        if self.server.draining:
            self.goaway()

    def data_received(self, data: bytes) -> None:
        self.last_read = self.loop.time()
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.connections.discard(self)
        self.opening = []
        self.decoder.release()
        for stream in list(self.streams.values()):
            stream._on_reset()
        for handle in (self.flush_handle, self.idle_handle):
            if handle is not None:
                handle.cancel()

    def _idle_check(self) -> None:
        """Close a connection that holds no stream and has sent nothing for IDLE_SECONDS (and one that
        never completed its preface): idle or abandoned sockets are not kept forever."""
        idle_for = self.loop.time() - self.last_read
        if self.streams or idle_for < IDLE_SECONDS:
            self.idle_handle = self.loop.call_later(max(1.0, IDLE_SECONDS - idle_for), self._idle_check)
        else:
            self.idle_handle = None
            self.close()

    # -- HTTP/2 frames (wire.FrameConnection)

    def on_headers(self, stream_id: int, fields: Headers, end: bool) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers from the client: they end its request (gRPC sends none)
            if not end:
                raise H2Error(wire.PROTOCOL_ERROR, "request trailers without END_STREAM")
            if self.opening:
                self._open_pending()
            problem = trailers_problem(fields)
            if problem is not None:
                self._malformed(stream_id, problem)
                stream._on_reset()
            elif not stream.ended:
                stream._on_end()
            return
        if stream_id <= self.highest:
            return  # a stream already closed (reset or answered): its fields were decoded, nothing more
        if not stream_id & 1:
            raise H2Error(wire.PROTOCOL_ERROR, "a client opened an even-numbered stream")
        self.highest = stream_id
        problem = request_problem(fields, self.server.extended_connect)
        if problem is not None:
            self._malformed(stream_id, problem)
        elif self.draining or len(self.streams) >= MAX_STREAMS:
            self.reset_stream(stream_id, wire.REFUSED_STREAM)  # safe for the client to retry
        else:
            stream = self.streams[stream_id] = ServerStream(self, stream_id)
            self.opening.append((stream, fields, end))

    def on_input_end(self) -> None:
        if self.opening:
            self._open_pending()

    def backlog(self) -> int:
        return len(self.out) + len(self.opening)  # each stream to open queues at least its answer

    def on_data(self, stream_id: int, data: bytes, flow: int, end: bool) -> None:
        if self.opening:
            self._open_pending()  # the data goes to the stream's handler: it must have one
        stream = self.streams.get(stream_id)
        if stream is None:  # answered as it was opened
            self.acknowledge(None, flow)
            return
        if stream.ended:  # half-closed (remote): a stream error (RFC 9113 §5.1)
            self.acknowledge(None, flow)
            self.reset_stream(stream_id, wire.STREAM_CLOSED)
            stream._on_reset()
            return
        stream.owed += flow
        stream.handler.client_data(data, flow)
        if end and not (stream.reset or stream.finished):
            stream._on_end()
        elif end:
            stream.ended = True

    def on_reset(self, stream_id: int, code: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            # Only resets of open streams cost the gateway anything (a call started or about to be).
            if not self.resets.spend(self.loop.time()):
                raise H2Error(wire.ENHANCE_YOUR_CALM, f"more than {limits.RESET_BURST} stream resets (rapid reset)")
            stream._on_reset()

    def on_settings(self, window_changed: bool) -> None:
        if window_changed:
            self._window_opened()

    def on_goaway(self, last_stream_id: int, code: int) -> None:
        self._terminate(None)  # the client is going away: its calls end with it

    def is_idle(self, stream_id: int) -> bool:
        return stream_id > self.highest

    def handler_failed(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.abort()

    def protocol_error(self, error: H2Error) -> None:
        log.info("gRPC client %s broke HTTP/2: %s", self.client, error)
        self._terminate(error.code)

    def _malformed(self, stream_id: int, problem: str) -> None:
        log.debug("gRPC client %s sent a malformed request on stream %d: %s", self.client, stream_id, problem)
        self.reset_stream(stream_id, wire.PROTOCOL_ERROR)  # a stream error (RFC 9113 §8.1.1)

    def _open_pending(self) -> None:
        """Hand the streams opened in this read to the app, but those the client reset meanwhile."""
        opening, self.opening = self.opening, []
        app = self.server.app
        for stream, headers, end in opening:
            if stream.reset or self.closing:
                continue
            stream.ended = end  # a complete request: no RST_STREAM(NO_ERROR) after an early answer
            try:
                handler = app.open(stream, headers)
                if not (stream.reset or stream.finished):
                    stream.handler = handler
                    if end:
                        handler.client_end()
            except Exception:
                log.exception("gRPC stream handler failed")
                stream.abort()

    # -- output

    def stream_closed(self, stream: ServerStream) -> None:
        self.streams.pop(stream.id, None)
        if self.draining and not self.streams:
            self.close()

    # -- ending

    def goaway(self) -> None:
        """Drain: refuse new streams, let the open ones finish, then close."""
        if self.draining or self.closing:
            return
        self.draining = True
        if not self.streams:
            self.close()
            return
        self.send_goaway(self.highest, NO_ERROR)
        self.flush()

    def close(self) -> None:
        if self.closing or self.transport is None:
            return
        self.send_goaway(self.highest, NO_ERROR)
        self.flush()
        self.closing = True
        self.transport.close()

    def abort(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.abort()
        for stream in list(self.streams.values()):
            stream._on_reset()

    def _terminate(self, error_code: int | None) -> None:
        if error_code is not None and not self.closing:
            self.send_goaway(self.highest, error_code)
        self.flush()
        self.closing = True
        self.opening = []
        if self.transport is not None:
            self.transport.close()
        for stream in list(self.streams.values()):
            stream._on_reset()


class H2Server:
    """The gRPC listener: accepts HTTP/2 connections and hands each stream to the app."""

    def __init__(self, app: App, ssl_context: ssl.SSLContext | None = None, *, extended_connect: bool = False) -> None:
        self.app = app
        # RFC 8441 extended CONNECT (the public listener's WebSocket over HTTP/2): advertised and accepted.
        self.extended_connect = extended_connect
        self.settings = {**SETTINGS, wire.ENABLE_CONNECT_PROTOCOL: 1} if extended_connect else SETTINGS
        self.ssl = ssl_context
        self.loop = asyncio.get_running_loop()
        self.connections: set[H2Connection] = set()
        self.server: asyncio.base_events.Server | None = None
        self.draining = False

    def __repr__(self) -> str:
        streams = sum(len(c.streams) for c in self.connections)
        return f"<H2Server port={self.port} connections={len(self.connections)} streams={streams}>"

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        self.server = await self.loop.create_server(
            lambda: H2Connection(self),
            host,
            port,
            ssl=self.ssl,
            backlog=1024,
            reuse_port=reuse_port,
            ssl_handshake_timeout=10 if self.ssl else None,
        )

    @property
    def port(self) -> int | None:
        return self.server.sockets[0].getsockname()[1] if self.server is not None and self.server.sockets else None

    @property
    def busy(self) -> bool:
        """Calls in flight: a stream not yet answered."""
        return any(c.streams for c in self.connections)

    def stop_accepting(self) -> None:
        """Close the listening socket and send GOAWAY on every connection (idle ones close at once)."""
        self.draining = True
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.goaway()

    async def close(self) -> None:
        """Drop every connection: the calls still in flight see `client_reset` and cancel their plane calls."""
        self.stop_accepting()
        for conn in list(self.connections):
            conn.abort()
        await asyncio.sleep(0)  # let the transports report connection_lost
