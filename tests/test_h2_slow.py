"""Slow HTTP/2 clients (issue 13 over issue 9's rules): request bodies that stall or trickle on a
stream, and header blocks or prefaces that never end, against a real data plane.

The data plane (`runner.DataPlane`) runs in the test's loop, in front of the suite's aiohttp
`Plane`, so that the limits can be shortened as tests/test_hostile.py shortens them
(`gateway.http.server`'s constants, read at each sweep). The client is the `h2` library on a raw
socket, for what real clients never do on purpose: stop mid-body, or mid-header-block.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest

from gateway.grpc import wire
from gateway.grpc.h2server import H2Connection, H2Server
from gateway.http import h2sweep
from gateway.http import server as http_server
from gateway.metrics import Metrics
from gateway.runner import DataPlane, ServeOptions
from gateway.state import TableState
from tests.planes import Plane
from tests.support import DEMO_KEY, example_doc, write_table
from tests.test_h2_hostile import FakeTransport, OpenRecorder

STD = "model-abc123.api.example.com"
WAIT = 10.0  # a guard against a hang, never a measured limit
BODY_LIMIT = 1.0  # BODY_TIMEOUT_SECONDS and HEAD_TIMEOUT_SECONDS in these tests
PROTOCOL_ERROR, INTERNAL_ERROR = 0x1, 0x2


@pytest.fixture
def short_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_server, "HEAD_TIMEOUT_SECONDS", BODY_LIMIT)
    monkeypatch.setattr(http_server, "BODY_TIMEOUT_SECONDS", BODY_LIMIT)
    monkeypatch.setattr(http_server, "SWEEP_SECONDS", 0.05)


@contextlib.asynccontextmanager
async def gateway(tmp_path: Path, plane: Plane) -> AsyncIterator[DataPlane]:
    config = write_table(tmp_path / "t.yaml", example_doc(plane.url, plane.url))
    opts = ServeOptions(config=str(config), port=0, admin_port=None, grpc_port=0, queue_store=str(tmp_path))
    metrics = Metrics()
    data = DataPlane(opts, TableState(opts.config, metrics), metrics)
    await data.start()
    try:
        yield data
    finally:
        while Client.opened:  # a failed test's clients too: no socket outlives its test
            Client.opened.pop().close()
        await data.drain(2.0)
        data.close()


class Client:
    """An h2c client with prior knowledge on asyncio streams; every event it receives is kept."""

    opened: list[Client] = []  # closed by `gateway` on the way out

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bool = False) -> None:
        self.reader, self.writer = reader, writer
        self.raw = raw  # keep the bytes received (`received`), unparsed: the test writes frames itself
        self.received = b""
        config = h2.config.H2Configuration(client_side=True, header_encoding=None, validate_inbound_headers=False)
        self.conn = h2.connection.H2Connection(config)
        self.events: list = []
        self.eof = False
        self.changed = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(cls, port: int, *, raw: bool = False) -> Client:
        client = cls(*await asyncio.open_connection("127.0.0.1", port), raw=raw)
        cls.opened.append(client)
        if not raw:
            client.conn.initiate_connection()
            client.flush()
        return client

    def flush(self) -> None:
        self.writer.write(self.conn.data_to_send())

    async def _read(self) -> None:
        try:
            while data := await self.reader.read(65536):
                if self.raw:
                    self.received += data
                    continue
                for event in self.conn.receive_data(data):
                    self.events.append(event)
                    if isinstance(event, h2.events.DataReceived):
                        with contextlib.suppress(h2.exceptions.StreamClosedError):
                            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                self.flush()
                self.changed.set()
        except (ConnectionError, h2.exceptions.ProtocolError):
            pass
        self.eof = True
        self.changed.set()

    async def until(self, predicate: Callable[[], object], what: str) -> None:
        async with asyncio.timeout(WAIT):
            while not predicate():
                if self.eof:
                    pytest.fail(f"the connection ended before {what}")
                self.changed.clear()
                await self.changed.wait()

    async def closed(self) -> None:
        async with asyncio.timeout(WAIT):
            await asyncio.shield(self.task)

    def request(self, path: str, length: int | None) -> int:
        stream = self.conn.get_next_available_stream_id()
        fields = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", STD),
                  ("authorization", f"Api-Key {DEMO_KEY}")]  # fmt: skip
        if length is not None:
            fields.append(("content-length", str(length)))
        self.conn.send_headers(stream, fields)
        self.flush()
        return stream

    def send(self, stream: int, data: bytes, end: bool = False) -> None:
        self.conn.send_data(stream, data, end_stream=end)
        self.flush()

    def answer(self, stream: int) -> tuple[dict, bytes, int | None] | None:
        """The stream's response fields, body and RST_STREAM code once it has ended or was reset."""
        fields: dict = {}
        body = b""
        for event in self.events:
            if getattr(event, "stream_id", None) != stream:
                continue
            if isinstance(event, h2.events.ResponseReceived):
                fields = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h2.events.DataReceived):
                body += event.data
            elif isinstance(event, h2.events.StreamEnded):
                return fields, body, None
            elif isinstance(event, h2.events.StreamReset):
                return fields, body, event.error_code
        return None

    async def answer_of(self, stream: int) -> tuple[dict, bytes, int | None]:
        await self.until(lambda: self.answer(stream) is not None, f"stream {stream} ended")
        answer = self.answer(stream)
        assert answer is not None
        return answer

    def goaway(self) -> h2.events.ConnectionTerminated | None:
        return next((e for e in self.events if isinstance(e, h2.events.ConnectionTerminated)), None)

    def close(self) -> None:
        self.task.cancel()
        self.writer.close()


