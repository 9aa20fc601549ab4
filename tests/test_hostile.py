"""Hostile and broken clients (issue 5): limits, slow clients, idle connections, drain, fuzz."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.http import server as http_server
from gateway.http.server import Request, async_handler, serve
from tests.support import GatewayProcess, example_doc, parse_response, raw_request, running_gateway, write_table

GOOD = (
    b"POST /production/predict HTTP/1.1\r\nHost: model-abc123.api.example.com\r\n"
    b"Authorization: Api-Key demo-key-acme\r\nContent-Length: 2\r\n\r\n{}"
)


@pytest.fixture
def short_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_server, "HEAD_TIMEOUT_SECONDS", 0.4)
    monkeypatch.setattr(http_server, "KEEPALIVE_TIMEOUT_SECONDS", 0.4)
    monkeypatch.setattr(http_server, "BODY_TIMEOUT_SECONDS", 0.4)
    monkeypatch.setattr(http_server, "SWEEP_SECONDS", 0.05)


async def slow_handler(req: Request) -> None:
    body = await req.body.read_all(1 << 20)
    await asyncio.sleep(0.3)  # still answering when the drain starts
    req.conn.send_simple(200, json.dumps({"len": len(body)}).encode())


async def read_all(reader: asyncio.StreamReader, timeout: float = 5) -> bytes:
    async with asyncio.timeout(timeout):
        return await reader.read()  # until the server closes


def test_slowloris_head_gets_408_and_the_connection_is_closed(short_limits: None) -> None:
    async def scenario() -> bytes:
        server = await serve(async_handler(slow_handler), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /x HTTP/1.1\r\nHost: a\r\nX-Slow: ")  # ...and never finishes the head
        raw = await read_all(reader)
        writer.close()
        server.close()
        return raw

    status, headers, body = parse_response(asyncio.run(scenario()))
    assert status == 408 and json.loads(body)["error_code"] == "client_error"


def test_idle_keepalive_connection_is_closed(short_limits: None) -> None:
    async def scenario() -> bytes:
        server = await serve(async_handler(slow_handler), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nab")
        raw = await read_all(reader)  # the answer, then EOF once the connection sat idle
        writer.close()
        server.close()
        return raw

    status, _, body = parse_response(asyncio.run(scenario()))
    assert status == 200 and json.loads(body) == {"len": 2}


def test_stalled_request_body_gets_408(short_limits: None) -> None:
    async def scenario() -> bytes:
        server = await serve(async_handler(slow_handler), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nonly-part")
        raw = await read_all(reader)
        writer.close()
        server.close()
        return raw

    status, _, body = parse_response(asyncio.run(scenario()))
    assert status == 408 and "stalled" in json.loads(body)["error"]


def test_drain_closes_idle_connections_and_lets_busy_ones_finish(short_limits: None) -> None:
    async def scenario() -> tuple[bytes, bytes]:
        server = await serve(async_handler(slow_handler), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        idle_r, idle_w = await asyncio.open_connection("127.0.0.1", port)
        busy_r, busy_w = await asyncio.open_connection("127.0.0.1", port)
        busy_w.write(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc")
        await asyncio.sleep(0.05)
        server.close()  # stop accepting: what SIGTERM does first
        idle = await read_all(idle_r)
        busy = await read_all(busy_r)
        idle_w.close()
        busy_w.close()
        return idle, busy

    idle, busy = asyncio.run(scenario())
    assert idle == b""  # closed without an answer: it had asked nothing
    status, headers, body = parse_response(busy)
    assert status == 200 and json.loads(body) == {"len": 3}
    assert headers.get("connection") == "close"


# -- against a running gateway -------------------------------------------------------------------


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    table = write_table(
        tmp_path_factory.mktemp("hostile") / "t.yaml", example_doc("http://127.0.0.1:9", "http://127.0.0.1:9")
    )
    with running_gateway(table) as gateway:
        yield gateway


def answer(gw: GatewayProcess, data: bytes) -> tuple[int, dict, bytes]:
    return parse_response(asyncio.run(raw_request(gw.port, data)))


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n", 431),
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/9.9\r\nHost: x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400),
        (b"POST /production/predict HTTP/1.1\r\nHost: model-abc123.api.example.com\r\n"
         b"Transfer-Encoding: chunked\r\n\r\nZZZ\r\nabc\r\n0\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", 400),  # no Host (RFC 9112 §3.2)
    ],
)  # fmt: skip
def test_malformed_requests_get_json_4xx_and_the_worker_stays_up(gw: GatewayProcess, data: bytes, status: int) -> None:
    got, headers, body = answer(gw, data)
    assert got == status, body
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error_code"] == "client_error"
    assert (
        answer(gw, GOOD.replace(b"Content-Length: 2", b"Connection: close\r\nContent-Length: 2"))[0] == 503
    )  # plane down: routed


_tokens = st.sampled_from(
    [b"GET", b"POST", b" ", b"/", b"HTTP/1.1", b"HTTP/1.0", b"\r\n", b"\n", b"Host:", b"Content-Length:", b"-1",
     b"99999999999999999999", b"Transfer-Encoding: chunked", b"\x00", b"\xff", b"%", b"%2F", b"..", b":", b"\t",
     b"model-abc123.api.example.com", b"Authorization: Api-Key demo-key-acme", b"Upgrade: websocket",
     b"Connection: upgrade", b"0\r\n\r\n", b"\r\n\r\n"]
)  # fmt: skip


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_tokens, min_size=1, max_size=24).map(b"".join))
def test_fuzzed_requests_never_get_anything_but_a_json_error_or_a_routed_answer(
    gw: GatewayProcess, data: bytes
) -> None:
    raw = asyncio.run(raw_request(gw.port, data + b"\r\n\r\n", timeout=2, partial_on_timeout=True))
    if raw:  # no answer: the input never formed a request, and the gateway still waits for one
        status, headers, body = parse_response(raw)
        assert 400 <= status < 600
        if status != 503:  # 503: a well-formed call that was routed to the (absent) plane
            assert 400 <= status < 500
        assert headers.get("content-type") == "application/json"
        assert "error_code" in json.loads(body)
    status, _, _ = answer(gw, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 404  # the worker is alive and answering


def test_worker_survived_the_fuzzing(gw: GatewayProcess) -> None:
    assert gw.proc is not None and gw.proc.poll() is None
    assert gw.admin("GET", "/healthz")[0] == 200
    assert "Traceback" not in Path(gw.log_path).read_text()
