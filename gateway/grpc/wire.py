"""The HTTP/2 frame layer both sides of the relay use: RFC 9113 for what gRPC needs, no more, no event objects.

The `h2` library was this layer first; its frame objects, events and two state machines per frame
were over half of the gateway's CPU per relayed call (py-spy, `benchmarks/run_grpc.py`). Here a
connection parses frames with `struct` and calls its subclass (`h2server.H2Connection`,
`upstream.PlaneConnection`) once per meaningful frame: `on_headers`, `on_data`, `on_reset`,
`on_window`, `on_settings`, `on_goaway`. What the layer does itself:
- the preface and SETTINGS (ours at once, the peer's applied and acknowledged: INITIAL_WINDOW_SIZE
  moves every open stream's send window, §6.9.2; MAX_FRAME_SIZE; HEADER_TABLE_SIZE to the encoder);
- PING answered with its ACK; PRIORITY and unknown frame types ignored (§5.5);
- HEADERS + CONTINUATION reassembled, padding and priority fields stripped, the block decoded (always,
  even for a stream already closed, to keep the HPACK table in step: RFC 7541 §2.3);
- flow control both ways: the peer's windows (`send_window` on the connection and on each stream
  object) and ours, which the subclass refills with `acknowledge` once data is passed on; a
  WINDOW_UPDATE goes out when half a window is owed, as h2 does;
- every protocol violation becomes `H2Error`, which the subclass turns into GOAWAY and a close
  (`protocol_error`); the worker never sees it.
Frames written in one event-loop turn are joined into one transport write (`flush`).
What a hostile peer can make it hold is bounded by limits.py: frames per header block, unread
PING/SETTINGS ACKs, the HPACK block cache, and (server side, `limit_reads`) no reading while the
transport's buffer is full.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import Any

import hpack
from hpack.exceptions import HPACKError, OversizedHeaderListError

from gateway.grpc import limits
from gateway.grpc.hpack_literal import LiteralEncoder

log = logging.getLogger("gateway.grpc")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
# Error codes (RFC 9113 §7).
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = 0x5, 0x6, 0x7, 0x8
COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x9, 0xB
# SETTINGS identifiers (§6.5.2).
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = (
    range(1, 7)
)
DEFAULT_WINDOW = 65535
DEFAULT_FRAME = 16384
MAX_WINDOW = (1 << 31) - 1
ENABLE_CONNECT_PROTOCOL = 8  # RFC 8441 §3: extended CONNECT (WebSocket over HTTP/2)
STREAM_MASK = 0x7FFFFFFF

FRAME_HEAD = struct.Struct(">HBBBL")  # length (24 bits: 16 + 8), type, flags, stream id
U32 = struct.Struct(">L")
TWO_U32 = struct.Struct(">LL")
SETTING = struct.Struct(">HL")
_pack_head = FRAME_HEAD.pack
_unpack_head = FRAME_HEAD.unpack_from

Headers = list[tuple[bytes, bytes]]


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _pack_head(n >> 8, n & 0xFF, kind, flags, stream_id) + payload


def settings_frame(values: dict[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(SETTING.pack(k, v) for k, v in values.items()))


class H2Error(Exception):
    """A connection error (RFC 9113 §5.4.1): the connection ends with GOAWAY carrying `code`."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class BlockCache(hpack.Decoder):
    """hpack's decoder, remembering the fields of header blocks that left the dynamic table unchanged.

    A header block decodes to the same fields as long as the dynamic table is the same (RFC 7541
    §2.3), so a block that inserted nothing and resized nothing is cached by its bytes, and the
    whole cache is dropped whenever a block changes the table. gRPC peers send the same blocks over
    and over (the plane's response headers and `grpc-status: 0` trailers, fully indexed after the
    first call). Only what recurs is kept: a small block (`limits.cache_cost`) the second time it is
    seen, within CACHE_BYTES_PER_CONNECTION and the worker's `budget` (distinct 60 KB literal blocks
    once pinned +178 MiB on six idle connections). `release` gives the bytes back when the
    connection ends.
    """

    def __init__(self, max_header_list_size: int, budget: limits.CacheBudget = limits.WORKER_CACHE) -> None:
        super().__init__()
        self.max_header_list_size = max_header_list_size
        self.blocks: dict[bytes, list] = {}
        self.seen: set[int] = set()  # hashes of blocks decoded once and not cached
        self.cached = 0  # bytes the cache holds, as counted by limits.cache_cost
        self.budget = budget
        self.changes = 0
        add = self.header_table.add

        def counted_add(name: bytes, value: bytes) -> Any:
            self.changes += 1
            return add(name, value)

        self.header_table.add = counted_add  # type: ignore[method-assign]

    def decode(self, data: Any, raw: bool = True) -> Any:
        cached = self.blocks.get(data)
        if cached is not None:
            return list(cached)
        changes, size = self.changes, self.header_table.maxsize
        fields = list(super().decode(data, raw))
        if self.changes != changes or self.header_table.maxsize != size:
            self.clear()  # the table changed: the cached blocks may mean something else now
            return fields
        key = hash(data)  # computed by the lookup above already
        if key not in self.seen:
            if len(self.seen) >= limits.SEEN_MAX:
                self.seen.clear()
            self.seen.add(key)
            return fields
        cost = limits.cache_cost(data, fields)
        if cost is None:
            return fields
        if self.cached + cost > limits.CACHE_BYTES_PER_CONNECTION:
            self.clear()
        if not self.budget.take(cost):
            return fields  # the worker's caches are full: decode every time
        self.blocks[data] = fields
        self.cached += cost
        return list(fields)

    def clear(self) -> None:
        if self.blocks:
            self.blocks.clear()
        if self.cached:
            self.budget.give(self.cached)
            self.cached = 0

    def release(self) -> None:
        """The connection is over: its cached bytes go back to the worker's budget."""
        self.clear()
        self.seen.clear()


