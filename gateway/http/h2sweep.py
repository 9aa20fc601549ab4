"""HTTP/2 connections and streams that hold a worker without making progress: the HTTP/1.1 sweep's
limits (`gateway.http.server.sweep`, issue 5 and 9) on the project's own HTTP/2 frame layer (issue 13).

Every SWEEP_SECONDS, over one `H2Server`'s connections:
- a connection whose preface, or one header block (HEADERS + CONTINUATION, or one such frame
  trickled byte by byte), is still incomplete HEAD_TIMEOUT_SECONDS after the sweep first saw it
  so gets GOAWAY and is closed (slowloris). There is no stream to answer 408 on, and while a block
  is open nothing else may be sent on the connection (RFC 9113 §6.10). Before this, a trickled
  block kept its connection for ever: each byte reset the 300 s idle clock;
- an HTTP stream (`h2.H2Call`) whose request body stalls BODY_TIMEOUT_SECONDS or averages under
  BODY_MIN_RATE after that long (`server.body_too_slow`, the HTTP/1.1 rule) gets 408, or
  RST_STREAM once its answer has begun, and its plane call is cancelled; the connection's other
  streams go on. A connection left with nothing but such streams is closed, as HTTP/1.1 closes it.
  The bytes of a DATA frame still arriving count as progress (a client may send 1 MiB frames:
  our SETTINGS_MAX_FRAME_SIZE); time the client waits for window we withhold does not count.
gRPC streams are not swept: a client-streaming call may rightly pause, and its deadline bounds it.
A connection with its preface and no stream is idle, not slow: `h2server.IDLE_SECONDS` applies.

The decisions read the frame layer's state and are sampled, so a limit holds to within one sweep.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from gateway.grpc import wire
from gateway.grpc.h2server import H2Connection, H2Server, ServerStream
from gateway.http import server as http_server
from gateway.http.h2 import H2Call

log = logging.getLogger("gateway.http")

_PREFACE = object()  # what `head_in_progress` names for a connection still sending its preface
# Below this much connection window (as the client sees it) the client is ours to wait for: the
# window is held by other streams whose planes are slow (a WINDOW_UPDATE goes out per half window).
HELD_BACK_WINDOW = wire.DEFAULT_FRAME


def head_in_progress(conn: H2Connection) -> object | None:
    """What of the connection's header side is still arriving, or None: its preface, or a header
    block (the object is that block's, so a later block is told apart from a stalled one)."""
    if not conn.preface:
        return _PREFACE
    if conn.continued:
        return conn.block  # one list per header block (wire.FrameConnection._headers)
    parts = conn.parts  # an incomplete frame: one list until it is complete (wire.FrameConnection._keep)
    if parts and not conn.read_paused and len(parts[0]) > 3 and parts[0][3] in (wire.HEADERS, wire.CONTINUATION):
        return parts
    return None


def arriving_data(conn: H2Connection, stream_id: int) -> int:
    """Bytes of a DATA frame of `stream_id` received but not parsed yet (the frame is still coming in)."""
    parts = conn.parts
    if not parts or not conn.preface or conn.read_paused:
        return 0
    head = parts[0]
    if len(head) < 9 or head[3] != wire.DATA or int.from_bytes(head[5:9], "big") & wire.STREAM_MASK != stream_id:
        return 0
    return min(conn.have - 9, int.from_bytes(head[:3], "big"))


Heads = dict[H2Connection, tuple[object, float]]  # connection -> (its head in progress, first seen at)


def sweep(conns: Iterable[H2Connection], heads: Heads, now: float) -> Heads:
    """Apply the limits above to `conns`; returns the heads in progress for the next sweep."""
    seen: Heads = {}
    for conn in list(conns):
        if conn.closing:
            continue
        head = head_in_progress(conn)
        if head is not None:
            before = heads.get(conn)
            since = before[1] if before is not None and before[0] is head else now
            if now - since > http_server.HEAD_TIMEOUT_SECONDS:
                log.info("HTTP/2 client %s: header block not received within %g s", conn.client,
                         http_server.HEAD_TIMEOUT_SECONDS)  # fmt: skip
                conn.close()
                continue
            seen[conn] = (head, since)
        if conn.streams and _sweep_streams(conn, now) and all(_timed_out(s) for s in conn.streams.values()):
            conn.close()
    return seen


def _sweep_streams(conn: H2Connection, now: float) -> int:
    """The body rule on each HTTP stream of `conn`; how many timed out now."""
    held_back = conn.recv_window < HELD_BACK_WINDOW
    timed_out = 0
    for stream in list(conn.streams.values()):
        call = stream.handler
        if isinstance(call, H2Call) and call.sweep(now, arriving_data(conn, stream.id), held_back):
            timed_out += 1
    return timed_out


def _timed_out(stream: ServerStream) -> bool:
    return getattr(stream.handler, "timed_out", False)


class H2Sweeper:
    """Runs `sweep` over one HTTP/2 server's connections every SWEEP_SECONDS until it has drained."""

    def __init__(self, server: H2Server) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.heads: Heads = {}
        self.handle = self.loop.call_later(http_server.SWEEP_SECONDS, self.tick)

    def __repr__(self) -> str:
        return f"<H2Sweeper {self.server!r} heads in progress={len(self.heads)}>"

    def tick(self) -> None:
        self.heads = sweep(self.server.connections, self.heads, self.loop.time())
        if not self.server.draining or self.server.connections:
            self.handle = self.loop.call_later(http_server.SWEEP_SECONDS, self.tick)
