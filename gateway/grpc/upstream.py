"""The HTTP/2 client towards the planes' gRPC addresses: pooled h2c connections, streams driven by callbacks.

Frames are forwarded, not messages: a call opens a stream on a connection to its plane, and
its request DATA, the response HEADERS, DATA and trailers pass through unchanged (grpc_pass
does the same in nginx). Per plane address, streams are multiplexed on one connection up to the
plane's SETTINGS_MAX_CONCURRENT_STREAMS; another connection is opened when it is full. A stream
is opened only once the plane's SETTINGS have arrived, so that limit is known.

Flow control both ways is the backpressure: response data is acknowledged to the plane (and
request data to the client) only once the other side has taken it; `send_data` returns False
while data waits for window or for the socket, and `plane_drained` follows.

A GOAWAY from the plane stops new streams on that connection; the streams it has seen go on and
the later ones fail with UNAVAILABLE (RFC 9113 §6.8). A lost connection fails its streams with
UNAVAILABLE. A table swap retires the addresses that left the table; their connections close once
their last call has finished, so a reload never cuts a stream in flight (SPEC §3).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Protocol

from gateway.errors import ConnectFailed, GatewayError, UpstreamBroken
from gateway.grpc import wire
from gateway.grpc.wire import H2Error
from gateway.routing.model import Region, Table
from gateway.upstream.connect import Connector

log = logging.getLogger("gateway.grpc")

Headers = list[tuple[bytes, bytes]]

STREAM_WINDOW = 1 << 20  # response bytes a plane may send on one stream before the client takes them
CONNECTION_WINDOW = 16 << 20
MAX_FRAME = 1 << 20
MAX_HEADER_LIST = 64 * 1024
LAST_STREAM_ID = (1 << 31) - 1
SETTINGS = {
    wire.ENABLE_PUSH: 0,
    wire.MAX_CONCURRENT_STREAMS: 0,  # for pushed streams: none
    wire.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
    wire.MAX_FRAME_SIZE: MAX_FRAME,
    wire.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
}
# The plane's response fields are not validated: they are forwarded to the client as they are
# (as nginx's grpc_pass does), and what the client needs checked its own HTTP/2 stack checks.
CANCEL = wire.CANCEL


class Handler(Protocol):
    """The call a plane stream reports to."""

    def plane_headers(self, headers: Headers, end: bool) -> None: ...  # response HEADERS (end: trailers-only)

    def plane_data(self, data: bytes, flow: int) -> None: ...  # `flow` bytes to `ack` once passed on

    def plane_trailers(self, headers: Headers | None) -> None: ...  # None: END_STREAM without trailers

    def plane_reset(self, code: int) -> None: ...  # the plane reset the stream

    def plane_failed(self, error: GatewayError) -> None: ...  # no connection, or it was lost

    def plane_drained(self) -> None: ...  # all data queued by `send_data` is written


class PlaneStream:
    """One call's stream to the plane."""

    __slots__ = (
        "conn", "id", "handler", "owed", "pending", "end_pending", "blocked", "sent_end", "got_end", "closed",
        "responded", "send_window", "recv_window", "credit",
    )  # fmt: skip

    def __init__(self, conn: PlaneConnection, stream_id: int, handler: Handler) -> None:
        self.conn = conn
        self.id = stream_id
        self.responded = False  # the response HEADERS arrived: the next HEADERS are trailers
        self.send_window = conn.peer_initial_window
        self.recv_window = STREAM_WINDOW
        self.credit = 0
        self.handler = handler
        self.owed = 0  # flow-controlled response bytes received and not yet acknowledged
        self.pending: deque[bytes | memoryview] = deque()  # request data waiting for window
        self.end_pending = False  # END_STREAM to send once `pending` is written
        self.blocked = False
        self.sent_end = False
        self.got_end = False
        self.closed = False

    def __repr__(self) -> str:
        return f"<PlaneStream {self.id} pending={len(self.pending)}{' closed' if self.closed else ''}>"

    # -- the call's side

    def send_data(self, data: bytes | memoryview) -> bool:
        """Queue request data; True when it is all written (else `plane_drained` follows once it is)."""
        if self.closed or self.sent_end or not data:
            return True
        self.pending.append(data)
        if self._drain() and not self.conn.write_paused:
            return True
        self.blocked = True
        self.conn.blocked.add(self)
        return False

    def end(self) -> None:
        """Half-close the request (END_STREAM), after the data still queued."""
        if self.closed or self.sent_end:
            return
        self.end_pending = True
        self._drain()

    def ack(self, length: int) -> None:
        if self.closed:
            return  # its credit was returned when it closed
        self.owed -= length
        self.conn.acknowledge(self, length)

    def cancel(self) -> None:
        """RST_STREAM(CANCEL): the plane sees the call cancelled. A no-op once the stream is over."""
        if self.closed or (self.got_end and self.sent_end):
            return
        self.conn.reset_stream(self.id, CANCEL)
        self._close()

    # -- the connection's side

    def _drain(self) -> bool:
        conn = self.conn
        pending = self.pending
        if self.closed:
            pending.clear()
            return True
        while pending:
            chunk = pending[0]
            size = min(len(chunk), conn.window_for(self))
            if size <= 0:
                conn.flush_soon()  # what did fit is written now
                return False
            if size == len(chunk):
                pending.popleft()
                last = self.end_pending and not pending
                conn.send_data(self, chunk, last)
                self.sent_end = last
            else:
                view = memoryview(chunk)
                pending[0] = view[size:]
                conn.send_data(self, view[:size], False)
        if self.end_pending:
            self.end_pending = False
            if not self.sent_end:
                self.sent_end = True
                conn.send_end(self.id)
            if self.got_end:
                self._close()
        conn.flush_soon()
        return True

    def _window_opened(self) -> None:
        if (self.pending or self.end_pending) and not self._drain():
            return
        if self.conn.write_paused or self.closed:
            return
        self.conn.blocked.discard(self)
        if self.blocked:
            self.blocked = False
            self.handler.plane_drained()

    def _ended(self) -> None:
        """The response is complete (`got_end`): the call is over, whatever of the request is still unsent."""
        if self.closed:
            return
        if self.sent_end:
            self._close()
        else:
            self.cancel()  # the plane answered before the request ended: stop sending (RFC 9113 §8.1)

    def _on_reset(self, code: int) -> None:
        if self.closed:
            return
        self._close()
        self.handler.plane_reset(code)

    def _on_failed(self, error: GatewayError) -> None:
        if self.closed:
            return
        self._close()
        self.handler.plane_failed(error)

    def _close(self) -> None:
        self.closed = True
        conn = self.conn
        if self.owed:
            conn.acknowledge(None, self.owed)  # returns the connection window the stream still held
            self.owed = 0
        self.pending.clear()
        conn.blocked.discard(self)
        conn.stream_closed(self)