class FrameConnection(asyncio.Protocol):
    """One HTTP/2 connection's frames; subclasses own the streams (`self.streams`: id -> object with
    `send_window`, `recv_window` and `credit` attributes) and what the frames mean to them."""

    client_side = False
    limit_reads = False  # stop reading while the transport's buffer is full (the server side: h2server)
    stream_window = DEFAULT_WINDOW  # what we advertise as INITIAL_WINDOW_SIZE
    connection_window = DEFAULT_WINDOW
    max_frame = DEFAULT_FRAME
    streams: dict[int, Any]
    blocked: set[Any]  # streams with data waiting for window (each has `_window_opened()`)
    loop: asyncio.AbstractEventLoop
    flush_handle: asyncio.Handle | None

    def __init__(self, max_header_list: int) -> None:
        self.transport: asyncio.Transport | None = None
        self.closing = False
        self.write_paused = False  # the transport's buffer is full (asyncio flow control)
        self.read_paused = False  # ... and so the peer is not read (`limit_reads`)
        self.owed_acks = 0  # PING/SETTINGS ACKs queued since the transport last took everything
        self.parts: list[bytes] = []  # received bytes not parsed yet (an incomplete frame)
        self.have = 0  # their length
        self.wanted = 0  # how many are needed before parsing can go on: large frames are joined once
        self.preface = self.client_side  # a server waits for the client's preface
        self.out: list[bytes] = []
        self.encoder = LiteralEncoder()
        self.decoder = BlockCache(max_header_list)
        self.max_header_block = max_header_list
        self.send_window = DEFAULT_WINDOW  # the peer's connection window
        self.recv_window = self.connection_window  # ours, as the peer sees it
        self.credit = 0  # bytes passed on and not yet returned to the peer with WINDOW_UPDATE
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = DEFAULT_FRAME
        self.peer_max_streams = MAX_WINDOW
        self.continued = 0  # the stream whose header block CONTINUATION frames are completing
        self.block: list[bytes] = []
        self.block_size = 0
        self.block_end = 0
        self.block_frames = 0  # HEADERS + CONTINUATION frames of the block

    # -- to override

    def on_headers(self, stream_id: int, fields: Headers, end: bool) -> None: ...

    def on_data(self, stream_id: int, data: bytes, flow: int, end: bool) -> None: ...

    def on_reset(self, stream_id: int, code: int) -> None: ...

    def on_settings(self, window_changed: bool) -> None: ...

    def on_goaway(self, last_stream_id: int, code: int) -> None: ...

    def is_idle(self, stream_id: int) -> bool:
        """A stream id the peer may not use yet (RFC 9113 §5.1: frames on idle streams are errors)."""
        raise NotImplementedError

    def handler_failed(self, stream_id: int) -> None: ...

    def on_input_end(self) -> None:
        """The frames of one read are handled (before their answers are written)."""

    def backlog(self) -> int:
        """Frames queued to be written, and whatever will queue more when `on_input_end` runs."""
        return len(self.out)

    def protocol_error(self, error: H2Error) -> None: ...

    # -- shared by both sides

    def flush_soon(self) -> None:
        """Have `flush` called later in this event-loop turn: the frames written in one turn (many
        streams' headers, messages, trailers) go out in one write."""
        if self.flush_handle is None:
            self.flush_handle = self.loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self.flush_handle = None
        self.flush()

    def pause_writing(self) -> None:
        self.write_paused = True  # the peer is not reading: streams keep their data until resume_writing
        transport = self.transport
        if self.limit_reads and not self.read_paused and transport is not None and not transport.is_closing():
            # Nor is it read: whatever it sends could only queue more answers (limits.OUTPUT_HIGH_WATER).
            self.read_paused = True
            transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.owed_acks = 0
        if self.read_paused:
            self.read_paused = False
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()
            if self.parts:
                self.data_received(b"")  # what was left unparsed when reading stopped
        self._window_opened()

    def reset_stream(self, stream_id: int, code: int) -> None:
        if not self.closing:
            self.send_reset(stream_id, code)
            self.flush_soon()

    def on_window(self, stream: Any) -> None:
        """The peer opened a window: the connection's (`stream` None) or one stream's."""
        if stream is None:
            self._window_opened()
        elif stream in self.blocked:
            stream._window_opened()

    def _window_opened(self) -> None:
        for stream in list(self.blocked):
            stream._window_opened()

    # -- input

    def start(self, settings: dict[int, int]) -> None:
        """Our preface (the client's magic), SETTINGS, and the connection window beyond the default."""
        out = self.out
        if self.client_side:
            out.append(PREFACE)
        out.append(settings_frame(settings))
        if self.connection_window > DEFAULT_WINDOW:
            out.append(frame(WINDOW_UPDATE, 0, 0, U32.pack(self.connection_window - DEFAULT_WINDOW)))

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self.parts:
            self.parts.append(data)
            self.have += len(data)
            if self.have < self.wanted or self.read_paused:
                return
            buf = b"".join(self.parts)
            self.parts = []
        else:
            buf = data
        try:
            pos = 0
            if not self.preface:
                if len(buf) < 24:
                    if not PREFACE.startswith(buf):
                        raise H2Error(PROTOCOL_ERROR, "invalid connection preface")
                    self._keep(buf, 24)
                    return
                if buf[:24] != PREFACE:
                    raise H2Error(PROTOCOL_ERROR, "invalid connection preface")
                self.preface = True
                pos = 24
            end = len(buf)
            max_frame = self.max_frame
            while end - pos >= 9:
                hi, lo, kind, flags, stream_id = _unpack_head(buf, pos)
                length = (hi << 8) | lo
                if length > max_frame:
                    raise H2Error(FRAME_SIZE_ERROR, f"frame of {length} bytes exceeds SETTINGS_MAX_FRAME_SIZE")
                stop = pos + 9 + length
                if stop > end:
                    self._keep(buf[pos:], stop - pos)
                    break
                payload = buf[pos + 9 : stop]
                pos = stop
                stream_id &= STREAM_MASK
                if self.continued and kind != CONTINUATION:
                    raise H2Error(PROTOCOL_ERROR, "a header block was interrupted by another frame")
                try:
                    if kind == DATA:
                        self._data(stream_id, flags, payload, length)
                    elif kind == HEADERS:
                        if self.limit_reads and self.backlog() >= limits.OUTPUT_CHECK_FRAMES:
                            self.on_input_end()  # answer what came so far: does the peer read the answers?
                            self.flush()
                            if self.write_paused:
                                self._keep(buf[pos - 9 - length :], 0)  # this frame on: parsed on resume_writing
                                break
                        self._headers(stream_id, flags, payload, length)
                    elif kind == WINDOW_UPDATE:
                        self._window_update(stream_id, payload, length)
                    elif kind == RST_STREAM:
                        if stream_id == 0 or length != 4:
                            raise H2Error(PROTOCOL_ERROR if length == 4 else FRAME_SIZE_ERROR, "bad RST_STREAM")
                        if self.is_idle(stream_id):
                            raise H2Error(PROTOCOL_ERROR, "RST_STREAM on an idle stream")
                        self.on_reset(stream_id, U32.unpack(payload)[0])
                    elif kind == SETTINGS:
                        self._settings(stream_id, flags, payload, length)
                    elif kind == PING:
                        if stream_id or length != 8:
                            raise H2Error(PROTOCOL_ERROR if length == 8 else FRAME_SIZE_ERROR, "bad PING")
                        if not flags & ACK:
                            self._owe_ack()
                            self.out.append(frame(PING, ACK, 0, payload))
                    elif kind == CONTINUATION:
                        self._continuation(stream_id, flags, payload, length)
                    elif kind == GOAWAY:
                        if stream_id or length < 8:
                            raise H2Error(PROTOCOL_ERROR if length >= 8 else FRAME_SIZE_ERROR, "bad GOAWAY")
                        last, code = TWO_U32.unpack_from(payload)
                        self.on_goaway(last & STREAM_MASK, code)
                    elif kind == PRIORITY:
                        if stream_id == 0 or length != 5:
                            raise H2Error(PROTOCOL_ERROR if length == 5 else FRAME_SIZE_ERROR, "bad PRIORITY")
                    elif kind == PUSH_PROMISE:
                        raise H2Error(PROTOCOL_ERROR, "PUSH_PROMISE is not allowed here")
                    # other frame types are ignored (RFC 9113 §5.5)
                except H2Error:
                    raise
                except Exception:
                    log.exception("gRPC stream handler failed")
                    self.handler_failed(stream_id)
                if self.closing:
                    return
            else:
                if pos < end:
                    self._keep(buf[pos:], 9)
        except H2Error as error:
            self.parts = []
            self.protocol_error(error)
            return
        self.on_input_end()
        self.flush()

    def _owe_ack(self) -> None:
        self.owed_acks += 1
        if self.owed_acks > limits.MAX_OWED_ACKS:
            raise H2Error(ENHANCE_YOUR_CALM, f"over {limits.MAX_OWED_ACKS} PING/SETTINGS ACKs the peer has not read")

    def _keep(self, rest: bytes, wanted: int) -> None:
        self.parts = [rest]
        self.have = len(rest)
        self.wanted = wanted

    def _data(self, stream_id: int, flags: int, payload: bytes, length: int) -> None:
        if stream_id == 0:
            raise H2Error(PROTOCOL_ERROR, "DATA on stream 0")
        data = payload
        if flags & PADDED:
            pad = payload[0] if length else length + 1
            if pad >= length:
                raise H2Error(PROTOCOL_ERROR, "DATA padding exceeds the frame")
            data = payload[1 : length - pad]
        self.recv_window -= length
        if self.recv_window < 0:
            raise H2Error(FLOW_CONTROL_ERROR, "DATA beyond the connection's flow-control window")
        stream = self.streams.get(stream_id)
        if stream is None:
            if self.is_idle(stream_id):
                raise H2Error(PROTOCOL_ERROR, "DATA on an idle stream")
            self.acknowledge(None, length)  # a closed stream: ignored (§5.1), but it used the connection's window
            return
        stream.recv_window -= length
        if stream.recv_window < 0:
            raise H2Error(FLOW_CONTROL_ERROR, "DATA beyond the stream's flow-control window")
        self.on_data(stream_id, data, length, bool(flags & END_STREAM))

    def _headers(self, stream_id: int, flags: int, payload: bytes, length: int) -> None:
        if stream_id == 0:
            raise H2Error(PROTOCOL_ERROR, "HEADERS on stream 0")
        start, stop = 0, length
        if flags & PADDED:
            if not length:
                raise H2Error(FRAME_SIZE_ERROR, "HEADERS too short for its padding")
            start, stop = 1, length - payload[0]
        if flags & PRIORITY_FLAG:
            start += 5  # the priority fields are ignored (RFC 9113 §5.3.2)
        if start > stop:
            raise H2Error(PROTOCOL_ERROR, "HEADERS padding exceeds the frame")
        block = payload[start:stop] if start or stop != length else payload
        if flags & END_HEADERS:
            self._block(stream_id, block, bool(flags & END_STREAM))
        else:
            self.continued = stream_id
            self.block = [block]
            self.block_size = len(block)
            self.block_end = flags & END_STREAM
            self.block_frames = 1
            if self.block_size > self.max_header_block:
                raise H2Error(ENHANCE_YOUR_CALM, "header block exceeds SETTINGS_MAX_HEADER_LIST_SIZE")

    def _continuation(self, stream_id: int, flags: int, payload: bytes, length: int) -> None:
        if not self.continued or stream_id != self.continued:
            raise H2Error(PROTOCOL_ERROR, "CONTINUATION without a header block to continue")
        self.block_frames += 1
        # Empty CONTINUATION frames count too (CVE-2024-27316): they add no bytes, only work and list entries.
        if self.block_frames > limits.MAX_BLOCK_FRAMES:
            raise H2Error(ENHANCE_YOUR_CALM, f"header block in over {limits.MAX_BLOCK_FRAMES} frames")
        self.block.append(payload)
        self.block_size += length
        # A block's fields decode to at least its size (RFC 7541 §4.1 counts 32 bytes more per field).
        if self.block_size > self.max_header_block:
            raise H2Error(ENHANCE_YOUR_CALM, "header block exceeds SETTINGS_MAX_HEADER_LIST_SIZE")
        if flags & END_HEADERS:
            block, self.block, self.continued = b"".join(self.block), [], 0
            self._block(stream_id, block, bool(self.block_end))

    def _block(self, stream_id: int, block: bytes, end: bool) -> None:
        try:
            fields = self.decoder.decode(block)
        except OversizedHeaderListError as exc:
            raise H2Error(ENHANCE_YOUR_CALM, f"header list too large: {exc}") from None
        except (HPACKError, IndexError, ValueError) as exc:
            raise H2Error(COMPRESSION_ERROR, f"invalid header block: {exc!r}") from None
        self.on_headers(stream_id, fields, end)

    def _window_update(self, stream_id: int, payload: bytes, length: int) -> None:
        if length != 4:
            raise H2Error(FRAME_SIZE_ERROR, "WINDOW_UPDATE of a wrong size")
        increment = U32.unpack(payload)[0] & STREAM_MASK
        if increment == 0:
            raise H2Error(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
        if stream_id == 0:
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise H2Error(FLOW_CONTROL_ERROR, "connection window above 2^31-1")
            self.on_window(None)
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            return  # a closed stream (or one we never opened): nothing to send on it
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            raise H2Error(FLOW_CONTROL_ERROR, "stream window above 2^31-1")
        self.on_window(stream)

    def _settings(self, stream_id: int, flags: int, payload: bytes, length: int) -> None:
        if stream_id:
            raise H2Error(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if length:
                raise H2Error(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if length % 6:
            raise H2Error(FRAME_SIZE_ERROR, "SETTINGS of a wrong size")
        window_changed = False
        for i in range(0, length, 6):
            ident, value = SETTING.unpack_from(payload, i)
            if ident == INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise H2Error(FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for stream in self.streams.values():  # §6.9.2: the open streams' windows move by the change
                    stream.send_window += delta
                    if stream.send_window > MAX_WINDOW:
                        raise H2Error(FLOW_CONTROL_ERROR, "stream window above 2^31-1")
                window_changed = True
            elif ident == MAX_FRAME_SIZE:
                if not DEFAULT_FRAME <= value <= (1 << 24) - 1:
                    raise H2Error(PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE out of range")
                self.peer_max_frame = value
            elif ident == MAX_CONCURRENT_STREAMS:
                self.peer_max_streams = value
            elif ident == HEADER_TABLE_SIZE:
                self.encoder.header_table_size = value
            elif ident == ENABLE_PUSH and value > 1:
                raise H2Error(PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH not 0 or 1")
        self._owe_ack()
        self.out.append(frame(SETTINGS, ACK, 0))
        self.on_settings(window_changed)

    # -- output

    def send_headers(self, stream_id: int, headers: Headers, end: bool) -> None:
        block = self.encoder.encode(headers)
        n = len(block)
        if n <= self.peer_max_frame:
            self.out.append(_pack_head(n >> 8, n & 0xFF, HEADERS, END_HEADERS | end, stream_id) + block)
            return
        size = self.peer_max_frame
        chunks = [block[i : i + size] for i in range(0, n, size)]
        last = len(chunks) - 1
        for i, chunk in enumerate(chunks):
            kind = HEADERS if i == 0 else CONTINUATION
            flags = (end if i == 0 else 0) | (END_HEADERS if i == last else 0)
            self.out.append(frame(kind, flags, stream_id, chunk))

    def send_data(self, stream: Any, data: bytes | memoryview, end: bool) -> None:
        """A DATA frame; the caller made sure it fits both send windows and the peer's frame size."""
        n = len(data)
        self.send_window -= n
        stream.send_window -= n
        self.out.append(_pack_head(n >> 8, n & 0xFF, DATA, end, stream.id))
        self.out.append(data)  # type: ignore[arg-type]

    def send_end(self, stream_id: int) -> None:
        self.out.append(_pack_head(0, 0, DATA, END_STREAM, stream_id))

    def send_reset(self, stream_id: int, code: int) -> None:
        self.out.append(frame(RST_STREAM, 0, stream_id, U32.pack(code)))

    def send_goaway(self, last_stream_id: int, code: int) -> None:
        self.out.append(frame(GOAWAY, 0, 0, TWO_U32.pack(last_stream_id, code)))

    def window_for(self, stream: Any) -> int:
        """How much of a DATA frame may be sent on `stream` now."""
        return min(stream.send_window, self.send_window, self.peer_max_frame)

    def acknowledge(self, stream: Any, length: int) -> None:
        """Return `length` bytes of window to the peer (`stream` None or closed: the connection's only).

        A WINDOW_UPDATE goes out once half a window is owed: small messages need none of their own.
        """
        if not length or self.closing:
            return
        self.credit += length
        if self.credit >= self.connection_window >> 1:
            self.out.append(frame(WINDOW_UPDATE, 0, 0, U32.pack(self.credit)))
            self.recv_window += self.credit
            self.credit = 0
            self.flush_soon()
        if stream is not None:
            stream.credit += length
            if stream.credit >= self.stream_window >> 1:
                self.out.append(frame(WINDOW_UPDATE, 0, stream.id, U32.pack(stream.credit)))
                stream.recv_window += stream.credit
                stream.credit = 0
                self.flush_soon()

    def flush(self) -> None:
        out = self.out
        if out:
            self.out = []
            if not self.closing and self.transport is not None:
                self.transport.write(b"".join(out))
                if not self.write_paused:
                    self.owed_acks = 0  # the transport took them: they are the kernel's and the peer's now
