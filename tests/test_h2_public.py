"""HTTP/2 on the public listener (issue 13): real clients over loopback against a real gateway process.

One TLS port serves HTTP/1.1, HTTP/2 (ALPN) and gRPC; the cleartext port takes h2c with prior
knowledge and answers an `Upgrade: h2c` offer in HTTP/1.1. The planes are the suite's aiohttp
`Plane` (in a thread of its own, so that subprocess clients can be used) and grpcio `GrpcPlane`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import signal
import socket
import ssl
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import httpx
import httpx2
import openai
import pytest
import trustme
import yaml
from aiohttp import web
from baseten_performance_client import PerformanceClient

from gateway.http.server import H2_PREFACE
from tests.dataplane import configure
from tests.planes import Plane
from tests.support import DEMO_KEY, GatewayProcess, example_doc, running_gateway, wait_for, write_table
from tests.test_grpc import AUTH as GRPC_AUTH
from tests.test_grpc import HOST as GRPC_HOST
from tests.test_grpc import GrpcPlane, unary, wait_until_not_ready

STD = "model-abc123.api.example.com"
KEY = {"Authorization": f"Api-Key {DEMO_KEY}"}
WAIT = 10.0
REQUEST_ID = re.compile(r"[0-9a-f]{32}\Z")


class OpenAIPlane(Plane):
    """The suite's Plane, plus the OpenAI-compatible answers the SDK clients parse."""

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/v1/chat/completions":
            return await self.chat(request)
        if request.path == "/v1/embeddings":
            doc = await request.json()
            data = [{"object": "embedding", "index": i, "embedding": [float(i), 0.5]} for i in range(len(doc["input"]))]
            usage = {"prompt_tokens": 1, "total_tokens": 1}
            return web.json_response({"object": "list", "data": data, "model": doc["model"], "usage": usage})
        return await super().dispatch(request)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        doc = await request.json()
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        words = doc["messages"][-1]["content"].split()
        for i, word in enumerate(words):
            chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": doc["model"],
                     "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}  # fmt: skip
            await resp.write(b"data: %s\n\n" % json.dumps(chunk).encode())
            if i + 1 < len(words):  # the next word only once the client has the previous one (streamed, not buffered)
                gate = self.gate("chat", len(words))[i]
                await asyncio.wait_for(gate.wait(), WAIT)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


class PlaneThread:
    """A Plane in an event loop of its own thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.plane: OpenAIPlane = self.run(self._start())

    async def _start(self) -> OpenAIPlane:
        return await OpenAIPlane().start()

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT)

    def open_gate(self, name: str, n: int, i: int) -> None:
        self.loop.call_soon_threadsafe(lambda: self.plane.gate(name, n)[i].set())

    def stop(self) -> None:
        self.run(self.plane.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        self.loop.close()


@pytest.fixture(scope="module")
def planes() -> Iterator[tuple[PlaneThread, GrpcPlane]]:
    http, grpc_plane = PlaneThread(), GrpcPlane("us-east-1")
    yield http, grpc_plane
    http.stop()
    grpc_plane.stop()


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> dict:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "*.api.example.com", "*.grpc.localhost")
    folder = tmp_path_factory.mktemp("h2tls")
    files = {name: folder / f"{name}.pem" for name in ("ca", "cert", "key")}
    ca.cert_pem.write_to_path(str(files["ca"]))
    cert.private_key_and_cert_chain_pem.write_to_path(str(files["cert"]))
    cert.private_key_pem.write_to_path(str(files["key"]))
    return files


def table(planes: tuple[PlaneThread, GrpcPlane], folder: Path) -> Path:
    http, grpc_plane = planes
    doc = example_doc(http.plane.url, http.plane.url)
    for plane in doc["planes"].values():
        plane["grpc"] = grpc_plane.address
    return write_table(folder / "table.yaml", doc)


@pytest.fixture(scope="module")
def tls_gw(planes, tls, tmp_path_factory) -> Iterator[GatewayProcess]:
    config = table(planes, tmp_path_factory.mktemp("h2tlsgw"))
    with running_gateway(config, "--tls-cert", str(tls["cert"]), "--tls-key", str(tls["key"])) as gw:
        yield gw


@pytest.fixture(scope="module")
def h2c_gw(planes, tmp_path_factory) -> Iterator[GatewayProcess]:
    with running_gateway(table(planes, tmp_path_factory.mktemp("h2cgw"))) as gw:
        yield gw


def curl(*args: str) -> tuple[str, dict[str, str], str]:
    """curl's answer: the HTTP version it used, the response headers and the body."""
    out = subprocess.run(
        ["curl", "-sS", "--max-time", str(WAIT), "-D", "-", "-w", "\n%{http_version}", *args],
        capture_output=True, text=True, timeout=2 * WAIT, check=True,
    ).stdout  # fmt: skip
    head, _, rest = out.partition("\n\n")
    body, _, version = rest.rpartition("\n")
    headers = dict(line.lower().split(": ", 1) for line in head.split("\n")[1:])
    return version, headers, body