def test_a_stalled_body_gets_408_its_plane_call_is_cancelled_and_a_sibling_stream_goes_on(
    short_limits: None, tmp_path: Path
) -> None:
    async def scenario() -> tuple:
        async with Plane() as plane, gateway(tmp_path, plane) as gw:
            client = await Client.open(gw.public_port)
            stalled = client.request("/production/sync/sink", 1000)
            client.send(stalled, b"x" * 10)  # ... and nothing more
            sibling = client.request("/production/predict", 40 * 100)
            for i in range(40):  # a slow but steady body: 100 bytes per 0.1 s, past the stalled one's limit
                client.send(sibling, b"%099d\n" % i, end=i == 39)
                await asyncio.sleep(0.1)
            timed_out = await client.answer_of(stalled)
            outcome = await asyncio.wait_for(asyncio.shield(plane.sink_outcome), WAIT)
            sibling_answer = await client.answer_of(sibling)
            after = client.request("/production/predict", 2)  # the connection is still served
            client.send(after, b"ok", end=True)
            after_answer = await client.answer_of(after)
            client.close()
            return timed_out, outcome, sibling_answer, after_answer

    (fields, body, reset), outcome, (s_fields, s_body, _), (a_fields, a_body, _) = asyncio.run(scenario())
    assert fields[":status"] == "408" and reset in (None, 0), (fields, reset)  # then RST_STREAM(NO_ERROR) at most
    error = json.loads(body)
    assert error["error_code"] == "client_error" and "stalled" in error["error"], error
    assert outcome[0] != "eof" and outcome[1] <= 10, outcome  # the plane saw its call broken off, not a body end
    assert s_fields[":status"] == "200" and json.loads(s_body)["body"] == "".join(f"{i:099d}\n" for i in range(40))
    assert a_fields[":status"] == "200" and json.loads(a_body)["body"] == "ok"


def test_a_trickling_body_gets_408_and_a_connection_with_nothing_else_is_closed(
    short_limits: None, tmp_path: Path
) -> None:
    async def scenario() -> tuple:
        async with Plane() as plane, gateway(tmp_path, plane) as gw:
            client = await Client.open(gw.public_port)
            stream = client.request("/production/sync/sink", 10_000)
            sent = 0
            while client.answer(stream) is None and sent < 200:  # one byte per 20 ms: each within the stall limit
                client.send(stream, b"x")
                sent += 1
                await asyncio.sleep(0.02)
            answer = await client.answer_of(stream)
            outcome = await asyncio.wait_for(asyncio.shield(plane.sink_outcome), WAIT)
            await client.closed()
            client.close()
            return answer, outcome, sent, client.goaway()

    (fields, body, _), outcome, sent, goaway = asyncio.run(scenario())
    assert fields[":status"] == "408" and "slower than 500 bytes/s" in json.loads(body)["error"], body
    assert sent < 200  # refused before the client was done trickling
    assert outcome[0] != "eof", outcome
    assert goaway is not None and goaway.error_code == 0  # GOAWAY(NO_ERROR), then the close


