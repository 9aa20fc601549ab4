"""The relay's HTTP/2 client towards planes (gateway/grpc/upstream.py), end to end on 127.0.0.1.

Real grpcio planes show multiplexing, the planes' MAX_CONCURRENT_STREAMS, compressed responses
and a plane shutting down (GOAWAY); a scripted `h2` plane shows what grpcio will not do on
demand: RST_STREAM instead of an answer, and a connection dropped mid-call. Every wait is a
handshake (a barrier the plane waits on, an event), bounded, never a sleep.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
import yaml

from tests.support import EXAMPLE, free_port, running_gateway, write_table
from tests.test_grpc import AUTH, REQUEST_ID, WAIT, GrpcPlane, Lockstep, channel, trailer, unary


class GatherPlane:
    """A grpcio plane whose /t.Gather/Peer call waits until `parties` calls are in it at once, then
    answers with the peer (the gateway's connection) it came on."""

    def __init__(self, parties: int, **options: int) -> None:
        self.barrier = threading.Barrier(parties, timeout=WAIT)
        self.server = grpc.server(futures.ThreadPoolExecutor(parties + 8), options=list(options.items()))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.Gather", {
            "Peer": grpc.unary_unary_rpc_method_handler(self._peer),
        }),))  # fmt: skip
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def _peer(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.barrier.wait()
        return context.peer().encode()


class ScriptedPlane:
    """An HTTP/2 server on `h2` that answers each call as its :path says:

    /t.Script/Reset<code>   RST_STREAM with that error code, no answer
    /t.Script/Drop          response headers and one message, then the TCP connection is closed
    anything else           one message b"ok" and grpc-status 0
    """

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        paths: dict[int, bytes] = {}
        with sock:
            while data := sock.recv(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        paths[event.stream_id] = dict(event.headers)[b":path"]  # type: ignore[arg-type]
                    elif isinstance(event, h2.events.StreamEnded):
                        if not self._answer(conn, event.stream_id, paths.pop(event.stream_id)):  # type: ignore[arg-type]
                            sock.sendall(conn.data_to_send())
                            return  # closes the connection mid-call
                sock.sendall(conn.data_to_send())

    def _answer(self, conn: h2.connection.H2Connection, stream_id: int, path: bytes) -> bool:
        method = path.rpartition(b"/")[2]
        if method.startswith(b"Reset"):
            conn.reset_stream(stream_id, int(method[5:]))
            return True
        conn.send_headers(stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc")])
        conn.send_data(stream_id, b"\x00\x00\x00\x00\x02ok")
        if method == b"Drop":
            return False
        conn.send_headers(stream_id, [(b"grpc-status", b"0")], end_stream=True)
        return True

    def stop(self) -> None:
        self.sock.close()


def gateway_for(tmp_path, address: str):
    """A gateway whose model abc123 (production, plane us-east-1) has its gRPC address at `address`."""
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["planes"]["us-east-1"]["grpc"] = address
    doc["planes"]["eu-west-1"]["grpc"] = f"127.0.0.1:{free_port()}"
    return running_gateway(write_table(tmp_path / "table.yaml", doc), grpc_port=free_port())


def concurrent_calls(ch: grpc.Channel, method: str, n: int) -> list[bytes]:
    call = ch.unary_unary(method)
    pending = [call.future(b"", metadata=AUTH, timeout=WAIT * 2) for _ in range(n)]
    return [f.result() for f in pending]


def test_150_calls_in_flight_share_one_plane_connection(tmp_path) -> None:
    plane = GatherPlane(150)
    try:
        with gateway_for(tmp_path, plane.address) as gw, channel(gw) as ch:
            # Until the plane's SETTINGS arrive a connection takes at most 100 streams (the RFC 9113
            # §5.1.2 recommendation), so a burst that races the first connect may open a second one:
            # one call first, so the plane's limit of 150 is known.
            plane.barrier = threading.Barrier(1, timeout=WAIT)
            first = concurrent_calls(ch, "/t.Gather/Peer", 1)
            plane.barrier = threading.Barrier(150, timeout=WAIT)
            peers = concurrent_calls(ch, "/t.Gather/Peer", 150)
        assert len(peers) == 150 and set(peers) == set(first), set(peers)
    finally:
        plane.server.stop(None)


def test_the_planes_max_concurrent_streams_is_respected_with_more_connections(tmp_path) -> None:
    """The plane allows 10 streams per connection; all 30 calls must be in it at once."""
    plane = GatherPlane(30, **{"grpc.max_concurrent_streams": 10})
    try:
        with gateway_for(tmp_path, plane.address) as gw, channel(gw) as ch:
            peers = concurrent_calls(ch, "/t.Gather/Peer", 30)
        assert len(set(peers)) >= 3
    finally:
        plane.server.stop(None)


def test_compressed_responses_pass_through_unchanged(tmp_path) -> None:
    """The plane gzips its messages; the client, not the gateway, decompresses them."""
    plane = GrpcPlane("gz")
    plane.server.stop(None)
    server = grpc.server(futures.ThreadPoolExecutor(4), compression=grpc.Compression.Gzip)
    server.add_generic_rpc_handlers((plane,))
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    body = b"compressible " * 10_000
    try:
        with gateway_for(tmp_path, address) as gw, channel(gw) as ch:
            assert unary(ch, "Echo")(body, metadata=AUTH, timeout=WAIT) == body
            streamed = ch.stream_stream("/t.Plane/Echo")(iter([body, b"x"]), metadata=AUTH, timeout=WAIT)
            assert list(streamed) == [body, b"x"]
    finally:
        server.stop(None)


def test_a_plane_shutting_down_finishes_its_calls_and_new_calls_get_unavailable(tmp_path) -> None:
    """grpcio's stop(grace) sends GOAWAY: the stream in flight goes on, no new stream goes to that connection."""
    plane = GrpcPlane("leaving")
    with gateway_for(tmp_path, plane.address) as gw, channel(gw) as ch:
        feed = Lockstep()
        replies = ch.stream_stream("/t.Plane/Chat")(iter(feed), metadata=AUTH, timeout=30)
        feed.send(b"before")
        assert next(replies) == b"leaving:before"
        stopped = plane.server.stop(WAIT)  # GOAWAY now; the listener closes; in-flight calls may finish
        feed.send(b"after goaway")
        assert next(replies) == b"leaving:after goaway"
        with pytest.raises(grpc.RpcError) as info:
            unary(ch, "Echo")(b"x", metadata=AUTH, timeout=WAIT)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert REQUEST_ID.match(trailer(info.value, "x-baseten-request-id"))
        feed.close()
        assert list(replies) == [] and replies.code() == grpc.StatusCode.OK
        assert stopped.wait(WAIT)


@pytest.fixture(scope="module")
def scripted(tmp_path_factory) -> Iterator[tuple[ScriptedPlane, object]]:
    plane = ScriptedPlane()
    with gateway_for(tmp_path_factory.mktemp("scripted"), plane.address) as gw:
        yield plane, gw
    plane.stop()


@pytest.mark.parametrize(
    ("rst_code", "status"),
    [(7, grpc.StatusCode.UNAVAILABLE), (8, grpc.StatusCode.CANCELLED), (2, grpc.StatusCode.INTERNAL)],
    ids=["REFUSED_STREAM", "CANCEL", "INTERNAL_ERROR"],
)
def test_a_plane_resetting_the_stream_is_a_grpc_status(scripted, rst_code, status) -> None:
    _, gw = scripted
    with channel(gw) as ch, pytest.raises(grpc.RpcError) as info:
        unary(ch, f"Reset{rst_code}")(b"x", metadata=AUTH, timeout=WAIT)
    assert info.value.code() == status, info.value.details()
    assert "reset the stream" in info.value.details()
    assert REQUEST_ID.match(trailer(info.value, "x-baseten-request-id"))
    with channel(gw) as ch:  # the plane connection goes on
        assert unary(ch, "Fine")(b"x", metadata=AUTH, timeout=WAIT) == b"ok"


def test_a_connection_dropped_mid_call_is_unavailable_and_the_next_call_reconnects(scripted) -> None:
    plane, gw = scripted
    with channel(gw) as ch:
        replies = ch.unary_stream("/t.Script/Drop")(b"x", metadata=AUTH, timeout=WAIT)
        assert next(replies) == b"ok"  # the response had started
        with pytest.raises(grpc.RpcError):
            next(replies)
        assert replies.code() == grpc.StatusCode.UNAVAILABLE
        assert "closed the connection" in replies.details()
        assert REQUEST_ID.match(trailer(replies, "x-baseten-request-id"))
        before = plane.connections
        assert unary(ch, "Fine")(b"x", metadata=AUTH, timeout=WAIT) == b"ok"
        assert plane.connections == before + 1
    status, text = gw.admin("GET", "/metrics")  # type: ignore[attr-defined]
    assert status == 200 and 'kind="broken"' in text