def curl_predict(gw: GatewayProcess, *args: str, scheme: str = "http") -> tuple[str, dict[str, str], dict]:
    url = f"{scheme}://{STD}:{gw.port}/production/predict"
    version, headers, body = curl(
        "--resolve", f"{STD}:{gw.port}:127.0.0.1", "-H", f"Authorization: {KEY['Authorization']}", "-d", "hello",
        *args, url,
    )  # fmt: skip
    return version, headers, json.loads(body)


def test_curl_http2_over_tls_negotiates_h2_by_alpn(tls_gw, tls) -> None:
    version, headers, echo = curl_predict(tls_gw, "--http2", "--cacert", str(tls["ca"]), scheme="https")
    assert version == "2"
    assert echo["method"] == "POST" and echo["path"] == "/predict" and echo["body"] == "hello"
    seen = {k.lower(): v for k, v in echo["headers"]}
    assert seen["x-forwarded-proto"] == "https" and seen["x-forwarded-host"] == f"{STD}:{tls_gw.port}"
    assert seen["x-baseten-model-id"] == "abc123" and "authorization" not in seen
    assert REQUEST_ID.match(headers["x-baseten-request-id"]) and headers["x-baseten-deployment-id"] == "v1"


def test_curl_http11_over_tls_still_works(tls_gw, tls) -> None:
    version, _, echo = curl_predict(tls_gw, "--http1.1", "--cacert", str(tls["ca"]), scheme="https")
    assert version == "1.1" and echo["body"] == "hello"


def test_curl_prior_knowledge_h2c_on_the_cleartext_port(h2c_gw) -> None:
    version, headers, echo = curl_predict(h2c_gw, "--http2-prior-knowledge")
    assert version == "2" and echo["path"] == "/predict" and echo["body"] == "hello"
    assert {k.lower(): v for k, v in echo["headers"]}["x-forwarded-proto"] == "http"
    assert REQUEST_ID.match(headers["x-baseten-request-id"])


def test_an_h2c_upgrade_offer_is_answered_in_http11(h2c_gw, planes) -> None:
    url = f"http://{STD}:{h2c_gw.port}/production/sync/v1/models"
    version, headers, body = curl(
        "--http2", "--resolve", f"{STD}:{h2c_gw.port}:127.0.0.1", "-H", f"Authorization: {KEY['Authorization']}", url
    )
    echo = json.loads(body)
    assert version == "1.1" and echo["path"] == "/v1/models"
    seen = {k.lower() for k, _ in echo["headers"]}
    assert "upgrade" not in seen and "http2-settings" not in seen  # the offer is the gateway's, not the plane's


