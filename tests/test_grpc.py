"""The gRPC relay (SPEC §9) end to end: a real gateway process, real grpcio planes and clients on 127.0.0.1.

Planes and clients relay raw bytes (no (de)serializers), as the gateway does. Waits are handshakes:
a lockstep bidirectional stream sends its next message only after the previous answer arrived, and
a plane records a call's end in a `threading.Event` the test waits on (bounded, never a sleep).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml

from tests.support import EXAMPLE, GatewayProcess, free_port, running_gateway, write_table

KEY = "demo-key-acme"
AUTH = (("authorization", f"Api-Key {KEY}"),)
HOST = "model-abc123.grpc.localhost"
WAIT = 10.0  # bound of every handshake
BIG = 64 * 1024 * 1024
OPTIONS = [("grpc.max_send_message_length", BIG), ("grpc.max_receive_message_length", BIG)]
REQUEST_ID = re.compile(r"[0-9a-f]{32}\Z")
# A google.rpc.Status (code 9, message "refused"), as rich error details travel: opaque bytes to the relay.
RICH_STATUS = b"\x08\x09\x12\x07refused"


class GrpcPlane:
    """A grpcio server whose methods are behaviours (any call shape reaches the same handler):

    /t.Plane/Echo     every request message back, unchanged; initial metadata x-plane: <name>
    /t.Plane/Chat     every request message back as b"<name>:" + message (shows which plane answers)
    /t.Plane/Who      one JSON message: the metadata the plane received (-bin values in hex)
    /t.Plane/Count    request b"<n>": n messages b"0".."n-1"
    /t.Plane/Sum      one message: the number of request messages and bytes received
    /t.Plane/Fail     initial metadata, one message, then FAILED_PRECONDITION with details and trailing metadata
    /t.Plane/Refuse   after the first request message: FAILED_PRECONDITION with trailing metadata (trailers-only)
    /t.Plane/Hang     waits for the call to end (deadline or cancel), never answers

    `ended[method]` is set when a call of that method terminates, for any reason. The tests that wait
    on it never end the call themselves (no half-close), so only a cancel, the client's or a deadline's, sets it.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.ended: dict[str, threading.Event] = {}
        self.server = grpc.server(futures.ThreadPoolExecutor(16), options=OPTIONS)
        self.server.add_generic_rpc_handlers((self,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"
        self.server.start()

    def reset(self, method: str) -> None:
        self.ended[method] = threading.Event()

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method.rpartition("/")[2]  # type: ignore[attr-defined]
        handler = getattr(self, f"_{method.lower()}", None)
        if handler is None:
            return None

        def run(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
            self.ended.setdefault(method, threading.Event())
            ended = self.ended[method]
            context.add_callback(ended.set)
            yield from handler(requests, context)

        return grpc.stream_stream_rpc_method_handler(run)

    def _echo(self, requests, context):
        context.send_initial_metadata((("x-plane", self.name),))
        yield from requests

    def _chat(self, requests, context):
        for message in requests:
            yield self.name.encode() + b":" + message

    def _who(self, requests, context):
        for _ in requests:
            pass
        seen = [(k, v.hex() if isinstance(v, bytes) else v) for k, v in context.invocation_metadata()]
        yield json.dumps({"plane": self.name, "metadata": seen}).encode()

    def _count(self, requests, context):
        for request in requests:
            for i in range(int(request)):
                yield str(i).encode()

    def _sum(self, requests, context):
        messages = [len(m) for m in requests]
        yield json.dumps({"messages": len(messages), "bytes": sum(messages)}).encode()

    def _fail(self, requests, context):
        context.send_initial_metadata((("x-init", "early"), ("x-init-bin", b"\x00\xff")))
        yield b"partial"
        context.set_trailing_metadata((("x-trail", "late"), ("x-trail-bin", b"\x01\x02\x03")))
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "needs 100% of the ünïcode\nplease")

    def _refuse(self, requests, context):
        next(requests, None)  # the upload has begun
        context.set_trailing_metadata((("x-trail", "refused"), ("grpc-status-details-bin", RICH_STATUS)))
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "refused after the first message")
        yield b""  # pragma: no cover - abort raises

    def _hang(self, requests, context):
        done = threading.Event()
        context.add_callback(done.set)
        done.wait(30)
        return iter(())

    def stop(self) -> None:
        self.server.stop(None)


class Lockstep:
    """A request iterator the test feeds one message at a time."""

    def __init__(self) -> None:
        self.items: queue.Queue[bytes | None] = queue.Queue()

    def __iter__(self) -> Iterator[bytes]:
        while (item := self.items.get(timeout=WAIT)) is not None:
            yield item

    def send(self, message: bytes) -> None:
        self.items.put(message)

    def close(self) -> None:
        self.items.put(None)


def table_doc(us: GrpcPlane, eu: GrpcPlane, dead: str) -> dict:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["planes"]["us-east-1"]["grpc"] = us.address
    doc["planes"]["eu-west-1"]["grpc"] = eu.address
    # A plane whose gRPC address has nothing listening, for the unavailable case.
    doc["planes"]["us-dead"] = {"region": "us", "url": "http://127.0.0.1:9", "grpc": dead}
    doc["models"]["abc123"]["deployments"]["vdead"] = {"plane": "us-dead"}
    return doc


@pytest.fixture(scope="module")
def planes() -> Iterator[tuple[GrpcPlane, GrpcPlane]]:
    us, eu = GrpcPlane("us-east-1"), GrpcPlane("eu-west-1")
    yield us, eu
    us.stop()
    eu.stop()


@pytest.fixture(scope="module")
def gateway(planes, tmp_path_factory) -> Iterator[GatewayProcess]:
    table = write_table(tmp_path_factory.mktemp("grpc") / "table.yaml", table_doc(*planes, f"127.0.0.1:{free_port()}"))
    with running_gateway(table, grpc_port=free_port()) as gw:
        yield gw


def channel(gw: GatewayProcess, authority: str = HOST) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{gw.grpc_port}", options=[*OPTIONS, ("grpc.default_authority", authority)])


def unary(ch: grpc.Channel, method: str):
    return ch.unary_unary(f"/t.Plane/{method}")


def trailer(call_or_error, key: str) -> str | bytes | None:
    return dict(call_or_error.trailing_metadata() or ()).get(key)


# -- the four call shapes --------------------------------------------------------------------


def test_unary(gateway) -> None:
    with channel(gateway) as ch:
        reply, call = unary(ch, "Echo").with_call(b"hello", metadata=AUTH, timeout=WAIT)
    assert reply == b"hello"
    assert call.code() == grpc.StatusCode.OK
    assert ("x-plane", "us-east-1") in tuple(call.initial_metadata())
    assert REQUEST_ID.match(trailer(call, "x-baseten-request-id"))


def test_server_streaming(gateway) -> None:
    with channel(gateway) as ch:
        replies = list(ch.unary_stream("/t.Plane/Count")(b"50", metadata=AUTH, timeout=WAIT))
    assert replies == [str(i).encode() for i in range(50)]


def test_client_streaming(gateway) -> None:
    with channel(gateway) as ch:
        reply, call = ch.stream_unary("/t.Plane/Sum").with_call(
            iter([b"x" * i for i in range(100)]), metadata=AUTH, timeout=WAIT
        )
    assert json.loads(reply) == {"messages": 100, "bytes": sum(range(100))}
    assert REQUEST_ID.match(trailer(call, "x-baseten-request-id"))


def test_bidirectional_streaming_relays_each_message_as_it_comes(gateway) -> None:
    """Lockstep: message i+1 is sent only once reply i arrived, so nothing may wait for the stream's end."""
    feed = Lockstep()
    with channel(gateway) as ch:
        replies = ch.stream_stream("/t.Plane/Chat")(iter(feed), metadata=AUTH, timeout=WAIT)
        for i in range(20):
            feed.send(b"m%d" % i)
            assert next(replies) == b"us-east-1:m%d" % i
        feed.close()
        assert list(replies) == []
        assert replies.code() == grpc.StatusCode.OK
        assert REQUEST_ID.match(trailer(replies, "x-baseten-request-id"))


def test_a_50_mib_message_each_way(gateway) -> None:
    big = os.urandom(50 * 1024 * 1024)
    with channel(gateway) as ch:
        reply = unary(ch, "Echo")(big, metadata=AUTH, timeout=60)
    assert hashlib.sha256(reply).digest() == hashlib.sha256(big).digest()


def test_a_request_message_over_100_mib_is_refused_from_its_prefix(gateway) -> None:
    options = [("grpc.max_send_message_length", 128 << 20), ("grpc.default_authority", HOST)]
    with grpc.insecure_channel(f"127.0.0.1:{gateway.grpc_port}", options=options) as ch:
        with pytest.raises(grpc.RpcError) as info:
            unary(ch, "Echo")(bytes((100 << 20) + 1), metadata=AUTH, timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit" in info.value.details() and REQUEST_ID.match(trailer(info.value, "x-baseten-request-id"))
        assert unary(ch, "Echo")(b"next", metadata=AUTH, timeout=WAIT) == b"next"  # the connection goes on


@pytest.mark.parametrize("compression", [grpc.Compression.Gzip, grpc.Compression.Deflate], ids=["gzip", "deflate"])
def test_compressed_requests_are_relayed(gateway, compression) -> None:
    body = b"compressible " * 10_000
    with channel(gateway) as ch:
        assert unary(ch, "Echo")(body, metadata=AUTH, timeout=WAIT, compression=compression) == body
        streamed = ch.stream_stream("/t.Plane/Echo")(iter([body, b"x"]), metadata=AUTH, compression=compression)
        assert list(streamed) == [body, b"x"]


# -- metadata, status, trailers ---------------------------------------------------------------


def test_request_metadata_reaches_the_plane_with_the_gateway_identity_and_no_credentials(gateway) -> None:
    metadata = (
        ("baseten-authorization", f"Bearer {KEY}"),
        ("x-custom", "kept as sent"),
        ("x-blob-bin", b"\x00\xffbinary"),
        ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        ("x-baseten-model-id", "spoofed"),
        ("x-baseten-request-id", "spoofed"),
        ("x-baseten-deployment-id", "spoofed"),
    )
    with channel(gateway) as ch:
        reply, call = unary(ch, "Who").with_call(b"", metadata=metadata, timeout=WAIT)
    seen = json.loads(reply)["metadata"]
    keys = [k for k, _ in seen]
    values = dict(seen)
    assert "authorization" not in keys and "baseten-authorization" not in keys
    assert values["x-custom"] == "kept as sent"
    assert values["x-blob-bin"] == b"\x00\xffbinary".hex()
    assert values["traceparent"] == metadata[3][1]
    assert values["x-baseten-model-id"] == "abc123"
    assert values["x-baseten-environment"] == "production"
    assert values["x-baseten-deployment-id"] == "v1"
    assert keys.count("x-baseten-request-id") == 1 and REQUEST_ID.match(values["x-baseten-request-id"])
    assert values["x-baseten-request-id"] == trailer(call, "x-baseten-request-id")
    assert values["x-forwarded-host"] == HOST


def test_deployment_and_environment_metadata_pick_the_target(gateway) -> None:
    with channel(gateway) as ch:
        by_env = json.loads(unary(ch, "Who")(b"", metadata=AUTH + (("x-baseten-environment", "prod-eu"),)))
        by_dep = json.loads(unary(ch, "Who")(b"", metadata=AUTH + (("x-baseten-deployment", "v3"),)))
    assert by_env["plane"] == "eu-west-1" and dict(by_env["metadata"])["x-baseten-environment"] == "prod-eu"
    seen = dict(by_dep["metadata"])
    assert by_dep["plane"] == "eu-west-1" and seen["x-baseten-deployment-id"] == "v3"
    assert seen["x-baseten-environment"] == "" and "x-baseten-deployment" not in seen


def test_regional_host_reaches_its_region(gateway) -> None:
    with channel(gateway, "model-abc123-prod-us.grpc.localhost") as ch:
        who = json.loads(unary(ch, "Who")(b"", metadata=AUTH, timeout=WAIT))
    assert who["plane"] == "us-east-1" and dict(who["metadata"])["x-baseten-environment"] == "prod-us"


def test_plane_status_details_and_metadata_pass_through(gateway) -> None:
    with channel(gateway) as ch:
        replies = ch.unary_stream("/t.Plane/Fail")(b"", metadata=AUTH, timeout=WAIT)
        assert next(replies) == b"partial"
        with pytest.raises(grpc.RpcError):
            next(replies)
    assert replies.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert replies.details() == "needs 100% of the ünïcode\nplease"
    assert ("x-init", "early") in replies.initial_metadata()
    assert ("x-init-bin", b"\x00\xff") in replies.initial_metadata()
    assert trailer(replies, "x-trail") == "late" and trailer(replies, "x-trail-bin") == b"\x01\x02\x03"
    assert REQUEST_ID.match(trailer(replies, "x-baseten-request-id"))


@pytest.mark.parametrize("messages", [1, 300])
def test_a_plane_refusing_a_call_mid_upload_keeps_its_status(gateway, messages) -> None:
    """The plane answers while the client is still sending: its status, not a relay error, reaches the client."""
    with channel(gateway) as ch, pytest.raises(grpc.RpcError) as info:
        ch.stream_unary("/t.Plane/Refuse")(iter([b"u" * 65536] * messages), metadata=AUTH, timeout=WAIT)
    assert (info.value.code(), info.value.details()) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "refused after the first message",
    )
    assert trailer(info.value, "x-trail") == "refused"
    assert trailer(info.value, "grpc-status-details-bin") == RICH_STATUS
    assert REQUEST_ID.match(trailer(info.value, "x-baseten-request-id"))


# -- gateway errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("authority", "metadata", "code", "message"),
    [
        (HOST, (), grpc.StatusCode.UNAUTHENTICATED, "missing API key"),
        (HOST, (("authorization", "Api-Key wrong"),), grpc.StatusCode.UNAUTHENTICATED, "invalid API key"),
        ("model-xyz789.grpc.localhost", AUTH, grpc.StatusCode.NOT_FOUND, "not found"),  # another team's model
        (HOST, (("authorization", "Api-Key demo-key-globex"),), grpc.StatusCode.NOT_FOUND, "not found"),
        (HOST, (("authorization", "Api-Key demo-key-staging"),), grpc.StatusCode.PERMISSION_DENIED, "production"),
        ("model-abc123-prod-us.grpc.localhost", AUTH + (("x-baseten-environment", "staging"),),
         grpc.StatusCode.INVALID_ARGUMENT, "take the environment from the hostname"),
        ("model-abc123-prod-eu.grpc.localhost", AUTH, grpc.StatusCode.UNAVAILABLE, "does not serve region 'eu'"),
        ("model-abc123-old.grpc.localhost", AUTH, grpc.StatusCode.NOT_FOUND, "no regional endpoint"),
        ("model-abc123.localhost", AUTH, grpc.StatusCode.NOT_FOUND, "not a gRPC host"),
        (HOST, AUTH + (("x-baseten-environment", "nope"),), grpc.StatusCode.NOT_FOUND, "'nope'"),
        (HOST, AUTH + (("x-baseten-deployment", "vdead"),), grpc.StatusCode.UNAVAILABLE, "could not connect"),
    ],
    ids=["no-key", "unknown-key", "other-teams-model", "other-teams-key", "key-scope", "env-metadata-on-regional-host",
         "421-region", "unmapped-regional-env", "http-host", "unknown-env", "plane-unreachable"],
)  # fmt: skip
def test_gateway_errors_map_to_grpc_status(gateway, authority, metadata, code, message) -> None:
    with channel(gateway, authority) as ch, pytest.raises(grpc.RpcError) as info:
        unary(ch, "Echo")(b"x", metadata=metadata, timeout=WAIT)
    assert info.value.code() == code, info.value.details()
    assert message in info.value.details()
    assert REQUEST_ID.match(trailer(info.value, "x-baseten-request-id"))
    assert KEY not in info.value.details()


