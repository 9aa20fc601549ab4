"""A small HTTP/2 server for the gRPC listener: the `h2` state machine on asyncio protocols, serving ASGI.

Hypercorn (which is built on the same `h2` library) was measured first and set aside:
- DATA that arrives on a stream after its response has completed (a client still uploading when
  the gateway or the plane answers early, the normal end of a failed client-streaming call)
  raises KeyError in hypercorn 0.18's HTTP/2 protocol and tears down the connection, failing
  every other call multiplexed on it;
- one stream whose app is slow to take its body fills that stream's app queue, and then the whole
  connection stops being read (head-of-line blocking across calls of one gRPC channel);
- in a trivial echo it served 1,491 calls/s, a bare asyncio protocol on `h2` 3,320 (32 calls in flight).

What this server does, and no more: prior-knowledge h2c and TLS (ALPN `h2`); one ASGI `http`
scope per stream, with the `http.response.trailers` extension; per-stream flow control as the
backpressure: received DATA is acknowledged (WINDOW_UPDATE) only when the app takes it with
`receive()`, so a slow plane slows its own client stream and nothing else, and the connection is
always read; `http.disconnect` as soon as the client resets a stream, ahead of body data not yet
taken; after the trailers, a stream whose request is still open is reset with NO_ERROR, as gRPC
servers do (RFC 9113 §8.1), so the client stops sending; GOAWAY when draining.

Server extension in the scope, `scope["extensions"]["gateway.stream"]`:
`closed` (a Future resolved once the stream is over: answered, reset, or its connection lost) and
`body_complete()` (True when the whole request body has already arrived).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import GoAwayFrame

log = logging.getLogger("gateway.grpc")

App = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]

STREAM_WINDOW = 1 << 20  # bytes a client may send on one stream before the app takes them
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
CONFIG = h2.config.H2Configuration(
    client_side=False, header_encoding=None, validate_outbound_headers=False, normalize_outbound_headers=False
)
DISCONNECT = {"type": "http.disconnect"}
NO_ERROR = h2.errors.ErrorCodes.NO_ERROR
H2_STREAM_GONE = (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError)


class Stream:
    """One request/response exchange: the ASGI `receive` and `send` of its app."""

    __slots__ = (
        "conn", "id", "chunks", "ended", "body_done", "reset", "finished", "started", "trailers",
        "waiter", "window_waiter", "closed",
    )  # fmt: skip

    def __init__(self, conn: H2Connection, stream_id: int) -> None:
        self.conn = conn
        self.id = stream_id
        self.chunks: deque[tuple[bytes, int]] = deque()  # (data, flow-controlled length) not yet taken
        self.ended = False  # the client sent END_STREAM
        self.body_done = False  # the app was told more_body=False
        self.reset = False  # the client reset the stream, or the connection is gone
        self.finished = False  # the response is complete (END_STREAM sent)
        self.started = False
        self.trailers = False
        self.waiter: asyncio.Future | None = None
        self.window_waiter: asyncio.Future | None = None
        self.closed: asyncio.Future = conn.loop.create_future()

    def __repr__(self) -> str:
        state = "reset" if self.reset else "finished" if self.finished else "open"
        return f"<Stream {self.id} {state} queued={len(self.chunks)} ended={self.ended}>"

    def body_complete(self) -> bool:
        return self.ended

    # -- events from the connection

    def on_data(self, data: bytes, flow_length: int) -> None:
        self.chunks.append((data, flow_length))
        _wake(self.waiter)

    def on_end(self) -> None:
        self.ended = True
        _wake(self.waiter)

    def on_reset(self) -> None:
        """The client reset the stream or the connection is gone: the app sees http.disconnect."""
        if self.reset:
            return
        self.reset = True
        self._return_window()
        self._close()

    # -- ASGI

    async def receive(self) -> dict:
        while True:
            if self.reset or self.finished:
                return DISCONNECT
            if self.chunks:
                body = self.chunks[0][0] if len(self.chunks) == 1 else b"".join(c[0] for c in self.chunks)
                self._return_window()
                self.body_done = self.ended
                return {"type": "http.request", "body": body, "more_body": not self.ended}
            if self.ended and not self.body_done:
                self.body_done = True
                return {"type": "http.request", "body": b"", "more_body": False}
            self.waiter = self.conn.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None

    async def send(self, message: dict) -> None:
        if self.reset or self.finished:
            return  # the client is gone or the response is complete: nothing more reaches it
        try:
            await self._send(message)
        except h2.exceptions.ProtocolError:  # includes a stream h2 already closed
            self.on_reset()

    async def _send(self, message: dict) -> None:
        kind = message["type"]
        conn = self.conn
        if kind == "http.response.start":
            self.started = True
            self.trailers = bool(message.get("trailers", False))
            conn.h2.send_headers(self.id, [(b":status", b"%d" % message["status"]), *message.get("headers", ())])
            conn.flush_soon()
        elif kind == "http.response.body":
            body = message.get("body", b"")
            if body:
                await self._send_data(body)
            if not message.get("more_body", False) and not self.trailers and not (self.reset or self.finished):
                conn.h2.end_stream(self.id)
                self._finish()
        elif kind == "http.response.trailers":
            conn.h2.send_headers(self.id, list(message.get("headers", ())), end_stream=True)
            self._finish()
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r}")

    async def _send_data(self, data: bytes) -> None:
        view = memoryview(data)
        conn = self.conn
        while view:
            if self.reset:
                return
            try:
                size = min(len(view), conn.h2.local_flow_control_window(self.id), conn.h2.max_outbound_frame_size)
            except H2_STREAM_GONE:
                return
            if size <= 0:
                conn.flush()
                self.window_waiter = conn.loop.create_future()
                try:
                    await self.window_waiter
                finally:
                    self.window_waiter = None
                continue
            conn.h2.send_data(self.id, view[:size])
            view = view[size:]
            if view:
                conn.flush()
                await conn.writable()
            else:
                conn.flush_soon()

    # -- ending

    def abort(self) -> None:
        """The app ended without completing its response: reset the stream (INTERNAL_ERROR)."""
        if self.reset or self.finished:
            return
        self.conn.reset_stream(self.id, h2.errors.ErrorCodes.INTERNAL_ERROR)
        self.on_reset()

    def _finish(self) -> None:
        self.finished = True
        if not self.ended:
            # The answer is complete while the client is still sending: tell it to stop (gRPC servers do).
            self.conn.reset_stream(self.id, NO_ERROR)
        self._return_window()
        self.conn.flush_soon()
        self._close()

    def _return_window(self) -> None:
        """Hand the flow-control credit of data taken (or dropped) back to the client."""
        if self.chunks:
            self.conn.acknowledge(self.id, sum(c[1] for c in self.chunks))
            self.chunks.clear()

    def _close(self) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        _wake(self.waiter)
        _wake(self.window_waiter)
        self.conn.stream_closed(self)


def _wake(fut: asyncio.Future | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)


class H2Connection(asyncio.Protocol):
    def __init__(self, server: H2Server) -> None:
        self.server = server
        self.loop = server.loop
        self.h2 = h2.connection.H2Connection(CONFIG)
        self.streams: dict[int, Stream] = {}
        self.transport: asyncio.Transport | None = None
        self.closing = False
        self.draining = False
        self.write_paused: asyncio.Future | None = None
        self.flush_handle: asyncio.Handle | None = None
        self.idle_handle: asyncio.TimerHandle | None = None
        self.last_read = self.loop.time()
        self.scheme = "http"
        self.client: tuple | None = None
        self.sockname: tuple | None = None

    def __repr__(self) -> str:
        return f"<H2Connection {self.client} streams={len(self.streams)}{' draining' if self.draining else ''}>"

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        self.client = transport.get_extra_info("peername")
        self.sockname = transport.get_extra_info("sockname")
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
        for event in events:
            self._dispatch(event)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.connections.discard(self)
        for stream in list(self.streams.values()):
            stream.on_reset()
        _wake(self.write_paused)
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
        if self.write_paused is None:
            self.write_paused = self.loop.create_future()

    def resume_writing(self) -> None:
        _wake(self.write_paused)
        self.write_paused = None

    async def writable(self) -> None:
        if self.write_paused is not None:
            await self.write_paused

    # -- HTTP/2 events

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)  # type: ignore[arg-type]
            if stream is None:
                self.acknowledge(event.stream_id, event.flow_controlled_length)  # type: ignore[arg-type]
            else:
                stream.on_data(event.data, event.flow_controlled_length)  # type: ignore[arg-type]
        elif isinstance(event, h2.events.RequestReceived):
            self._open(event)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)  # type: ignore[arg-type]
            if stream is not None:
                stream.on_end()
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    _wake(stream.window_waiter)
            else:
                self._wake_senders()
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id)  # type: ignore[arg-type]
            if stream is not None:
                stream.on_reset()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                self._wake_senders()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._terminate(None)  # the client sent GOAWAY: h2 takes no more frames on this connection

    def _open(self, event: h2.events.RequestReceived) -> None:
        stream_id: int = event.stream_id  # type: ignore[assignment]
        if self.draining:
            self.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)  # safe for the client to retry
            return
        method = path = b""
        headers: list[tuple[bytes, bytes]] = [(b"host", b"")]
        for name, value in event.headers or ():
            if name[:1] != b":":
                headers.append((name, value))  # type: ignore[arg-type]
            elif name == b":authority":
                headers[0] = (b"host", value)  # type: ignore[assignment]
            elif name == b":path":
                path = value  # type: ignore[assignment]
            elif name == b":method":
                method = value  # type: ignore[assignment]
        raw_path, _, query = path.partition(b"?")
        stream = Stream(self, stream_id)
        self.streams[stream_id] = stream
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "2",
            "method": method.decode("latin-1"),
            "scheme": self.scheme,
            "path": raw_path.decode("latin-1"),
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": headers,
            "client": self.client,
            "server": self.sockname,
            "extensions": {
                "http.response.trailers": {},
                "gateway.stream": {"closed": stream.closed, "body_complete": stream.body_complete},
            },
        }
        self.server.spawn(stream, scope)

    def _wake_senders(self) -> None:
        for stream in self.streams.values():
            _wake(stream.window_waiter)

    # -- output

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.closing and self.transport is not None:
            self.transport.write(data)

    def flush_soon(self) -> None:
        """Coalesce the frames written in one event-loop turn (headers, message, trailers) into one send."""
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

    def stream_closed(self, stream: Stream) -> None:
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
            stream.on_reset()


class H2Server:
    """The gRPC listener: accepts HTTP/2 connections and runs the app once per stream."""

    def __init__(self, app: App, ssl_context: ssl.SSLContext | None = None) -> None:
        self.app = app
        self.ssl = ssl_context
        self.loop = asyncio.get_running_loop()
        self.connections: set[H2Connection] = set()
        self.tasks: set[asyncio.Task] = set()
        self.server: asyncio.base_events.Server | None = None
        self.draining = False

    def __repr__(self) -> str:
        streams = sum(len(c.streams) for c in self.connections)
        return (
            f"<H2Server port={self.port} connections={len(self.connections)} streams={streams} tasks={len(self.tasks)}>"
        )

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
        """Calls in flight: a stream not yet answered, or an app still running."""
        return bool(self.tasks) or any(c.streams for c in self.connections)

    def spawn(self, stream: Stream, scope: dict) -> None:
        task = self.loop.create_task(self._run(stream, scope))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, stream: Stream, scope: dict) -> None:
        try:
            await self.app(scope, stream.receive, stream.send)
        except Exception:
            log.exception("gRPC call handler failed")
        finally:
            stream.abort()  # a no-op when the response is complete

    def stop_accepting(self) -> None:
        """Close the listening socket and send GOAWAY on every connection (idle ones close at once)."""
        self.draining = True
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.goaway()

    async def close(self, grace: float = 1.0) -> None:
        """Drop every connection (calls still in flight see http.disconnect), then let their apps end."""
        self.stop_accepting()
        for conn in list(self.connections):
            conn.abort()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=grace)