def test_an_h2c_upgrade_offer_with_a_body_and_a_pipelined_request(h2c_gw) -> None:
    async def scenario() -> list[bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", h2c_gw.port)
        head = (f"POST /production/predict HTTP/1.1\r\nHost: {STD}\r\nAuthorization: {KEY['Authorization']}\r\n"
                "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n")  # fmt: skip
        second = f"POST /production/predict HTTP/1.1\r\nHost: {STD}\r\nAuthorization: {KEY['Authorization']}\r\n"
        writer.write((head + "Content-Length: 5\r\n\r\nfirst" + second + "Content-Length: 6\r\n\r\nsecond").encode())
        bodies = []
        for _ in range(2):
            status_and_head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
            length = int(re.search(rb"content-length: (\d+)", status_and_head, re.I).group(1))  # type: ignore[union-attr]
            bodies.append(await asyncio.wait_for(reader.readexactly(length), WAIT))
            assert status_and_head.startswith(b"HTTP/1.1 200 "), status_and_head + bodies[-1]
        writer.close()
        return bodies

    first, second = (json.loads(b) for b in asyncio.run(scenario()))
    assert (first["body"], second["body"]) == ("first", "second")


def ssl_context(tls: dict) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tls["ca"]))


def test_httpx_http2_predict_and_sse_streamed_as_it_arrives(tls_gw, tls, planes) -> None:
    http = planes[0]
    n = 3
    with httpx.Client(http2=True, verify=ssl_context(tls), timeout=WAIT) as client:
        base = f"https://127.0.0.1:{tls_gw.port}"
        resp = client.post(base + "/production/predict", content=b"x" * 100_000, headers={"host": STD, **KEY})
        assert resp.http_version == "HTTP/2" and resp.status_code == 200
        assert resp.json()["body"] == "x" * 100_000
        url = base + f"/production/sync/sse?n={n}"
        with client.stream("GET", url, headers={"host": STD, **KEY}) as stream:
            assert stream.http_version == "HTTP/2"
            assert stream.headers["content-type"] == "text/event-stream"
            events = []
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    http.open_gate("sse", n, len(events) - 1)  # the plane writes event i+1 only now
        assert events == ["0", "1", "2"]


def test_httpx_http2_errors_are_the_gateways_json_bodies(tls_gw, tls) -> None:
    with httpx.Client(http2=True, verify=ssl_context(tls), timeout=WAIT) as client:
        base = f"https://127.0.0.1:{tls_gw.port}"
        missing = client.post(base + "/production/predict", content=b"{}", headers={"host": STD})
        unknown = client.post(base + "/production/predict", content=b"{}", headers={"host": "nope.example.org", **KEY})
        # (a declared body over the limit: httpx recomputes Content-Length; the raw h2 test below sends one)
    assert missing.http_version == "HTTP/2" and missing.status_code == 401
    assert missing.json()["error_code"] == "unauthorized", missing.text
    assert REQUEST_ID.match(missing.headers["x-baseten-request-id"])
    assert unknown.http_version == "HTTP/2" and unknown.status_code == 404, unknown.text
    assert unknown.json()["error_code"] == "model_does_not_exist", unknown.text


def test_openai_sdk_streams_chat_over_http2(tls_gw, tls, planes) -> None:
    http = planes[0]
    words = ["one", "two", "three"]
    with httpx2.Client(http2=True, verify=ssl_context(tls), headers={"host": STD}, timeout=WAIT) as http_client:
        client = openai.OpenAI(
            base_url=f"https://127.0.0.1:{tls_gw.port}/production/sync/v1", api_key="unused",
            default_headers={"Authorization": KEY["Authorization"]}, http_client=http_client, max_retries=0,
        )  # fmt: skip
        got = []
        with client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": " ".join(words)}], stream=True
        ) as stream:
            assert stream.response.http_version == "HTTP/2"
            for chunk in stream:
                got.append(chunk.choices[0].delta.content)
                http.open_gate("chat", len(words), len(got) - 1)
    assert got == words