def test_deadline_expiry_is_deadline_exceeded_and_the_plane_sees_the_cancel(gateway, planes) -> None:
    us, _ = planes
    us.reset("Hang")
    with channel(gateway) as ch, pytest.raises(grpc.RpcError) as info:
        unary(ch, "Hang")(b"", metadata=AUTH, timeout=0.5)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert us.ended["Hang"].wait(WAIT), "the plane's call must end with the deadline"


def test_client_cancelling_mid_stream_cancels_the_plane_call(gateway, planes) -> None:
    us, _ = planes
    us.reset("Chat")
    feed = Lockstep()
    with channel(gateway) as ch:
        replies = ch.stream_stream("/t.Plane/Chat")(iter(feed), metadata=AUTH, timeout=30)
        feed.send(b"one")
        assert next(replies) == b"us-east-1:one"
        replies.cancel()
        assert us.ended["Chat"].wait(WAIT), "the plane's call must end when the client cancels"
        assert replies.code() == grpc.StatusCode.CANCELLED


def test_an_early_answer_to_a_call_still_uploading_does_not_break_the_connection(gateway) -> None:
    """Refused while its 8 MiB request is still arriving; the other calls on the same connection go on."""
    feed = Lockstep()
    with channel(gateway) as ch:
        replies = ch.stream_stream("/t.Plane/Chat")(iter(feed), metadata=AUTH, timeout=30)
        feed.send(b"before")
        assert next(replies) == b"us-east-1:before"
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as info:
                unary(ch, "Echo")(os.urandom(8 * 1024 * 1024), timeout=WAIT)  # no key
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        feed.send(b"after")
        assert next(replies) == b"us-east-1:after"
        feed.close()
        assert list(replies) == [] and replies.code() == grpc.StatusCode.OK
        assert unary(ch, "Echo")(b"still fine", metadata=AUTH, timeout=WAIT) == b"still fine"