class PlaneConnection(wire.FrameConnection):
    """One h2c connection to a plane address."""

    client_side = True
    stream_window = STREAM_WINDOW
    connection_window = CONNECTION_WINDOW
    max_frame = MAX_FRAME

    def __init__(self, group: PlaneAddress) -> None:
        super().__init__(MAX_HEADER_LIST)
        self.group = group
        self.loop = group.loop
        self.streams: dict[int, PlaneStream] = {}
        self.blocked: set[PlaneStream] = set()
        self.waiters: list = []  # calls waiting for this connection to be ready
        self.next_id = 1
        self.ready = False
        self.settled: asyncio.Future = self.loop.create_future()  # the plane's first SETTINGS, or the failure
        self.max_streams = 100
        self.last_stream_id = LAST_STREAM_ID  # lowered by a GOAWAY
        self.goaway = False
        self.flush_handle: asyncio.Handle | None = None
        self.address = ""  # the resolved address it went to, once connected

    def __repr__(self) -> str:
        state = "closing" if self.closing else "goaway" if self.goaway else "ready" if self.ready else "connecting"
        return f"<PlaneConnection {self.group.address} {state} streams={len(self.streams)}/{self.max_streams}>"

    @property
    def has_room(self) -> bool:
        return self.ready and not self.goaway and len(self.streams) < self.max_streams

    def open_stream(self, headers: Headers, handler: Handler, end: bool) -> PlaneStream:
        if self.closing or self.goaway:
            raise UpstreamBroken("the plane connection takes no new streams")
        stream_id = self.next_id
        self.next_id += 2
        self.send_headers(stream_id, headers, end)
        stream = self.streams[stream_id] = PlaneStream(self, stream_id, handler)
        stream.sent_end = end
        if stream_id >= LAST_STREAM_ID - 2:
            self.goaway = True  # stream ids are used up: this connection takes no more calls
            self.group.discard(self)
        self.flush_soon()
        return stream

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.start(SETTINGS)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(UpstreamBroken("the plane closed the connection"))

    # -- HTTP/2 frames (wire.FrameConnection)

    def on_headers(self, stream_id: int, fields: Headers, end: bool) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            if self.is_idle(stream_id):
                raise H2Error(wire.PROTOCOL_ERROR, "HEADERS on a stream the gateway did not open")
            return  # a stream already closed (cancelled): its fields were decoded, nothing more
        if stream.responded:
            if not end:
                raise H2Error(wire.PROTOCOL_ERROR, "trailers without END_STREAM")
            stream.got_end = True
            stream.handler.plane_trailers(fields)
            stream._ended()
            return
        if fields and fields[0][0] == b":status" and fields[0][1][:1] == b"1":
            return  # an informational response (RFC 9113 §8.1): the real one follows
        stream.responded = True
        stream.got_end = end
        stream.handler.plane_headers(fields, end)
        if end:
            stream._ended()

    def on_data(self, stream_id: int, data: bytes, flow: int, end: bool) -> None:
        stream = self.streams[stream_id]
        if not stream.responded or stream.got_end:
            raise H2Error(wire.PROTOCOL_ERROR, "DATA before the response HEADERS or after END_STREAM")
        stream.owed += flow
        stream.handler.plane_data(data, flow)
        if end and not stream.closed:  # DATA with END_STREAM, no trailers
            stream.got_end = True
            stream.handler.plane_trailers(None)
            stream._ended()

    def on_reset(self, stream_id: int, code: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream._on_reset(code)

    def on_settings(self, window_changed: bool) -> None:
        self.max_streams = min(self.peer_max_streams, 1 << 16)
        if window_changed:
            self._window_opened()
        if not self.ready and not self.closing:
            self.ready = True
            if not self.settled.done():
                self.settled.set_result(None)

    def on_goaway(self, last_stream_id: int, code: int) -> None:
        self._goaway(last_stream_id, code)

    def is_idle(self, stream_id: int) -> bool:
        return stream_id >= self.next_id or not stream_id & 1

    def handler_failed(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.cancel()

    def protocol_error(self, error: H2Error) -> None:
        log.warning("gRPC plane %s broke HTTP/2: %s", self.group.address, error)
        self.send_goaway(0, error.code)
        self.flush()
        self._lost(UpstreamBroken(f"the plane broke the HTTP/2 protocol: {error}"))

    def _goaway(self, last_stream_id: int, code: int | None) -> None:
        """No new streams here; those the plane did not take fail (they were not processed: UNAVAILABLE)."""
        log.info("gRPC plane %s sent GOAWAY (last stream %d, code %s)", self.group.address, last_stream_id, code)
        self.goaway = True
        self.group.discard(self)
        self.last_stream_id = min(self.last_stream_id, last_stream_id)
        error = ConnectFailed("the plane is going away (GOAWAY) and did not take the call")
        for stream in [s for s in self.streams.values() if s.id > self.last_stream_id]:
            stream._on_failed(error)
        if not self.streams:
            self.close()

    # -- output

    def stream_closed(self, stream: PlaneStream) -> None:
        self.streams.pop(stream.id, None)
        if not self.streams and (self.goaway or self.group.retired):
            self.close()

    # -- ending

    def close(self) -> None:
        """Close after a GOAWAY (a graceful end for the plane); streams still open fail."""
        if self.closing:
            return
        if self.transport is not None:
            self.send_goaway(0, wire.NO_ERROR)
            self.flush()
            self.transport.close()
        self._lost(UpstreamBroken("the gateway closed the plane connection"))

    def _lost(self, error: GatewayError) -> None:
        self.closing = True
        self.ready = False
        self.decoder.release()  # its cached blocks no longer count against the worker's budget
        self.group.discard(self)
        if not self.settled.done():
            self.settled.set_result(None)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        for stream in list(self.streams.values()):
            stream._on_failed(error)
        if self.flush_handle is not None:
            self.flush_handle.cancel()
            self.flush_handle = None


class PlaneAddress:
    """The connections to one plane `host:port` in one region, and the calls using them.

    Connections are opened by the worker's region-checked connector (SPEC §8): the host is resolved
    by the table's resolver and every address must lie in the region's networks. A connection whose
    address has left the host's DNS answer takes no new stream and closes once its streams end.
    """

    def __init__(self, address: str, region: Region, connector: Connector, loop: asyncio.AbstractEventLoop) -> None:
        self.address = address
        self.authority = address.encode()
        host, _, port = address.rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port)
        self.region = region
        self.connector = connector
        self.loop = loop
        self.conns: list[PlaneConnection] = []  # ready or connecting, taking new streams
        self.connecting: PlaneConnection | None = None
        self.users = 0
        self.retired = False
        self.tasks: set[asyncio.Task] = set()

    def __repr__(self) -> str:
        return f"<PlaneAddress {self.address} users={self.users} {self.conns}{' retired' if self.retired else ''}>"

    def connect(self, call, timeout: float) -> None:
        """`call.plane_connected(conn)` now or once a connection is ready; `call.plane_failed(error)` if none can be."""
        for conn in list(self.conns):
            # A literal address is its own answer: no DNS look-up per call.
            if conn.address and conn.address != self.host and not self.connector.still_current(self.host, conn.address):
                self.discard(conn)  # its address left the DNS answer: no new streams (issue 10)
                if not conn.streams:
                    conn.close()
                continue
            if conn.has_room:
                call.plane_connected(conn)
                return
        pending = self.connecting
        if pending is not None and len(pending.waiters) < pending.max_streams:
            conn = pending
        else:
            conn = self.connecting = PlaneConnection(self)
            self.conns.append(conn)
            task = self.loop.create_task(self._connect(conn, timeout))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        conn.waiters.append(call)

    async def _connect(self, conn: PlaneConnection, timeout: float) -> None:
        error: GatewayError | None = None
        try:
            async with asyncio.timeout(timeout):
                _, _, conn.address = await self.connector.open(
                    self.host, self.port, self.region, lambda: conn, timeout=timeout
                )
                await conn.settled
        except TimeoutError:
            error = ConnectFailed(f"could not connect to the plane's gRPC address: timed out after {timeout:g} s")
        except GatewayError as exc:
            error = exc  # no address in the region, refused, unreachable (the connector's ConnectFailed)
        if error is None and not conn.ready:
            error = ConnectFailed("could not connect to the plane's gRPC address: the connection was closed")
        if self.connecting is conn:
            self.connecting = None
        waiters, conn.waiters = conn.waiters, []
        if error is not None:
            conn._lost(error)
            for call in waiters:
                call.plane_failed(error)
            return
        for call in waiters:
            self.connect(call, timeout)  # this connection, or another one when the plane allows fewer streams

    def discard(self, conn: PlaneConnection) -> None:
        """The connection takes no more streams."""
        if conn in self.conns:
            self.conns.remove(conn)

    def close(self) -> None:
        for conn in list(self.conns):
            if not conn.streams:
                conn.close()


class Planes:
    """The gateway's plane connections, by address and region (networks included)."""

    def __init__(self, connector: Connector) -> None:
        self.loop = asyncio.get_running_loop()
        self.connector = connector
        self.open: dict[tuple[str, Region], PlaneAddress] = {}

    def __repr__(self) -> str:
        return f"<Planes {sorted(address for address, _ in self.open)}>"

    def acquire(self, address: str, region: Region) -> PlaneAddress:
        key = (address, region)
        group = self.open.get(key)
        if group is None:
            group = self.open[key] = PlaneAddress(address, region, self.connector, self.loop)
        group.users += 1
        return group

    def release(self, group: PlaneAddress) -> None:
        group.users -= 1
        if group.users == 0 and group.retired:
            group.close()

    def table_swapped(self, table: Table) -> None:
        """Retire the addresses in no plane of the new table; their connections close once their calls end."""
        # A region whose networks changed is another key: connections opened under the old ones retire.
        keep = {(plane.grpc, table.regions[plane.region]) for plane in table.planes.values() if plane.grpc}
        for key in [k for k in self.open if k not in keep]:
            group = self.open.pop(key)
            group.retired = True
            if group.users == 0:
                group.close()

    async def close(self) -> None:
        for group in self.open.values():
            group.retired = True
            group.close()
        self.open.clear()
        await asyncio.sleep(0)