def test_grpc_through_the_public_tls_port(tls_gw, tls) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=tls["ca"].read_bytes())
    options = [("grpc.ssl_target_name_override", GRPC_HOST), ("grpc.default_authority", GRPC_HOST)]
    with grpc.secure_channel(f"127.0.0.1:{tls_gw.port}", credentials, options=options) as ch:
        assert unary(ch, "Echo")(b"over :443", metadata=GRPC_AUTH, timeout=WAIT) == b"over :443"
        with pytest.raises(grpc.RpcError) as info:
            unary(ch, "Echo")(b"no key", timeout=WAIT)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_grpc_h2c_on_the_public_cleartext_port(h2c_gw) -> None:
    options = [("grpc.default_authority", GRPC_HOST)]
    with grpc.insecure_channel(f"127.0.0.1:{h2c_gw.port}", options=options) as ch:
        assert unary(ch, "Echo")(b"h2c", metadata=GRPC_AUTH, timeout=WAIT) == b"h2c"


def test_h2load_bounded_run_has_no_errors(h2c_gw, tmp_path) -> None:
    (tmp_path / "body.json").write_bytes(b'{"prompt": "h2load"}')
    out = subprocess.run(
        ["h2load", "-n", "2000", "-c", "4", "-m", "8", "-H", f"authorization: {KEY['Authorization']}",
         "-H", f":authority: {STD}", "-d", str(tmp_path / "body.json"), f"http://127.0.0.1:{h2c_gw.port}/production/predict"],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    requests = re.search(
        r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out
    )
    statuses = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    assert requests is not None and statuses is not None, out
    assert requests.groups() == ("2000", "2000", "2000", "0", "0"), out
    assert statuses.group(1) == "2000", out


class Relay:
    """A TCP relay in front of the gateway that keeps the first bytes of each connection (the wire's
    own word on the protocol a client chose)."""

    def __init__(self, thread: PlaneThread, port: int) -> None:
        self.thread = thread
        self.target = port
        self.openings: list[bytes] = []
        self.server = thread.run(self._start())
        self.port = self.server.sockets[0].getsockname()[1]

    async def _start(self) -> asyncio.Server:
        return await asyncio.start_server(self._relay, "127.0.0.1", 0)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        first = await reader.read(65536)
        self.openings.append(first[:24])
        up_writer.write(first)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

    def close(self) -> None:
        self.server.close()
        self.thread.run(self.server.wait_closed())


def test_baseten_performance_client_http_version_2(h2c_gw, planes) -> None:
    relay = Relay(planes[0], h2c_gw.port)
    try:
        # The client reaches the gateway as its proxy: absolute-form targets route by their host (RFC 9112 §3.2.2).
        client = PerformanceClient(
            base_url=f"http://{STD}/production/sync", api_key=DEMO_KEY, http_version=2,
            proxy=f"http://127.0.0.1:{relay.port}",
        )  # fmt: skip
        answer = client.embed(input=["a", "b", "c"], model="m")
    finally:
        relay.close()
    assert [d.embedding for d in answer.data] == [[0.0, 0.5], [1.0, 0.5], [2.0, 0.5]]
    assert relay.openings and all(first == H2_PREFACE for first in relay.openings), relay.openings
    assert REQUEST_ID.match(answer.response_headers[0]["x-baseten-request-id"])


class RawH2:
    """A client of its own on the `h2` library, for what real clients never send (or never show)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        config = h2.config.H2Configuration(client_side=True, validate_inbound_headers=False, header_encoding=None)
        self.conn = h2.connection.H2Connection(config)
        self.conn.initiate_connection()
        self.pending: list = []
        self.flush()

    def flush(self) -> None:
        self.sock.sendall(self.conn.data_to_send())

    def request(self, path: str, headers: list, end: bool = True) -> int:
        stream = self.conn.get_next_available_stream_id()
        fields = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", STD),
                  ("authorization", KEY["Authorization"]), *headers]  # fmt: skip
        self.conn.send_headers(stream, fields, end_stream=end)
        self.flush()
        return stream

    def events(self) -> Iterator:
        """The connection's events, in order; those not taken by one wait are left for the next."""
        while True:
            while self.pending:
                yield self.pending.pop(0)
            data = self.sock.recv(65536)
            if not data:
                return
            self.pending += self.conn.receive_data(data)
            self.flush()

    def until_end(
        self, stream: int, stop_after_data: bool = False, stop_after_head: bool = False
    ) -> tuple[dict, bytes, int | None]:
        """The response's fields, its body and the RST_STREAM code if the stream was reset."""
        fields: dict = {}
        body = b""
        for event in self.events():
            if getattr(event, "stream_id", None) != stream:
                continue
            if isinstance(event, h2.events.ResponseReceived):
                fields = {k.decode(): v.decode() for k, v in event.headers}
                if stop_after_head:
                    break
            elif isinstance(event, h2.events.DataReceived):
                body += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, stream)
                self.flush()
                if stop_after_data:
                    break
            elif isinstance(event, h2.events.StreamEnded):
                break
            elif isinstance(event, h2.events.StreamReset):
                return fields, body, event.error_code
        return fields, body, None

    def close(self) -> None:
        self.sock.close()