def test_a_stalled_upload_holds_up_no_other_call_and_its_cancel_still_reaches_the_plane(gateway, planes) -> None:
    """The plane reads nothing of a 16 MiB upload: flow control stops that stream only; the others go on."""
    us, _ = planes
    us.reset("Hang")
    with channel(gateway) as ch:
        upload = ch.stream_unary("/t.Plane/Hang").future(iter([b"s" * (256 * 1024)] * 64), metadata=AUTH, timeout=30)
        for i in range(5):
            assert unary(ch, "Echo")(b"%d" % i, metadata=AUTH, timeout=WAIT) == b"%d" % i
        assert not upload.done()
        upload.cancel()  # the gateway is blocked writing to the plane: the cancel must still get through
        assert us.ended["Hang"].wait(WAIT), "the plane's call must end when the client cancels"


def test_metrics_count_grpc_calls_by_status_name(gateway) -> None:
    with channel(gateway) as ch:
        unary(ch, "Echo")(b"x", metadata=AUTH, timeout=WAIT)
        with pytest.raises(grpc.RpcError):
            unary(ch, "Echo")(b"x", timeout=WAIT)
        with pytest.raises(grpc.RpcError):
            unary(ch, "Echo")(b"x", metadata=AUTH + (("x-baseten-deployment", "vdead"),), timeout=WAIT)
    status, text = gateway.admin("GET", "/metrics")
    assert status == 200
    route = 'model="abc123",environment="production",deployment="v1",region="us",protocol="grpc"'
    assert re.search(rf"gateway_requests_total\{{{route},code=\"OK\"\}} [1-9]", text)
    unrouted = 'model="",environment="",deployment="",region="",protocol="grpc"'
    assert re.search(rf"gateway_requests_total\{{{unrouted},code=\"UNAUTHENTICATED\"\}} [1-9]", text)
    assert re.search(r'gateway_upstream_errors_total\{[^}]*deployment="vdead"[^}]*kind="connect"\} [1-9]', text)
    assert f"gateway_inflight_requests{{{route}}} 0" in text
    assert f"gateway_request_duration_seconds_count{{{route}}}" in text


