"""The gRPC relay's HTTP/2 frame layer (gateway/grpc/wire.py): pure tests of the layer, then a raw HTTP/2
client against the real gateway and a real grpcio plane for what a peer can do to it."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import grpc
import hpack
import pytest

from gateway.grpc import wire
from gateway.grpc.wire import H2Error
from tests.support import EXAMPLE, free_port, running_gateway, write_table
from tests.test_grpc import AUTH, HOST, WAIT, GrpcPlane, channel, table_doc, unary

# -- the layer alone -----------------------------------------------------------------------------


class Stream:
    def __init__(self, stream_id: int, window: int) -> None:
        self.id = stream_id
        self.send_window = window
        self.recv_window = 1 << 16
        self.credit = 0


class Recorder(wire.FrameConnection):
    """A FrameConnection that records what it is told; its streams are opened by HEADERS."""

    stream_window = 1 << 16
    connection_window = 1 << 20

    def __init__(self) -> None:
        super().__init__(4096)
        self.preface = True
        self.streams: dict[int, Stream] = {}
        self.seen: list[tuple] = []
        self.error: H2Error | None = None
        self.sent: list[bytes] = []

    def flush(self):
        self.sent += self.out
        self.out = []

    def on_headers(self, stream_id, fields, end):
        self.streams.setdefault(stream_id, Stream(stream_id, self.peer_initial_window))
        self.seen.append(("headers", stream_id, fields, end))

    def on_data(self, stream_id, data, flow, end):
        self.seen.append(("data", stream_id, data, flow, end))

    def on_settings(self, window_changed):
        self.seen.append(("settings", window_changed))

    def is_idle(self, stream_id):
        return stream_id not in self.streams

    def protocol_error(self, error):
        self.error = error

    def flush_soon(self):
        pass


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return wire.frame(kind, flags, stream_id, payload)


BLOCK = hpack.Encoder().encode([(b":method", b"POST"), (b":path", b"/t.Plane/Echo"), (b"x-long", b"v" * 100)])
FIELDS = [(b":method", b"POST"), (b":path", b"/t.Plane/Echo"), (b"x-long", b"v" * 100)]


def test_continuation_padding_and_priority_fields_reassemble_one_header_block() -> None:
    conn = Recorder()
    first = bytes([3]) + b"\x00\x00\x00\x00\x10" + BLOCK[:10] + b"\x00" * 3  # pad length, priority, padding
    data = bytes([4]) + b"hello" + b"\x00" * 4
    conn.data_received(
        frame(wire.HEADERS, wire.PADDED | wire.PRIORITY_FLAG, 1, first)
        + frame(wire.CONTINUATION, 0, 1, BLOCK[10:50])
        + frame(wire.CONTINUATION, wire.END_HEADERS, 1, BLOCK[50:])
        + frame(wire.PRIORITY, 0, 1, b"\x00" * 5)  # ignored
        + frame(wire.DATA, wire.PADDED | wire.END_STREAM, 1, data)
    )
    assert conn.error is None
    assert conn.seen == [("headers", 1, FIELDS, False), ("data", 1, b"hello", len(data), True)]
    assert conn.recv_window == (1 << 20) - len(data)  # padding counts against the window (RFC 9113 §6.1)


def test_frames_split_anywhere_parse_the_same() -> None:
    conn = Recorder()
    wire_bytes = frame(wire.HEADERS, wire.END_HEADERS, 1, BLOCK) + frame(wire.DATA, wire.END_STREAM, 1, b"x" * 300)
    for i in range(len(wire_bytes)):
        conn.data_received(wire_bytes[i : i + 1])
    assert conn.seen == [("headers", 1, FIELDS, False), ("data", 1, b"x" * 300, 300, True)]


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (frame(wire.HEADERS, 0, 1, BLOCK[:10]) + frame(wire.PING, 0, 0, b"\x00" * 8), wire.PROTOCOL_ERROR),
        (frame(wire.CONTINUATION, wire.END_HEADERS, 1, BLOCK), wire.PROTOCOL_ERROR),
        (frame(wire.DATA, 0, 0, b"x"), wire.PROTOCOL_ERROR),
        (frame(wire.DATA, 0, 3, b"x"), wire.PROTOCOL_ERROR),  # an idle stream
        (frame(wire.DATA, wire.PADDED, 1, b"\x05abc"), wire.PROTOCOL_ERROR),
        (frame(wire.PING, 0, 0, b"\x00" * 7), wire.FRAME_SIZE_ERROR),
        (frame(wire.WINDOW_UPDATE, 0, 0, b"\x00\x00\x00"), wire.FRAME_SIZE_ERROR),
        (frame(wire.WINDOW_UPDATE, 0, 0, b"\x00\x00\x00\x00"), wire.PROTOCOL_ERROR),
        (frame(wire.WINDOW_UPDATE, 0, 0, struct.pack(">L", (1 << 31) - 1)), wire.FLOW_CONTROL_ERROR),
        (frame(wire.SETTINGS, 0, 0, b"\x00\x04\x00"), wire.FRAME_SIZE_ERROR),
        (frame(wire.SETTINGS, 0, 0, struct.pack(">HL", wire.MAX_FRAME_SIZE, 100)), wire.PROTOCOL_ERROR),
        (frame(wire.SETTINGS, 0, 0, struct.pack(">HL", wire.INITIAL_WINDOW_SIZE, 1 << 31)), wire.FLOW_CONTROL_ERROR),
        (frame(wire.SETTINGS, wire.ACK, 0, b"\x00" * 6), wire.FRAME_SIZE_ERROR),
        (frame(wire.HEADERS, wire.END_HEADERS, 3, b"\xff\xff\xff\xff"), wire.COMPRESSION_ERROR),
        (frame(wire.HEADERS, wire.END_HEADERS, 3, b"\x00\x01a\x7f" + b"\x80" * 5000), wire.COMPRESSION_ERROR),
        (frame(wire.HEADERS, wire.END_HEADERS, 3, hpack.Encoder().encode([(b"x", b"v" * 5000)])), wire.ENHANCE_YOUR_CALM),
        (frame(wire.PUSH_PROMISE, wire.END_HEADERS, 1, b"\x00\x00\x00\x02"), wire.PROTOCOL_ERROR),
        (b"\x02\x00\x00" + bytes([wire.DATA, 0]) + b"\x00\x00\x00\x01", wire.FRAME_SIZE_ERROR),  # above 16384
        (frame(wire.DATA, 0, 1, b"x" * 16384) * 5, wire.FLOW_CONTROL_ERROR),  # the stream's 65,536 bytes
    ],
    ids=[
        "interrupted-block", "stray-continuation", "data-on-stream-0", "data-on-idle-stream", "padding-too-long",
        "short-ping", "short-window-update", "window-update-of-0", "window-overflow", "settings-size",
        "max-frame-size-too-small", "initial-window-too-large", "settings-ack-payload", "bad-hpack", "hpack-overflow",
        "header-list-too-large", "push-promise", "frame-too-large", "stream-window-exceeded",
    ],
)  # fmt: skip
def test_protocol_errors_become_connection_errors(data: bytes, code: int) -> None:
    conn = Recorder()
    conn.data_received(frame(wire.HEADERS, wire.END_HEADERS, 1, BLOCK))
    conn.data_received(data)
    assert conn.error is not None and conn.error.code == code, conn.error


def test_settings_are_applied_and_acknowledged_and_move_open_stream_windows() -> None:
    conn = Recorder()
    conn.data_received(frame(wire.HEADERS, wire.END_HEADERS, 1, BLOCK))
    stream = conn.streams[1]
    stream.send_window -= 1000  # response data sent
    conn.data_received(
        frame(
            wire.SETTINGS,
            0,
            0,
            struct.pack(
                ">HLHLHL", wire.INITIAL_WINDOW_SIZE, 100, wire.MAX_FRAME_SIZE, 1 << 20, wire.MAX_CONCURRENT_STREAMS, 7
            ),
        )  # fmt: skip
    )
    assert stream.send_window == 100 - 1000  # may go negative (RFC 9113 §6.9.2)
    assert (conn.peer_initial_window, conn.peer_max_frame, conn.peer_max_streams) == (100, 1 << 20, 7)
    assert conn.sent[-1] == frame(wire.SETTINGS, wire.ACK, 0)
    assert conn.seen[-1] == ("settings", True)


def test_ping_is_answered_and_its_ack_is_not() -> None:
    conn = Recorder()
    conn.data_received(frame(wire.PING, 0, 0, b"12345678") + frame(wire.PING, wire.ACK, 0, b"abcdefgh"))
    assert conn.sent == [frame(wire.PING, wire.ACK, 0, b"12345678")]


def test_window_updates_go_out_once_half_a_window_is_owed() -> None:
    conn = Recorder()
    conn.data_received(frame(wire.HEADERS, wire.END_HEADERS, 1, BLOCK))
    stream = conn.streams[1]
    conn.acknowledge(stream, 1000)
    assert conn.out == []  # small messages need no WINDOW_UPDATE of their own
    conn.acknowledge(stream, (1 << 15) - 1000)
    assert conn.out == [frame(wire.WINDOW_UPDATE, 0, 1, struct.pack(">L", 1 << 15))]
    conn.acknowledge(None, 1 << 19)
    assert conn.out[-1] == frame(wire.WINDOW_UPDATE, 0, 0, struct.pack(">L", (1 << 19) + (1 << 15)))


def test_large_header_blocks_are_sent_with_continuation() -> None:
    conn = Recorder()
    fields = [(b"x-big", b"v" * 40000)]
    conn.send_headers(1, fields, True)
    sent = b"".join(conn.out)
    other = Recorder()
    other.max_header_block = other.decoder.max_header_list_size = 1 << 16
    other.data_received(sent)
    assert other.seen == [("headers", 1, fields, True)]
    assert [sent[i + 3] for i in (0, 16393, 32786)] == [wire.HEADERS, wire.CONTINUATION, wire.CONTINUATION]


# -- a raw HTTP/2 client against the gateway ---------------------------------------------------------


@pytest.fixture(scope="module")
def gateway(tmp_path_factory) -> Iterator:
    us, eu = GrpcPlane("us-east-1"), GrpcPlane("eu-west-1")
    table = write_table(tmp_path_factory.mktemp("wire") / "table.yaml", table_doc(us, eu, f"127.0.0.1:{free_port()}"))
    assert EXAMPLE.exists()
    with running_gateway(table, grpc_port=free_port()) as gw:
        yield gw
    us.stop()
    eu.stop()


class RawClient:
    def __init__(self, port: int, settings: dict[int, int] | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.buffer = b""
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.send(wire.PREFACE + wire.settings_frame(settings or {}))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def frame(self) -> tuple[int, int, int, bytes] | None:
        """The next frame (header blocks decoded), None at EOF."""
        while len(self.buffer) < 9 or len(self.buffer) < 9 + int.from_bytes(self.buffer[:3]):
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buffer += chunk
        length = int.from_bytes(self.buffer[:3])
        kind, flags, stream_id = self.buffer[3], self.buffer[4], int.from_bytes(self.buffer[5:9]) & wire.STREAM_MASK
        payload, self.buffer = self.buffer[9 : 9 + length], self.buffer[9 + length :]
        if kind == wire.HEADERS:
            payload = dict(self.decoder.decode(payload, raw=True))  # type: ignore[assignment]
        return kind, flags, stream_id, payload

    def request(self, stream_id: int, method: str, message: bytes) -> None:
        block = self.encoder.encode(
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", f"/t.Plane/{method}"),
                (":authority", HOST),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                *AUTH,
            ]  # fmt: skip
        )
        body = b"\x00" + len(message).to_bytes(4) + message
        self.send(
            frame(wire.HEADERS, wire.END_HEADERS, stream_id, block) + frame(wire.DATA, wire.END_STREAM, stream_id, body)
        )

    def until(self, kind: int, flags: int = 0, stream_id: int | None = None) -> list[tuple]:
        """Frames up to and including the first of `kind` with `flags` (on `stream_id`)."""
        frames = []
        while (f := self.frame()) is not None:
            frames.append(f)
            if f[0] == kind and f[1] & flags == flags and (stream_id is None or f[2] == stream_id):
                return frames
        raise AssertionError(f"connection closed before frame type {kind}: {frames}")

    def close(self) -> None:
        self.sock.close()


def data_of(frames: list[tuple], stream_id: int) -> bytes:
    return b"".join(f[3] for f in frames if f[0] == wire.DATA and f[2] == stream_id)


def test_raw_call_settings_ack_ping_and_padding(gateway) -> None:
    client = RawClient(gateway.grpc_port)
    frames = client.until(wire.SETTINGS, wire.ACK)  # the gateway acknowledges our SETTINGS
    assert frames[0][0] == wire.SETTINGS and not frames[0][1] & wire.ACK  # its own come first
    client.send(frame(wire.PING, 0, 0, b"pingpong"))
    assert client.until(wire.PING, wire.ACK)[-1][3] == b"pingpong"
    block = client.encoder.encode(
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/t.Plane/Echo"),
            (":authority", HOST),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *AUTH,
        ]  # fmt: skip
    )
    body = b"\x00\x00\x00\x00\x05hello"
    client.send(
        frame(wire.HEADERS, wire.PADDED | wire.PRIORITY_FLAG, 1, b"\x02" + b"\x00" * 5 + block[:7] + b"\x00\x00")
        + frame(wire.CONTINUATION, wire.END_HEADERS, 1, block[7:])
        + frame(wire.DATA, wire.PADDED | wire.END_STREAM, 1, b"\x03" + body + b"\x00" * 3)
    )
    frames = client.until(wire.HEADERS, wire.END_STREAM, 1)
    assert frames[-1][3][b"grpc-status"] == b"0"
    assert data_of(frames, 1) == body
    client.close()


@pytest.mark.parametrize("how", ["window_update", "settings"])
def test_response_data_waits_for_the_clients_window(gateway, how) -> None:
    client = RawClient(gateway.grpc_port, {wire.INITIAL_WINDOW_SIZE: 4})
    client.until(wire.SETTINGS, wire.ACK)
    client.request(1, "Echo", b"sixteen byte msg")
    frames = client.until(wire.DATA, 0, 1)
    client.send(frame(wire.PING, 0, 0, b"barrier!"))  # answered after anything the gateway had to send
    frames += client.until(wire.PING, wire.ACK)
    assert data_of(frames, 1) == b"\x00\x00\x00\x00\x10"[:4]  # exactly the window, and no trailers yet
    assert not any(f[0] == wire.HEADERS and f[1] & wire.END_STREAM for f in frames)
    if how == "window_update":
        client.send(frame(wire.WINDOW_UPDATE, 0, 1, struct.pack(">L", 1000)))
    else:
        client.send(wire.settings_frame({wire.INITIAL_WINDOW_SIZE: 1004}))
    frames += client.until(wire.HEADERS, wire.END_STREAM, 1)
    assert data_of(frames, 1) == b"\x00\x00\x00\x00\x10sixteen byte msg"
    assert frames[-1][3][b"grpc-status"] == b"0"
    client.close()


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (frame(wire.WINDOW_UPDATE, 0, 0, b"\x00\x00\x00"), wire.FRAME_SIZE_ERROR),
        (frame(wire.DATA, 0, 0, b"x"), wire.PROTOCOL_ERROR),
        (frame(wire.CONTINUATION, wire.END_HEADERS, 1, b"\x82"), wire.PROTOCOL_ERROR),
        (frame(wire.HEADERS, wire.END_HEADERS, 1, b"\xff\xff\xff\xff"), wire.COMPRESSION_ERROR),
        (frame(wire.HEADERS, wire.END_HEADERS, 2, b"\x82"), wire.PROTOCOL_ERROR),
    ],
    ids=["short-window-update", "data-on-stream-0", "stray-continuation", "bad-hpack", "even-stream"],
)
def test_a_malformed_frame_ends_that_connection_with_goaway_and_nothing_else(gateway, data, code) -> None:
    client = RawClient(gateway.grpc_port)
    client.until(wire.SETTINGS, wire.ACK)
    client.send(data)
    frames = client.until(wire.GOAWAY)
    assert struct.unpack(">LL", frames[-1][3][:8])[1] == code
    assert client.frame() is None  # then the gateway closes it
    client.close()
    with channel(gateway) as ch:  # the worker is fine
        assert unary(ch, "Echo")(b"still here", metadata=AUTH, timeout=WAIT) == b"still here"


def test_a_bad_preface_is_refused(gateway) -> None:
    sock = socket.create_connection(("127.0.0.1", gateway.grpc_port), timeout=WAIT)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    sock.close()
    assert wire.frame(wire.GOAWAY, 0, 0, struct.pack(">LL", 0, wire.PROTOCOL_ERROR)) in received
    with channel(gateway) as ch:
        assert unary(ch, "Echo")(b"ok", metadata=AUTH, timeout=WAIT) == b"ok"


def test_grpcio_calls_are_unaffected_by_a_small_peer_window(gateway) -> None:
    options = [("grpc.default_authority", HOST), ("grpc.http2.lookahead_bytes", 4096), ("grpc.http2.bdp_probe", 0)]
    with grpc.insecure_channel(f"127.0.0.1:{gateway.grpc_port}", options=options) as ch:
        big = bytes(range(256)) * 4096  # 1 MiB: many windows' worth both ways
        assert unary(ch, "Echo")(big, metadata=AUTH, timeout=WAIT) == big