def test_a_declared_body_over_the_limit_gets_413_before_any_data(h2c_gw) -> None:
    client = RawH2(h2c_gw.port)
    stream = client.request("/production/predict", [("content-length", str(100 * 1024 * 1024 + 1))], end=False)
    fields, body, _ = client.until_end(stream)
    client.close()
    assert fields[":status"] == "413" and json.loads(body)["error_code"] == "payload_too_large"


def test_data_beyond_the_content_length_resets_the_stream_and_the_connection_goes_on(h2c_gw) -> None:
    client = RawH2(h2c_gw.port)
    stream = client.request("/production/sync/sink", [("content-length", "3")], end=False)
    client.conn.send_data(stream, b"smuggled", end_stream=True)
    client.flush()
    _, _, reset = client.until_end(stream)
    assert reset == 1  # PROTOCOL_ERROR (RFC 9113 §8.1.1: a malformed request)
    fine = client.request("/production/predict", [("content-length", "2")], end=False)
    client.conn.send_data(fine, b"ok", end_stream=True)
    client.flush()
    fields, body, _ = client.until_end(fine)
    client.close()
    assert fields[":status"] == "200" and json.loads(body)["body"] == "ok"


def test_connection_specific_fields_of_the_plane_never_reach_an_h2_client(h2c_gw) -> None:
    client = RawH2(h2c_gw.port)
    stream = client.request("/production/sync/stream?n=2", [])
    fields, body, _ = client.until_end(stream)
    client.close()
    assert fields[":status"] == "200" and body == b"data: 0\n\ndata: 1\n\n"
    assert not {"connection", "keep-alive", "transfer-encoding", "upgrade", "proxy-connection"} & set(fields)


def test_a_client_reset_cancels_the_plane_call(h2c_gw, planes) -> None:
    http = planes[0]
    http.run(_renew_gone(http.plane))
    client = RawH2(h2c_gw.port)
    stream = client.request("/production/sync/sse-gone", [])
    _, first, _ = client.until_end(stream, stop_after_data=True)
    assert first == b"data: 0\n\n"
    client.conn.reset_stream(stream)
    client.flush()
    outcome = http.run(asyncio.wait_for(asyncio.shield(http.plane.gone), WAIT))
    client.close()
    assert outcome != "still connected"


async def _renew_gone(plane: Plane) -> None:
    plane.gone = asyncio.get_running_loop().create_future()