# -- reloads, drain, TLS ----------------------------------------------------------------------


def test_a_reload_never_cuts_an_open_stream(planes, tmp_path) -> None:
    us, eu = planes
    doc = table_doc(us, eu, f"127.0.0.1:{free_port()}")
    table = write_table(tmp_path / "table.yaml", doc)
    with running_gateway(table, grpc_port=free_port()) as gw, channel(gw) as ch:
        feed = Lockstep()
        replies = ch.stream_stream("/t.Plane/Chat")(iter(feed), metadata=AUTH, timeout=30)
        feed.send(b"a")
        assert next(replies) == b"us-east-1:a"
        doc["planes"]["us-east-1"]["grpc"] = eu.address  # the same plane name now points elsewhere
        write_table(table, doc)
        status, body = gw.admin("POST", "/v1/routing/reload")
        assert status == 200 and body["changed"], body
        assert unary(ch, "Chat")(b"new", metadata=AUTH, timeout=WAIT) == b"eu-west-1:new"
        for message in (b"b", b"c"):
            feed.send(message)
            assert next(replies) == b"us-east-1:" + message  # the old stream stays on the old plane
        feed.close()
        assert list(replies) == [] and replies.code() == grpc.StatusCode.OK


def test_sigterm_drains_grpc_calls_in_flight(planes, tmp_path) -> None:
    table = write_table(tmp_path / "table.yaml", table_doc(*planes, f"127.0.0.1:{free_port()}"))
    gw = GatewayProcess(table, grpc_port=free_port()).start()
    try:
        with channel(gw) as ch:
            feed = Lockstep()
            replies = ch.stream_stream("/t.Plane/Chat")(iter(feed), metadata=AUTH, timeout=30)
            feed.send(b"before")
            assert next(replies) == b"us-east-1:before"
            gw.signal(signal.SIGTERM)
            wait_until_not_ready(gw)
            with channel(gw) as fresh, pytest.raises(grpc.RpcError) as info:
                unary(fresh, "Echo")(b"x", metadata=AUTH, timeout=WAIT)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # the listener is closed
            feed.send(b"during drain")
            assert next(replies) == b"us-east-1:during drain"
            feed.close()
            assert list(replies) == [] and replies.code() == grpc.StatusCode.OK
        assert gw.proc is not None and gw.proc.wait(WAIT) == 0
    finally:
        gw.stop()


