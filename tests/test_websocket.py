"""WebSocket relay (SPEC §7): real `websockets` clients and servers through the real gateway."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.support import DEMO_KEY, GatewayProcess, example_doc, running_gateway, write_table

MiB = 1024 * 1024
AUTH = {"Authorization": f"Api-Key {DEMO_KEY}"}


class WsPlane:
    """A plane's WebSocket server: first message is what it received; then echoes; records closes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.closed: asyncio.Queue[tuple[int | None, str | None]] = asyncio.Queue()
        self.connections: list[ServerConnection] = []
        self.server = None
        self.port = 0

    async def handler(self, ws: ServerConnection) -> None:
        self.connections.append(ws)
        h = ws.request.headers
        await ws.send(json.dumps({
            "plane": self.name, "path": ws.request.path, "model": h.get("x-baseten-model-id"),
            "environment": h.get("x-baseten-environment"), "deployment": h.get("x-baseten-deployment-id"),
            "request_id": h.get("x-baseten-request-id"), "authorization": h.get("authorization"),
        }))  # fmt: skip
        try:
            async for message in ws:
                if message == "close-4002":
                    await ws.close(4002, "plane says bye")
                    break
                await ws.send(message)
        except ConnectionClosed:
            pass
        await self.closed.put((ws.close_code, ws.close_reason))

    async def __aenter__(self) -> WsPlane:
        self.server = await serve(self.handler, "127.0.0.1", 0, max_size=None, compression=None)
        self.port = self.server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()  # type: ignore[union-attr]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    table = write_table(
        tmp_path_factory.mktemp("ws") / "table.yaml", example_doc("http://127.0.0.1:9", "http://127.0.0.1:9")
    )
    with running_gateway(table) as gateway:
        yield gateway


def point(gw: GatewayProcess, us_url: str, eu_url: str | None = None) -> None:
    doc = example_doc(us_url, eu_url or us_url)
    write_table(gw.config, doc)
    status, body = gw.admin("POST", "/v1/routing/reload")
    assert status == 200 and body["ok"], body


@contextlib.asynccontextmanager
async def ws_client(
    gw: GatewayProcess, host: str, path: str, headers: dict | None = None
) -> AsyncIterator[ClientConnection]:
    sock = socket.create_connection(("127.0.0.1", gw.port))  # the URI names the host; the socket the gateway
    async with connect(
        f"ws://{host}{path}", sock=sock, additional_headers=AUTH if headers is None else headers,
        max_size=None, compression=None, open_timeout=10, close_timeout=5,
    ) as ws:  # fmt: skip
        yield ws


@pytest.mark.parametrize(
    ("host", "path", "model", "env", "dep", "plane_path"),
    [
        ("model-abc123.api.example.com", "/production/websocket", "abc123", "production", "v1", "/websocket"),
        ("model-abc123.api.example.com", "/environments/prod-eu/websocket", "abc123", "prod-eu", "v3", "/websocket"),
        ("model-abc123.api.example.com", "/development/websocket", "abc123", "", "dev", "/websocket"),
        ("model-abc123.api.example.com", "/deployment/v2/websocket?session=7", "abc123", "", "v2", "/websocket?session=7"),
        ("model-abc123-prod-us.api.example.com", "/websocket", "abc123", "prod-us", "v1", "/websocket"),
        ("chain-pipeline1.api.example.com", "/production/websocket", "pipeline1", "production", "c1", "/websocket"),
        ("chain-pipeline1-prod-us.api.example.com", "/websocket", "pipeline1", "prod-us", "c1", "/websocket"),
    ],
)  # fmt: skip
def test_every_target_form_relays_text_and_binary(gw, host, path, model, env, dep, plane_path) -> None:
    async def scenario() -> None:
        async with WsPlane("us") as us, WsPlane("eu") as eu:
            point(gw, us.url, eu.url)
            async with ws_client(gw, host, path) as ws:
                hello = json.loads(await ws.recv())
                assert (hello["model"], hello["environment"], hello["deployment"], hello["path"]) == (
                    model,
                    env,
                    dep,
                    plane_path,
                )
                assert hello["plane"] == ("eu" if env == "prod-eu" else "us")
                assert hello["authorization"] is None  # never forwarded
                assert hello["request_id"] == ws.response.headers["x-baseten-request-id"]
                await ws.send("text ✓")
                assert await ws.recv() == "text ✓"
                await ws.send(b"\x00\x01binary\xff")
                assert await ws.recv() == b"\x00\x01binary\xff"

    asyncio.run(scenario())