def test_large_bodies_both_ways_keep_to_the_flow_control_windows(tls_gw, tls, planes) -> None:
    size = 24 * 1024 * 1024  # many times the gateway's stream window and the client's
    upload = bytes(range(256)) * (size // 256)
    with httpx.Client(http2=True, verify=ssl_context(tls), timeout=WAIT) as client:
        base = f"https://127.0.0.1:{tls_gw.port}"
        sink = client.post(base + "/production/sync/sink", content=upload, headers={"host": STD, **KEY})
        assert sink.http_version == "HTTP/2" and sink.status_code == 200
        assert sink.json() == {"length": size, "sha256": hashlib.sha256(upload).hexdigest()}
        digest = hashlib.sha256()
        with client.stream("GET", base + f"/production/sync/huge?size={size}", headers={"host": STD, **KEY}) as resp:
            for chunk in resp.iter_bytes():
                digest.update(chunk)
    assert digest.hexdigest() == planes[0].plane.huge_sha256


def test_the_websocket_endpoint_over_h2_asks_for_http11(h2c_gw) -> None:
    client = RawH2(h2c_gw.port)
    stream = client.conn.get_next_available_stream_id()
    fields = [(":method", "GET"), (":scheme", "http"), (":path", "/production/websocket"), (":authority", STD),
              ("authorization", KEY["Authorization"])]  # fmt: skip
    client.conn.send_headers(stream, fields, end_stream=True)
    client.flush()
    answer, body, _ = client.until_end(stream)
    client.close()
    assert answer[":status"] == "426" and json.loads(body)["error_code"] == "client_error"


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (RFC 6455 §5.2), payload under 126 bytes."""
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


def test_websocket_over_h2_by_extended_connect(h2c_gw) -> None:
    client = RawH2(h2c_gw.port)
    while not client.conn.remote_settings.enable_connect_protocol:  # SETTINGS_ENABLE_CONNECT_PROTOCOL (RFC 8441 §3)
        client.conn.receive_data(client.sock.recv(65536))
    stream = client.conn.get_next_available_stream_id()
    fields = [(":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "http"),
              (":path", "/production/websocket"), (":authority", STD), ("sec-websocket-version", "13"),
              ("authorization", KEY["Authorization"])]  # fmt: skip
    client.conn.send_headers(stream, fields)
    client.flush()
    answer, _, _ = client.until_end(stream, stop_after_data=False, stop_after_head=True)
    assert answer[":status"] == "200" and "sec-websocket-accept" not in answer, answer
    assert REQUEST_ID.match(answer["x-baseten-request-id"])
    client.conn.send_data(stream, ws_frame(0x1, b"hello over h2"))
    client.flush()
    _, echoed, _ = client.until_end(stream, stop_after_data=True)
    assert echoed == b"\x81\x0dhello over h2"
    client.conn.send_data(stream, ws_frame(0x8, b"\x03\xe8bye"))  # close 1000
    client.flush()
    _, closing, reset = client.until_end(stream)
    client.close()
    assert closing == b"\x88\x02\x03\xe8" and reset is None  # the plane's close frame, then END_STREAM


def test_an_authority_other_than_the_tls_server_name_is_misdirected(tls_gw, tls) -> None:
    # A connection opened for one model host is not reused for another (RFC 9110 §15.5.20, issue 9).
    other = "model-xyz789.api.example.com"
    url = f"https://{STD}:{tls_gw.port}/production/predict"
    out = subprocess.run(
        ["curl", "-sS", "--max-time", str(WAIT), "-o", "/dev/null", "-w", "%{http_version} %{http_code}", "--http2",
         "--cacert", str(tls["ca"]), "--resolve", f"{STD}:{tls_gw.port}:127.0.0.1", "-H", f"Host: {other}",
         "-H", f"Authorization: {KEY['Authorization']}", "-d", "{}", url],
        capture_output=True, text=True, timeout=2 * WAIT, check=True,
    ).stdout  # fmt: skip
    assert out == "2 421"


def test_an_h2c_upgrade_offer_with_a_chunked_body_is_answered_and_the_connection_closed(h2c_gw) -> None:
    async def scenario() -> tuple[bytes, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", h2c_gw.port)
        writer.write(
            (f"POST /production/predict HTTP/1.1\r\nHost: {STD}\r\nAuthorization: {KEY['Authorization']}\r\n"
             "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n"
             "Transfer-Encoding: chunked\r\n\r\n5\r\nchunk\r\n3\r\ned!\r\n0\r\n\r\n").encode()
        )  # fmt: skip
        answer = await asyncio.wait_for(reader.read(), WAIT)  # to the end: the gateway closes the connection
        writer.close()
        return answer.partition(b"\r\n\r\n")[::2]

    head, body = asyncio.run(scenario())
    assert head.startswith(b"HTTP/1.1 200 ") and b"connection: close" in head.lower(), head
    assert json.loads(body)["body"] == "chunked!"


async def _forget_gate(plane: Plane, name: str) -> None:
    plane.gates.pop(name, None)


def test_a_drain_lets_an_h2_stream_finish(planes, tmp_path) -> None:
    http = planes[0]
    http.run(_forget_gate(http.plane, "sse"))
    gw = GatewayProcess(table(planes, tmp_path)).start()
    try:
        url = f"http://{STD}:{gw.port}/production/sync/sse?n=2"
        curl = subprocess.Popen(
            ["curl", "-sS", "-N", "--max-time", str(WAIT), "--http2-prior-knowledge", "-w", "%{http_version}",
             "--resolve", f"{STD}:{gw.port}:127.0.0.1", "-H", f"Authorization: {KEY['Authorization']}", url],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert curl.stdout is not None and curl.stdout.readline() == "data: 0\n"
        gw.signal(signal.SIGTERM)  # GOAWAY: the stream in flight goes on
        wait_until_not_ready(gw)
        http.open_gate("sse", 2, 0)
        rest, _ = curl.communicate(timeout=WAIT)
        assert curl.returncode == 0 and rest.lstrip("\n") == "data: 1\n\n2"  # the event, then HTTP/2
        assert gw.proc is not None and gw.proc.wait(WAIT) == 0
    finally:
        gw.stop()


def test_an_h2_call_to_a_scaled_to_zero_deployment_is_held_then_released(planes, tmp_path) -> None:
    """The pipeline's hold is the same for an HTTP/2 stream (SPEC §6): held while the deployment wakes."""
    http = planes[0]
    doc = yaml.safe_load(table(planes, tmp_path).read_text())
    doc["models"]["abc123"]["environments"]["cold"] = {"deployment": "v0"}
    gw = GatewayProcess(write_table(tmp_path / "table.yaml", doc)).start()
    try:
        url = f"http://{STD}:{gw.port}/environments/cold/predict"
        curl = subprocess.Popen(
            ["curl", "-sS", "--max-time", str(WAIT), "--http2-prior-knowledge", "-w", "\n%{http_version}",
             "--resolve", f"{STD}:{gw.port}:127.0.0.1", "-H", f"Authorization: {KEY['Authorization']}",
             "-d", "held", url],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        wait_for(lambda: held_gauge(gw) == 1, "the held gauge to show the h2 call")
        assert curl.poll() is None
        doc["models"]["abc123"]["deployments"]["v0"]["status"] = "active"
        configure(gw, doc)
        out, _ = curl.communicate(timeout=WAIT)
        body, _, version = out.rpartition("\n")
        assert curl.returncode == 0 and version == "2" and json.loads(body)["body"] == "held"
        assert held_gauge(gw) == 0 and any(r[1] == "/wake" for r in http.plane.requests)
    finally:
        gw.stop()


def held_gauge(gw: GatewayProcess) -> float:
    with urllib.request.urlopen(gw.admin_url + "/metrics", timeout=WAIT) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("gateway_held_requests{"))


def test_grpc_web_is_an_http_call_not_a_grpc_one(h2c_gw) -> None:
    client = RawH2(h2c_gw.port)
    stream = client.request("/production/sync/t.Plane/Echo", [("content-type", "application/grpc-web+proto")])
    fields, body, _ = client.until_end(stream)
    client.close()
    assert fields[":status"] == "200" and json.loads(body)["path"] == "/t.Plane/Echo"  # the HTTP plane's echo