def test_a_body_that_stalls_after_the_answer_began_resets_the_stream(short_limits: None, tmp_path: Path) -> None:
    async def scenario() -> tuple:
        async with Plane() as plane, gateway(tmp_path, plane) as gw:
            client = await Client.open(gw.public_port)
            # The plane answers at once, with events until its writes fail, without reading the body.
            stream = client.request("/production/sync/sse-gone", 1000)
            client.send(stream, b"x" * 10)
            answer = await client.answer_of(stream)
            gone = await asyncio.wait_for(asyncio.shield(plane.gone), WAIT)
            client.close()
            return answer, gone

    (fields, body, reset), gone = asyncio.run(scenario())
    assert fields[":status"] == "200" and body.startswith(b"data: 0\n\n")
    assert reset == INTERNAL_ERROR  # truncated, and looking it: never END_STREAM
    assert gone != "still connected"


def test_waiting_for_a_slow_plane_is_not_a_slow_body(short_limits: None, tmp_path: Path) -> None:
    """The plane does not read for longer than the limit: our withheld window stops the client, and
    that time is not counted against it (as HTTP/1.1's paused reading)."""

    async def scenario() -> tuple:
        async with Plane() as plane, gateway(tmp_path, plane) as gw:
            client = await Client.open(gw.public_port)
            size = 6 << 20
            stream = client.request("/production/sync/sink?stall=1", size)
            sent = 0
            while sent < size:
                window = min(client.conn.local_flow_control_window(stream), client.conn.max_outbound_frame_size)
                if window <= 0:
                    client.changed.clear()
                    await asyncio.wait_for(client.changed.wait(), 2 * WAIT)
                    continue
                chunk = min(window, size - sent, 1 << 16)
                client.send(stream, b"y" * chunk, end=sent + chunk == size)
                sent += chunk
                await asyncio.sleep(0)
            answer = await client.answer_of(stream)
            client.close()
            return answer, plane.stall_ended_by

    (fields, body, _), stall_ended_by = asyncio.run(scenario())
    assert stall_ended_by == "timeout"  # the plane really stopped reading (for longer than BODY_LIMIT)
    assert fields[":status"] == "200" and json.loads(body)["length"] == 6 << 20, body


HEADERS_BLOCK = b"\x82\x86\x84"  # :method GET, :scheme http, :path / (static table, RFC 7541 Appendix A)