def wait_until_not_ready(gw: GatewayProcess) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(gw.admin_url + "/readyz", timeout=1).close()
        except urllib.error.HTTPError as e:
            if e.code == 503:
                return
        time.sleep(0.02)
    raise AssertionError("the gateway did not start draining")


def test_grpc_over_tls(planes, tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("grpc.localhost", "*.grpc.localhost")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    table = write_table(tmp_path / "table.yaml", table_doc(*planes, f"127.0.0.1:{free_port()}"))
    tls = ("--grpc-tls-cert", str(cert_file), "--grpc-tls-key", str(key_file))
    with running_gateway(table, *tls, grpc_port=free_port()) as gw:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
        options = [("grpc.ssl_target_name_override", HOST), ("grpc.default_authority", HOST)]
        with grpc.secure_channel(f"127.0.0.1:{gw.grpc_port}", credentials, options=options) as ch:
            reply, call = unary(ch, "Echo").with_call(b"over tls", metadata=AUTH, timeout=WAIT)
            assert reply == b"over tls" and call.code() == grpc.StatusCode.OK
            who = json.loads(unary(ch, "Who")(b"", metadata=AUTH, timeout=WAIT))
            assert dict(who["metadata"])["x-forwarded-proto"] == "https"
        with grpc.insecure_channel(f"127.0.0.1:{gw.grpc_port}", options=[("grpc.default_authority", HOST)]) as plain:
            with pytest.raises(grpc.RpcError) as info:
                unary(plain, "Echo")(b"x", metadata=AUTH, timeout=WAIT)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
