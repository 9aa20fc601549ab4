"""A small HTTP/2 server for the gRPC listener: the `h2` state machine on an asyncio protocol, driven by callbacks.

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

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import GoAwayFrame

from gateway.grpc.h2conn import H2Connection as H2State

log = logging.getLogger("gateway.grpc")

Headers = list[tuple[bytes, bytes]]

STREAM_WINDOW = 1 << 20  # bytes a client may send on one stream before the relay passes them on
CONNECTION_WINDOW = 16 << 20  # ... and on all streams of a connection
MAX_FRAME = 1 << 20
MAX_STREAMS = 1000
MAX_HEADER_LIST = 64 * 1024  # as the public listener's request head limit
IDLE_SECONDS = 300.0  # a connection with no stream and no bytes for this long is closed (clients reconnect)
SETTINGS = {
    h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
    h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
    h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME,
    h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
}
# Request fields are not validated by h2 (a sixth of the relay's CPU per call): what is forwarded
# to the plane is checked by `framing.read_head` (names, printable values, :path), and the rest is
# never used.
CONFIG = h2.config.H2Configuration(
    client_side=False,
    header_encoding=None,
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
    validate_inbound_headers=False,
    normalize_inbound_headers=False,
)
NO_ERROR = h2.errors.ErrorCodes.NO_ERROR
INTERNAL_ERROR = h2.errors.ErrorCodes.INTERNAL_ERROR
H2_STREAM_GONE = (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError)
DataReceived = h2.events.DataReceived
RequestReceived = h2.events.RequestReceived
StreamEnded = h2.events.StreamEnded
WindowUpdated = h2.events.WindowUpdated
StreamReset = h2.events.StreamReset


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

    __slots__ = ("conn", "id", "handler", "ended", "finished", "reset", "owed", "pending", "trailers", "blocked")

    def __init__(self, conn: H2Connection, stream_id: int) -> None:
        self.conn = conn
        self.id = stream_id
        self.handler: Handler = DISCARD
        self.ended = False  # the client sent END_STREAM
        self.finished = False  # the response is complete (END_STREAM sent)
        self.reset = False  # the client reset the stream, or the connection is gone
        self.owed = 0  # flow-controlled bytes received and not yet acknowledged
        self.pending: deque[bytes | memoryview] = deque()  # response data waiting for window
        self.trailers: Headers | None = None  # trailers to send once `pending` is written
        self.blocked = False  # send_data returned False: the handler waits for client_drained

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
    def done(self) -> bool:
        return self.reset or self.finished

    # -- the handler's side

    def respond(self, headers: Headers, end: bool = False) -> None:
        """Response HEADERS (`end`: a trailers-only response)."""
        if self.reset or self.finished:
            return
        try:
            self.conn.h2.send_headers(self.id, headers, end_stream=end)
        except h2.exceptions.ProtocolError:
            self._on_reset()
            return
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
        self.conn.acknowledge(self.id, length)

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
        h2c = conn.h2
        pending = self.pending
        try:
            while pending:
                chunk = pending[0]
                size = min(len(chunk), h2c.local_flow_control_window(self.id), h2c.max_outbound_frame_size)
                if size <= 0:
                    return False
                if size == len(chunk):
                    pending.popleft()
                    h2c.send_data(self.id, chunk)
                else:
                    view = memoryview(chunk)
                    pending[0] = view[size:]
                    h2c.send_data(self.id, view[:size])
            if self.trailers is not None:
                h2c.send_headers(self.id, self.trailers, end_stream=True)
                self.trailers = None
                conn.flush_soon()
                self._finish()
                return True
        except h2.exceptions.ProtocolError:  # includes a stream h2 already closed
            self._on_reset()
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
        if not self.ended:
            # The answer is complete while the client is still sending: tell it to stop (gRPC servers do).
            self.conn.reset_stream(self.id, NO_ERROR)
        self._close()

    def _close(self) -> None:
        conn = self.conn
        if self.owed:
            conn.acknowledge(self.id, self.owed)  # the stream is over: its data no longer holds the connection window
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


class H2Connection(asyncio.Protocol):
    def __init__(self, server: H2Server) -> None:
        self.server = server
        self.loop = server.loop
        self.h2 = H2State(CONFIG)
        self.streams: dict[int, ServerStream] = {}
        self.blocked: set[ServerStream] = set()  # streams with response data waiting for window or the socket
        self.transport: asyncio.Transport | None = None
        self.closing = False
        self.draining = False
        self.write_paused = False
        self.flush_handle: asyncio.Handle | None = None
        self.idle_handle: asyncio.TimerHandle | None = None
        self.last_read = self.loop.time()
        self.scheme = "http"
        self.client: tuple | None = None

    def __repr__(self) -> str:
        return f"<H2Connection {self.client} streams={len(self.streams)}{' draining' if self.draining else ''}>"

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        self.client = transport.get_extra_info("peername")
        if transport.get_extra_info("ssl_object") is not None:
            self.scheme = "https"
        conn = self.h2
        # The settings are in force from the first byte, not from the client's ACK: a client may use
        # the larger frame size and windows as soon as it has read them (RFC 9113 §6.5.3), and grpc
        # core does, in the same write as its ACK.
        conn.local_settings = h2.settings.Settings(client=False, initial_values=SETTINGS)
        conn.max_inbound_frame_size = conn.incoming_buffer.max_frame_size = MAX_FRAME
        conn.decoder.max_header_list_size = MAX_HEADER_LIST
        conn.initiate_connection()
        conn.increment_flow_control_window(CONNECTION_WINDOW - conn.inbound_flow_control_window)
        self.flush()
        self.idle_handle = self.loop.call_later(IDLE_SECONDS, self._idle_check)
        if self.server.draining:
            self.goaway()

    def data_received(self, data: bytes) -> None:
        self.last_read = self.loop.time()
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.info("gRPC client %s broke HTTP/2: %r", self.client, exc)
            self._terminate(getattr(exc, "error_code", h2.errors.ErrorCodes.PROTOCOL_ERROR))
            return
        streams = self.streams
        for event in events:
            kind = type(event)
            try:
                if kind is DataReceived:
                    stream = streams.get(event.stream_id)  # type: ignore[attr-defined]
                    if stream is None:
                        self.acknowledge(event.stream_id, event.flow_controlled_length)  # type: ignore[attr-defined]
                    else:
                        stream._on_data(event.data, event.flow_controlled_length)  # type: ignore[attr-defined]
                elif kind is RequestReceived:
                    self._open(event)  # type: ignore[arg-type]
                elif kind is StreamEnded:
                    stream = streams.get(event.stream_id)  # type: ignore[attr-defined]
                    if stream is not None:
                        stream._on_end()
                else:
                    self._dispatch(event)
            except Exception:
                log.exception("gRPC stream handler failed")
                stream = streams.get(getattr(event, "stream_id", 0) or 0)
                if stream is not None:
                    stream.abort()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.connections.discard(self)
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

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._window_opened()

    # -- HTTP/2 events

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.WindowUpdated):
            if event.stream_id:
                stream = self.streams.get(event.stream_id)
                if stream is not None and stream in self.blocked:
                    stream._window_opened()
            else:
                self._window_opened()
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id)  # type: ignore[arg-type]
            if stream is not None:
                stream._on_reset()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                self._window_opened()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._terminate(None)  # the client sent GOAWAY: h2 takes no more frames on this connection

    def _window_opened(self) -> None:
        for stream in list(self.blocked):
            stream._window_opened()

    def _open(self, event: h2.events.RequestReceived) -> None:
        stream_id: int = event.stream_id  # type: ignore[assignment]
        if self.draining or len(self.streams) >= MAX_STREAMS:
            self.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)  # safe for the client to retry
            return
        stream = ServerStream(self, stream_id)
        self.streams[stream_id] = stream
        handler = self.server.app.open(stream, event.headers)  # type: ignore[arg-type]
        if not (stream.reset or stream.finished):
            stream.handler = handler

    # -- output

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.closing and self.transport is not None:
            self.transport.write(data)

    def flush_soon(self) -> None:
        """Coalesce the frames written in one event-loop turn (many streams' headers, messages, trailers)."""
        if self.flush_handle is None:
            self.flush_handle = self.loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self.flush_handle = None
        self.flush()

    def acknowledge(self, stream_id: int, length: int) -> None:
        if length and not self.closing:
            self.h2.acknowledge_received_data(length, stream_id)  # closed streams: connection window only
            self.flush_soon()

    def reset_stream(self, stream_id: int, code: int) -> None:
        try:
            self.h2.reset_stream(stream_id, code)
        except H2_STREAM_GONE:
            pass  # already closed by the client
        self.flush_soon()

    def stream_closed(self, stream: ServerStream) -> None:
        self.streams.pop(stream.id, None)
        if self.draining and not self.streams:
            self.close()

    # -- ending

    def goaway(self) -> None:
        """Drain: refuse new streams, let the open ones finish, then close.

        The GOAWAY frame is written directly: h2 takes no frames at all after its own
        close_connection(), and the streams in flight still need theirs.
        """
        if self.draining or self.closing:
            return
        self.draining = True
        if not self.streams:
            self.close()
            return
        self.flush()
        frame = GoAwayFrame(0, last_stream_id=self.h2.highest_inbound_stream_id, error_code=NO_ERROR)
        if self.transport is not None:
            self.transport.write(frame.serialize())

    def close(self) -> None:
        if self.closing or self.transport is None:
            return
        try:
            self.h2.close_connection()
        except h2.exceptions.ProtocolError:
            pass  # the connection already received or sent its GOAWAY
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
        if error_code is not None:
            try:
                self.h2.close_connection(error_code)
            except h2.exceptions.ProtocolError:
                pass
        self.flush()
        self.closing = True
        if self.transport is not None:
            self.transport.close()
        for stream in list(self.streams.values()):
            stream._on_reset()


class H2Server:
    """The gRPC listener: accepts HTTP/2 connections and hands each stream to the app."""

    def __init__(self, app: App, ssl_context: ssl.SSLContext | None = None) -> None:
        self.app = app
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
