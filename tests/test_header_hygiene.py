"""HTTP/1.1 header hygiene (issue 9 §3): what a client sends never poses as the gateway's own fields.

Raw sockets against the real gateway, and a plane that logs the exact heads it receives.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from collections.abc import Iterator

import pytest
import trustme

from gateway.headers import forwarded_value, misdirected, normal_host, shadows_protected
from gateway.http import server as http_server
from gateway.http.server import Request, async_handler, serve
from tests.planes import LoggingPlane
from tests.support import GatewayProcess, example_doc, parse_response, raw_request, running_gateway, write_table

HOST = b"model-abc123.api.example.com"
KEY = b"Authorization: Api-Key demo-key-acme\r\n"
DOMAINS = frozenset({"api.example.com", "localhost"})


def call(extra: bytes = b"", body: bytes = b"{}", *, auth: bytes = KEY) -> bytes:
    return (
        b"POST /production/predict HTTP/1.1\r\nHost: " + HOST + b"\r\n" + auth + extra
        + b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )  # fmt: skip


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    table = write_table(
        tmp_path_factory.mktemp("hygiene") / "table.yaml", example_doc("http://127.0.0.1:9", "http://127.0.0.1:9")
    )
    with running_gateway(table) as gw:
        yield gw


def through(gateway: GatewayProcess, data: bytes) -> tuple[int, dict, bytes, list[bytes]]:
    """Send `data` raw; the answer, and the heads the plane received."""

    async def scenario() -> tuple[bytes, LoggingPlane]:
        async with LoggingPlane() as plane:
            write_table(gateway.config, example_doc(plane.url, plane.url))
            status, body = gateway.admin("POST", "/v1/routing/reload")
            assert status == 200 and body["ok"], body
            return await raw_request(gateway.port, data), plane

    raw, plane = asyncio.run(scenario())
    status, headers, body = parse_response(raw)
    return status, headers, body, [head for _, head, _ in plane.log]


def fields(head: bytes) -> list[tuple[str, str]]:
    out = []
    for line in head.decode("latin-1").split("\r\n")[1:]:
        if line:
            name, _, value = line.partition(":")
            out.append((name.lower(), value.strip()))
    return out


# -- pure rules ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "dropped"),
    [
        (b"x_baseten_model_id", True), (b"x-baseten_environment", True), (b"x_forwarded_for", True),
        (b"x_real_ip", True), (b"baseten_authorization", True), (b"x_baseten_request_id", True),
        (b"x_custom_field", False), (b"x-baseten-model-id", False), (b"my_app_version", False),
    ],
)  # fmt: skip
def test_only_underscore_look_alikes_of_protected_fields_are_dropped(name: bytes, dropped: bool) -> None:
    assert shadows_protected(name) is dropped


@pytest.mark.parametrize(
    ("peer", "host", "scheme", "value"),
    [
        ("10.0.0.7", "model-a.api.example.com", "https", b"for=10.0.0.7;host=model-a.api.example.com;proto=https"),
        ("::1", "model-a.localhost:8080", "http", b'for="[::1]";host="model-a.localhost:8080";proto=http'),
        ("10.0.0.7", 'a"b\\c', "http", b'for=10.0.0.7;host="a\\"b\\\\c";proto=http'),
        ("", None, "http", b"for=unknown;proto=http"),
    ],
)
def test_forwarded_follows_rfc_7239(peer: str, host: str | None, scheme: str, value: bytes) -> None:
    assert forwarded_value(peer, host, scheme) == value


@pytest.mark.parametrize(
    ("sni", "host", "expected"),
    [
        ("model-a.api.example.com", "model-a.api.example.com", False),
        ("model-a.api.example.com", "MODEL-A.api.example.com.:443", False),
        ("model-a.api.example.com", "model-b.api.example.com", True),
        ("model-a-prod-us.api.example.com", "model-a-prod-eu.api.example.com", True),
        ("model-a.grpc.localhost", "model-b.grpc.localhost", True),
        ("api.example.com", "model-b.api.example.com", False),  # a generic name asked for no model
        ("gateway.internal", "model-b.api.example.com", False),
        (None, "model-b.api.example.com", False),
    ],
)
def test_misdirected_only_when_the_sni_names_another_model_host(sni, host, expected) -> None:
    assert misdirected(sni, host, DOMAINS) is expected


def test_normal_host_strips_port_case_and_one_trailing_dot() -> None:
    assert normal_host("Model-A.Localhost.:8080") == "model-a.localhost"
    assert normal_host("[::1]:8080") == "[::1]"


# -- through the gateway ------------------------------------------------------------------------


def test_underscore_look_alikes_never_reach_the_plane(gateway: GatewayProcess) -> None:
    extra = (
        b"x_baseten_model_id: xyz789\r\nx-baseten_environment: staging\r\nx_forwarded_for: 6.6.6.6\r\n"
        b"x_baseten_deployment_id: g1\r\nx_custom_field: kept\r\n"
    )
    status, _, _, heads = through(gateway, call(extra))
    assert status == 200
    got = fields(heads[0])
    names = [name for name, _ in got]
    assert not any(shadows_protected(name.encode()) for name in names)
    assert ("x_custom_field", "kept") in got
    assert ("x-baseten-model-id", "abc123") in got and names.count("x-baseten-model-id") == 1


def test_client_proxy_fields_are_replaced_or_dropped(gateway: GatewayProcess) -> None:
    extra = (
        b"Forwarded: for=6.6.6.6;proto=https\r\nX-Real-IP: 6.6.6.6\r\nX-Forwarded-Port: 443\r\n"
        b"X-Forwarded-Prefix: /admin\r\nX-Original-URL: /admin/secret\r\nX-Forwarded-For: 6.6.6.6\r\n"
    )
    status, _, _, heads = through(gateway, call(extra))
    assert status == 200
    got = dict(fields(heads[0]))
    assert got["forwarded"] == "for=127.0.0.1;host=model-abc123.api.example.com;proto=http"
    assert got["x-forwarded-for"] == "127.0.0.1"
    for name in ("x-real-ip", "x-forwarded-port", "x-forwarded-prefix", "x-original-url"):
        assert name not in got
    assert [name for name, _ in fields(heads[0])].count("forwarded") == 1


def chunked(head_extra: bytes, trailers: bytes, *, auth: bytes = KEY) -> bytes:
    return (
        b"POST /production/predict HTTP/1.1\r\nHost: " + HOST + b"\r\n" + auth + head_extra
        + b"Connection: close\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n" + trailers + b"\r\n"
    )  # fmt: skip


def test_a_trailer_authorization_never_authenticates(gateway: GatewayProcess) -> None:
    # Head and trailers in one read: the trailer must not be taken for a head field.
    status, _, body, heads = through(gateway, chunked(b"", b"Authorization: Api-Key demo-key-acme\r\n", auth=b""))
    assert status == 401 and json.loads(body)["error_code"] == "unauthorized"
    assert heads == []


def test_trailer_fields_are_not_forwarded_as_head_fields(gateway: GatewayProcess) -> None:
    trailers = b"X-Trailer-Field: t\r\nX-Baseten-Model-Id: xyz789\r\nHost: model-xyz789.api.example.com\r\n"
    status, headers, _, heads = through(gateway, chunked(b"", trailers))
    assert status == 200 and headers["x-baseten-deployment-id"] == "v1"
    got = fields(heads[0])
    assert "x-trailer-field" not in dict(got)
    assert ("x-baseten-model-id", "abc123") in got and dict(got)["host"].startswith("127.0.0.1")


def test_two_authorization_fields_are_refused(gateway: GatewayProcess) -> None:
    status, _, body, heads = through(gateway, call(b"Authorization: Api-Key demo-key-globex\r\n"))
    assert status == 400 and json.loads(body) == {
        "error": "more than one Authorization header",
        "error_code": "client_error",
    }
    assert heads == []


@pytest.mark.parametrize("coding", [b"gzip, chunked", b"deflate,chunked", b"chunked, chunked", b"identity"])
def test_transfer_codings_other_than_chunked_get_501(gateway: GatewayProcess, coding: bytes) -> None:
    data = (
        b"POST /production/predict HTTP/1.1\r\nHost: " + HOST + b"\r\n" + KEY
        + b"Transfer-Encoding: " + coding + b"\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    )  # fmt: skip
    status, _, body, heads = through(gateway, data)
    assert heads == []
    if coding == b"chunked, chunked":  # llhttp itself refuses it before our check sees it
        assert status == 400
    else:
        assert status == 501 and json.loads(body)["error_code"] == "client_error"


# -- TLS: SNI and Host ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, trustme.CA]]:
    tmp = tmp_path_factory.mktemp("sni")
    ca = trustme.CA()
    cert = ca.issue_cert("model-abc123.api.example.com", "model-xyz789.api.example.com", "gateway.internal")
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert.cert_chain_pems[0].write_to_path(cert_path)
    cert.private_key_pem.write_to_path(key_path)
    table = write_table(tmp / "table.yaml", example_doc("http://127.0.0.1:9", "http://127.0.0.1:9"))
    with running_gateway(table, "--tls-cert", str(cert_path), "--tls-key", str(key_path)) as gw:
        yield gw, ca


def tls_call(gw: GatewayProcess, ca: trustme.CA, sni: str, host: str) -> tuple[int, dict, bytes, list[bytes]]:
    async def scenario() -> tuple[bytes, LoggingPlane]:
        async with LoggingPlane() as plane:
            write_table(gw.config, example_doc(plane.url, plane.url))
            status, body = gw.admin("POST", "/v1/routing/reload")
            assert status == 200 and body["ok"], body
            ctx = ssl.create_default_context()
            ca.configure_trust(ctx)
            sock = socket.create_connection(("127.0.0.1", gw.port))
            reader, writer = await asyncio.open_connection(sock=sock, ssl=ctx, server_hostname=sni)
            writer.write(call().replace(HOST, host.encode()))
            async with asyncio.timeout(10):
                raw = await reader.read(-1)
            writer.close()
            return raw, plane

    raw, plane = asyncio.run(scenario())
    status, headers, body = parse_response(raw)
    return status, headers, body, [head for _, head, _ in plane.log]


def test_a_host_other_than_the_tls_server_name_gets_421(tls_gateway) -> None:
    gw, ca = tls_gateway
    status, _, body, heads = tls_call(gw, ca, "model-abc123.api.example.com", "model-xyz789.api.example.com")
    assert status == 421 and json.loads(body)["error_code"] == "client_error"
    assert "model-abc123.api.example.com" in json.loads(body)["error"] and heads == []


@pytest.mark.parametrize(
    ("sni", "host"),
    [
        ("model-abc123.api.example.com", "model-abc123.api.example.com"),
        ("model-abc123.api.example.com", "MODEL-ABC123.api.example.com:443"),
        ("gateway.internal", "model-abc123.api.example.com"),  # not a model host: nothing to mismatch
    ],
)
def test_a_matching_or_generic_server_name_is_served(tls_gateway, sni: str, host: str) -> None:
    gw, ca = tls_gateway
    status, headers, _, heads = tls_call(gw, ca, sni, host)
    assert status == 200 and headers["x-baseten-deployment-id"] == "v1" and len(heads) == 1


# -- slow bodies ------------------------------------------------------------------------------------


@pytest.fixture
def short_body_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_server, "BODY_TIMEOUT_SECONDS", 0.5)
    monkeypatch.setattr(http_server, "SWEEP_SECONDS", 0.05)


async def read_body(req: Request) -> None:
    body = await req.body.read_all(1 << 20)
    req.conn.send_simple(200, json.dumps({"len": len(body)}).encode())


def test_a_trickling_body_gets_408(short_body_limits: None) -> None:
    async def scenario() -> tuple[bytes, int]:
        server = await serve(async_handler(read_body), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n")
        sent = 0
        try:
            for _ in range(100):  # one byte per 50 ms: each read well inside the per-read limit
                writer.write(b"x")
                sent += 1
                await asyncio.sleep(0.05)
                if reader.at_eof() or reader._buffer:  # type: ignore[attr-defined]
                    break
        except ConnectionError:
            pass
        async with asyncio.timeout(5):
            raw = await reader.read(-1)
        writer.close()
        server.close()
        return raw, sent

    raw, sent = asyncio.run(scenario())
    status, _, body = parse_response(raw)
    assert status == 408 and "slower than 500 bytes/s" in json.loads(body)["error"]
    assert sent < 100  # refused before the client was done trickling


def test_waiting_for_our_100_continue_is_not_a_slow_body(short_body_limits: None) -> None:
    async def slow_to_continue(req: Request) -> None:
        await asyncio.sleep(1.2)  # longer than BODY_TIMEOUT_SECONDS: the gateway, not the client, is slow
        req.conn.send_continue()
        await read_body(req)

    async def scenario() -> bytes:
        server = await serve(async_handler(slow_to_continue), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        async with asyncio.timeout(5):
            interim = await reader.readuntil(b"\r\n\r\n")
        writer.write(b"ok")
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            body = await reader.readexactly(int(parse_response(head)[1]["content-length"]))
        writer.close()
        server.close()
        return interim + head + body

    raw = asyncio.run(scenario())
    assert raw.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n") and raw.endswith(b'{"len": 2}')