def test_100_mib_messages_both_ways_and_ping_pong(gw: GatewayProcess) -> None:
    async def scenario() -> None:
        async with WsPlane("us") as plane:
            point(gw, plane.url)
            async with ws_client(gw, "model-abc123.api.example.com", "/production/websocket") as ws:
                await ws.recv()
                big = bytes(range(256)) * (100 * MiB // 256)
                await ws.send(big)
                echoed = await asyncio.wait_for(ws.recv(), 120)
                assert len(echoed) == len(big) and echoed == big
                latency = await asyncio.wait_for(await ws.ping(b"are-you-there"), 10)
                assert latency >= 0  # the plane's pong came back through the relay

    asyncio.run(scenario())


def test_close_codes_and_reasons_pass_both_ways(gw: GatewayProcess) -> None:
    async def scenario() -> None:
        async with WsPlane("us") as plane:
            point(gw, plane.url)
            async with ws_client(gw, "model-abc123.api.example.com", "/production/websocket") as ws:
                await ws.recv()
                await ws.close(4001, "client says bye")
            assert await asyncio.wait_for(plane.closed.get(), 10) == (4001, "client says bye")
            async with ws_client(gw, "model-abc123.api.example.com", "/production/websocket") as ws:
                await ws.recv()
                await ws.send("close-4002")
                with pytest.raises(ConnectionClosed) as info:
                    await asyncio.wait_for(ws.recv(), 10)
                assert info.value.rcvd is not None
                assert (info.value.rcvd.code, info.value.rcvd.reason) == (4002, "plane says bye")

    asyncio.run(scenario())


def test_a_client_vanishing_tears_down_the_plane_side(gw: GatewayProcess) -> None:
    async def scenario() -> None:
        async with WsPlane("us") as plane:
            point(gw, plane.url)
            async with ws_client(gw, "model-abc123.api.example.com", "/production/websocket") as ws:
                await ws.recv()
                ws.transport.abort()  # no close frame: the TCP connection just goes away
                code, _ = await asyncio.wait_for(plane.closed.get(), 10)
                assert code == 1006  # abnormal closure seen by the plane: its side was torn down

    asyncio.run(scenario())


def test_the_plane_vanishing_tears_down_the_client_side(gw: GatewayProcess) -> None:
    async def scenario() -> None:
        async with WsPlane("us") as plane:
            point(gw, plane.url)
            async with ws_client(gw, "model-abc123.api.example.com", "/production/websocket") as ws:
                await ws.recv()
                plane.connections[0].transport.abort()
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 10)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("host", "path", "headers", "status", "code"),
    [
        ("model-abc123.api.example.com", "/production/websocket", {}, 401, "unauthorized"),
        ("model-abc123.api.example.com", "/production/websocket", {"Authorization": "Api-Key demo-key-globex"}, 404, "model_does_not_exist"),
        ("model-abc123.api.example.com", "/production/websocket", {"Authorization": "Api-Key demo-key-staging"}, 403, "unauthorized"),
        ("model-abc123-prod-us.api.example.com", "/environments/prod-us/websocket", AUTH, 400, "client_error"),
        ("model-abc123-prod-eu.api.example.com", "/websocket", AUTH, 421, "client_error"),
        ("model-abc123-staging.api.example.com", "/websocket", AUTH, 404, "model_does_not_exist"),
        ("model-abc123.api.example.com", "/production/predict", AUTH, 405, "client_error"),
    ],
)  # fmt: skip
def test_failures_are_answered_before_the_upgrade(gw, host, path, headers, status, code) -> None:
    async def scenario() -> None:
        async with WsPlane("us") as plane:
            point(gw, plane.url)
            with pytest.raises(InvalidStatus) as info:
                async with ws_client(gw, host, path, headers):
                    pass
            response = info.value.response
            assert response.status_code == status
            assert response.headers["content-type"] == "application/json"
            assert json.loads(response.body)["error_code"] == code
            assert b"demo-key" not in response.body
            assert plane.connections == []  # nothing reached the plane

    asyncio.run(scenario())


