"""Request smuggling through refused upgrades, and the pool's framing invariant (issue 9 §1).

The plane here is a raw HTTP/1.1 server that logs every request it reads, per connection, and
honours the framing it is sent (Content-Length, chunked) as a real one would: whatever a pooled
connection carries after a request it thinks incomplete becomes that request's body.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.upstream.pool import Pool, UpstreamConnection
from tests.planes import LoggingPlane
from tests.support import GatewayProcess, example_doc, parse_response, raw_request, running_gateway, write_table

WS_HEAD = (
    b"GET /production/websocket HTTP/1.1\r\nHost: model-abc123.api.example.com\r\n"
    b"Authorization: Api-Key demo-key-acme\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
)
GLOBEX_CALL = (
    b"POST /production/predict HTTP/1.1\r\nHost: model-xyz789.api.example.com\r\n"
    b'Authorization: Api-Key demo-key-globex\r\nContent-Length: 13\r\n\r\n{"team": "g"}'
)


@pytest.fixture(scope="module")
def table_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("smuggling")


@pytest.fixture
def gateway(table_dir: Path) -> Iterator[GatewayProcess]:
    table = write_table(table_dir / "table.yaml", example_doc("http://127.0.0.1:9", "http://127.0.0.1:9"))
    with running_gateway(table) as gw:
        yield gw


def point(gw: GatewayProcess, url: str) -> None:
    write_table(gw.config, example_doc(url, url))
    status, body = gw.admin("POST", "/v1/routing/reload")
    assert status == 200 and body["ok"], body


@pytest.mark.parametrize(
    "body",
    [
        b"Content-Length: 5\r\n\r\nhello",
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"Content-Length: " + str(len(GLOBEX_CALL)).encode() + b"\r\n\r\n" + GLOBEX_CALL,
    ],
    ids=["content-length", "chunked", "a-smuggled-request"],
)
def test_an_upgrade_request_with_a_body_is_refused_and_never_forwarded(gateway: GatewayProcess, body: bytes) -> None:
    async def scenario() -> tuple[bytes, LoggingPlane]:
        async with LoggingPlane("400-keep-alive") as plane:
            point(gateway, plane.url)
            raw = await raw_request(gateway.port, WS_HEAD + body)
        return raw, plane

    raw, plane = asyncio.run(scenario())
    status, _, answer = parse_response(raw)
    assert status == 400 and json.loads(answer) == {
        "error": "a WebSocket upgrade request must not have a body",
        "error_code": "client_error",
    }
    assert plane.log == [] and plane.connections == 0


@pytest.mark.parametrize(
    ("behaviour", "upgrade_status"), [("400-keep-alive", 400), ("200-ignores-upgrade", 200), ("close", 502)]
)
def test_a_refused_upgrade_never_leaves_its_plane_connection_to_the_next_caller(
    gateway: GatewayProcess, behaviour: str, upgrade_status: int
) -> None:
    async def scenario() -> tuple[list[bytes], LoggingPlane]:
        async with LoggingPlane(behaviour) as plane:
            point(gateway, plane.url)
            answers = [await raw_request(gateway.port, WS_HEAD + b"\r\n")]
            for _ in range(3):  # another team's calls, one at a time: each may take a pooled connection
                answers.append(await raw_request(gateway.port, GLOBEX_CALL.replace(b"HTTP/1.1\r\n", b"HTTP/1.0\r\n")))
        return answers, plane

    answers, plane = asyncio.run(scenario())
    assert parse_response(answers[0])[0] == upgrade_status
    upgrade_conn = plane.log[0][0]
    assert plane.heads_on(upgrade_conn) == [plane.log[0][1]]  # nothing else ever went on that connection
    for raw in answers[1:]:
        status, headers, answer = parse_response(raw)
        assert status == 200 and json.loads(answer)["connection"] != upgrade_conn
        assert headers["x-baseten-deployment-id"] == "g1"
    globex = [(head, body) for _, head, body in plane.log[1:]]
    assert len(globex) == 3
    assert all(b"x-baseten-model-id: xyz789" in head and body == b'{"team": "g"}' for head, body in globex)


# -- the pool's invariant, over every order of events on a connection -------------------------


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def writelines(self, data: list[bytes]) -> None:
        self.written += data

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> None:
        return None


class Recorder:
    def __init__(self) -> None:
        self.complete = False
        self.lost = False

    def on_response_head(self, status: int, reason: bytes, headers: list) -> None:
        pass

    def on_response_body(self, data: bytes) -> None:
        pass

    def on_response_complete(self) -> None:
        self.complete = True

    def on_upstream_lost(self, error: object) -> None:
        self.lost = True

    def flush(self) -> None:
        pass

    def upstream_write_paused(self, paused: bool) -> None:
        pass

    def on_upgrade(self, tail: bytes) -> None:
        pass

    def on_tunnel_data(self, data: bytes) -> None:
        pass

    def on_tunnel_closed(self) -> None:
        self.lost = True


RESPONSES = {
    "length": b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    "chunked": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "close-delimited": b"HTTP/1.1 200 OK\r\n\r\nok",
    "connection-close": b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
    "refused-upgrade": b"HTTP/1.1 400 Bad Request\r\ncontent-length: 3\r\n\r\nbad",
    "switching": b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
    "truncated": b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nok",
}


@settings(max_examples=300, deadline=None)
@given(
    upgrade=st.booleans(),
    head_only=st.booleans(),
    body_pending=st.booleans(),
    body_finished=st.booleans(),
    response=st.sampled_from(sorted(RESPONSES)),
    split=st.integers(min_value=1, max_value=80),
    eof=st.booleans(),
)
def test_a_connection_is_pooled_again_only_when_both_messages_were_framed_completely(
    upgrade: bool, head_only: bool, body_pending: bool, body_finished: bool, response: str, split: int, eof: bool
) -> None:
    pool = Pool()
    conn = UpstreamConnection(pool, ("http", "plane", 80, None))
    conn.connection_made(FakeTransport())  # type: ignore[arg-type]
    exchange = Recorder()
    conn.start(exchange, [b"GET / HTTP/1.1\r\n\r\n"], head_only=head_only, upgrade=upgrade, body_pending=body_pending)
    data = RESPONSES[response]
    conn.data_received(data[:split])
    if data[split:]:
        conn.data_received(data[split:])
    if body_pending and body_finished:
        conn.request_done()
    if eof:
        conn.eof_received()
    conn.release()
    pooled = any(conn in conns for conns in pool.idle.values())
    request_framed = not body_pending or body_finished
    response_framed = exchange.complete and response in ("length", "chunked", "refused-upgrade") and not head_only
    assert pooled == (request_framed and response_framed and not upgrade and not eof)
    if not pooled:
        assert conn.closed or conn.transport.closed  # type: ignore[union-attr]