def frame_bytes(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def frames(data: bytes) -> list[tuple[int, int | None]]:
    """(type, error code of a GOAWAY, else None) of each frame in `data`."""
    found = []
    while len(data) >= 9:
        length, kind = int.from_bytes(data[:3], "big"), data[3]
        payload, data = data[9 : 9 + length], data[9 + length :]
        found.append((kind, int.from_bytes(payload[4:8], "big") if kind == wire.GOAWAY else None))
    return found


SLOW_HEADS = {
    # the preface itself, a byte at a time
    "preface": (b"", wire.PREFACE),
    # HEADERS without END_HEADERS, then a CONTINUATION trickled a byte at a time
    "continuation": (
        frame_bytes(wire.HEADERS, 0, 1, HEADERS_BLOCK),
        frame_bytes(wire.CONTINUATION, wire.END_HEADERS, 1, b"\x41\x0f" + b"a" * 15),
    ),
    # one HEADERS frame trickled a byte at a time
    "headers frame": (b"", frame_bytes(wire.HEADERS, wire.END_HEADERS | wire.END_STREAM, 1, HEADERS_BLOCK * 10)),
}


@pytest.mark.parametrize("port", ["public", "grpc"])
@pytest.mark.parametrize("case", SLOW_HEADS)
def test_a_header_side_that_never_ends_is_closed_after_the_head_timeout(
    short_limits: None, tmp_path: Path, case: str, port: str
) -> None:
    start, trickled = SLOW_HEADS[case]

    async def scenario() -> tuple:
        async with Plane() as plane, gateway(tmp_path, plane) as gw:
            number = gw.public_port if port == "public" else gw.grpc_port
            assert number is not None
            idle = await Client.open(number)  # a preface and then nothing: idle, not slow
            client = await Client.open(number, raw=True)
            if case != "preface":
                client.writer.write(wire.PREFACE + frame_bytes(wire.SETTINGS, 0, 0, b""))
            client.writer.write(start)
            sent = 0
            for byte in trickled:  # each byte well within any per-read limit; the whole far past the head's
                if client.eof:
                    break
                client.writer.write(bytes([byte]))
                sent += 1
                await asyncio.sleep(0.2)
            await client.closed()
            idle.conn.ping(b"12345678")
            idle.flush()
            await idle.until(lambda: any(isinstance(e, h2.events.PingAckReceived) for e in idle.events), "the ping ACK")
            idle.close()
            client.close()
            return sent, len(trickled), client.received, idle.goaway()

    sent, total, received, idle_goaway = asyncio.run(scenario())
    assert sent < total  # closed while the client was still trickling
    if case == "preface" and port == "public":
        # Not yet HTTP/2: the cleartext port is still telling the h2c preface from an HTTP/1.1 request.
        assert received.startswith(b"HTTP/1.1 408 "), received
    else:
        assert (wire.GOAWAY, 0) in [(kind, code) for kind, code in frames(received)], received
    assert idle_goaway is None  # the idle connection opened at the same time is still served


# -- the decisions, on a frame-layer connection fed bytes (no socket) ---------------------------


def fed(chunks: list[bytes]) -> list[tuple[object | None, int]]:
    """After each chunk: (h2sweep.head_in_progress, h2sweep.arriving_data on stream 1) of a server connection."""

    async def main() -> list[tuple[object | None, int]]:
        conn = H2Connection(H2Server(OpenRecorder()))
        conn.connection_made(FakeTransport())  # type: ignore[arg-type]
        states = []
        for chunk in chunks:
            conn.data_received(chunk)
            states.append((h2sweep.head_in_progress(conn), h2sweep.arriving_data(conn, 1)))
        return states

    return asyncio.run(main())


PREFACE = wire.PREFACE + frame_bytes(wire.SETTINGS, 0, 0, b"")
OPEN_1 = frame_bytes(wire.HEADERS, wire.END_HEADERS, 1, HEADERS_BLOCK)  # stream 1, its body to follow
DATA_1 = frame_bytes(wire.DATA, 0, 1, b"d" * 1000)


def test_a_preface_in_progress_is_a_head_and_a_complete_one_is_not() -> None:
    [(partial, _), (done, _)] = fed([wire.PREFACE[:10], wire.PREFACE[10:] + frame_bytes(wire.SETTINGS, 0, 0, b"")])
    assert partial is not None and done is None


def test_a_header_block_is_the_same_head_until_it_ends_and_a_later_block_is_another() -> None:
    continuation = frame_bytes(wire.CONTINUATION, 0, 1, b"")
    states = fed([
        PREFACE, frame_bytes(wire.HEADERS, 0, 1, HEADERS_BLOCK), continuation, continuation,
        frame_bytes(wire.CONTINUATION, wire.END_HEADERS, 1, b""), frame_bytes(wire.HEADERS, 0, 3, HEADERS_BLOCK),
    ])  # fmt: skip
    heads = [head for head, _ in states]
    assert heads[0] is None and heads[1] is not None and heads[1] is heads[2] is heads[3]
    assert heads[4] is None and heads[5] is not None and heads[5] is not heads[1]
    trickled = frame_bytes(wire.HEADERS, wire.END_HEADERS, 3, HEADERS_BLOCK * 10)
    a, b, c = fed([PREFACE + trickled[:12], trickled[12:13], trickled[13:]])
    assert a[0] is not None and a[0] is b[0] and c[0] is None  # one HEADERS frame arriving a byte at a time


def test_a_data_frame_still_arriving_counts_for_its_stream_only() -> None:
    states = fed([PREFACE + OPEN_1, DATA_1[: 9 + 300], DATA_1[9 + 300 :], frame_bytes(wire.DATA, 0, 3, b"x" * 50)[:30]])
    assert [arriving for _, arriving in states] == [0, 300, 0, 0]  # stream 3's frame is not stream 1's progress
    assert all(head is None for head, _ in states)