def test_a_scaled_to_zero_target_holds_the_upgrade_until_it_is_active(gw: GatewayProcess) -> None:
    """SPEC §6: the upgrade is held (not refused) while v0 wakes, and goes through once it is active."""
    import aiohttp

    from tests.dataplane import metric, until

    async def session() -> tuple[dict, str, str | None]:
        async with ws_client(gw, "model-abc123.api.example.com", "/deployment/v0/websocket") as ws:
            first = json.loads(await ws.recv())
            await ws.send("hello after waking")
            return first, await ws.recv(), ws.response.headers.get("x-baseten-deployment-id")  # type: ignore[union-attr]

    async def scenario() -> None:
        async with WsPlane("us") as plane, aiohttp.ClientSession() as client:
            point(gw, plane.url)
            opening = asyncio.create_task(session())
            held = {"deployment": "v0", "protocol": "websocket"}
            await until(lambda: metric(client, gw, "gateway_held_requests", **held), "the upgrade to be held")
            assert plane.connections == [] and not opening.done()
            doc = example_doc(plane.url, plane.url)
            doc["models"]["abc123"]["deployments"]["v0"]["status"] = "active"
            write_table(gw.config, doc)
            assert gw.admin("POST", "/v1/routing/reload")[0] == 200
            first, echo, answered_by = await asyncio.wait_for(opening, 10)
            assert (first["deployment"], echo, answered_by) == ("v0", "hello after waking", "v0")
            assert await metric(client, gw, "gateway_held_requests") == 0
            point(gw, plane.url)  # v0 back to scaled to zero for the other tests

    asyncio.run(scenario())


def test_plain_get_on_the_websocket_endpoint_is_426(gw: GatewayProcess) -> None:
    from tests.support import parse_response, raw_request

    raw = asyncio.run(raw_request(gw.port, (
        b"GET /production/websocket HTTP/1.1\r\nHost: model-abc123.api.example.com\r\n"
        b"Authorization: Api-Key demo-key-acme\r\nConnection: close\r\n\r\n"
    )))  # fmt: skip
    status, headers, body = parse_response(raw)
    assert status == 426 and headers["upgrade"] == "websocket"
    assert json.loads(body)["error_code"] == "client_error"


def test_the_plane_refusing_the_upgrade_is_relayed(tmp_path: Path) -> None:
    async def refuse(connection, request):  # websockets' process_request hook
        return connection.respond(403, "plane refuses\n")

    async def scenario() -> None:
        server = await serve(lambda ws: ws.close(), "127.0.0.1", 0, process_request=refuse)
        port = server.sockets[0].getsockname()[1]
        table = write_table(tmp_path / "t.yaml", example_doc(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}"))
        with running_gateway(table) as gateway:
            with pytest.raises(InvalidStatus) as info:
                async with ws_client(gateway, "model-abc123.api.example.com", "/production/websocket"):
                    pass
        server.close()
        assert info.value.response.status_code == 403
        assert info.value.response.body == b"plane refuses\n"

    asyncio.run(scenario())


def test_a_reload_never_cuts_an_open_session(gw: GatewayProcess) -> None:
    async def scenario() -> None:
        async with WsPlane("a") as a, WsPlane("b") as b:
            point(gw, a.url)
            async with ws_client(gw, "model-abc123.api.example.com", "/production/websocket") as ws:
                assert json.loads(await ws.recv())["plane"] == "a"
                point(gw, b.url)  # the table now sends new sessions to plane b
                for i in range(5):
                    await ws.send(f"still here {i}")
                    assert await ws.recv() == f"still here {i}"
                async with ws_client(gw, "model-abc123.api.example.com", "/production/websocket") as fresh:
                    assert json.loads(await fresh.recv())["plane"] == "b"
        status, metrics = gw.admin("GET", "/metrics")
        assert re.search(r'gateway_requests_total\{model="abc123",environment="production",deployment="v1",'
                         r'region="us",protocol="websocket",code="101"\} [1-9]', metrics)  # fmt: skip

    asyncio.run(scenario())
