"""The one region-checked connector (issue 10, SPEC §8): no protocol reaches an address outside its region.

A property test drives `Connector.open` over literal and resolved addresses with the socket layer
replaced by a recorder; integration tests run a real gateway whose gRPC and HTTP planes sit behind
region networks and the test DNS server, with listeners that count every connection they get.
"""

from __future__ import annotations

import asyncio
import ipaddress
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.calls.outcome import error_kind, outcome_of
from gateway.dns import Resolver
from gateway.dns.lookup import Records
from gateway.errors import (
    ClientError,
    ConnectFailed,
    NoAddress,
    PayloadTooLarge,
    Unauthorized,
    UpstreamBroken,
    UpstreamTimeout,
)
from gateway.routing.model import Region, Upstream
from gateway.upstream.balance import EndpointSet, Health
from gateway.upstream.connect import Connector
from tests.dnsserver import DNSServer
from tests.support import EXAMPLE, KEY_HEADER, GatewayProcess, free_port, running_gateway, write_table
from tests.test_grpc import AUTH, GrpcPlane

# -- the property: nothing outside the networks is ever dialled ------------------------------------

V4 = st.builds(lambda n: str(ipaddress.IPv4Address(n)), st.integers(0, 2**32 - 1))
NEAR = st.sampled_from(["10.10.0.5", "10.10.255.1", "10.11.0.1", "127.0.0.1", "192.0.2.7", "fd10::5", "2001:db8::1"])
ADDRESS = st.one_of(V4, NEAR)
NETWORKS = st.lists(st.sampled_from(["10.10.0.0/16", "127.0.0.0/8", "fd10::/16", "192.0.2.0/28"]), max_size=3)


class FakeLookup:
    """The dnspython boundary replaced: every name answers `answer` (A and AAAA split by family)."""

    config_error = None

    def __init__(self, answer: tuple[str, ...]) -> None:
        self.answer = answer

    async def query(self, name: str, rdtype: str) -> Records:
        family = 6 if rdtype == "AAAA" else 4
        return Records(tuple(a for a in self.answer if ipaddress.ip_address(a).version == family), 60.0)


def inside(address: str, networks: list[str]) -> bool:
    ip = ipaddress.ip_address(address)
    return any(ip.version == ipaddress.ip_network(n).version and ip in ipaddress.ip_network(n) for n in networks)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(literal=ADDRESS, answer=st.lists(ADDRESS, min_size=1, max_size=4, unique=True), networks=NETWORKS,
       use_name=st.booleans())  # fmt: skip
def test_no_connection_is_ever_opened_outside_the_region(
    literal: str, answer: list[str], networks: list[str], use_name: bool
) -> None:
    dialled: list[str] = []

    async def scenario() -> BaseException | str:
        resolver = Resolver(())
        resolver._lookup = FakeLookup(tuple(answer))  # type: ignore[assignment]
        connector = Connector(resolver=resolver)
        loop = asyncio.get_running_loop()

        async def recording(factory: Any, host: str, port: int, **kw: Any) -> Any:
            dialled.append(host)
            raise ConnectionRefusedError(111, "Connection refused")

        loop.create_connection = recording  # type: ignore[method-assign]
        host = "plane.test" if use_name else literal
        try:
            await connector.open(host, 9000, Region("us", tuple(networks)), asyncio.Protocol, timeout=1)
        except (NoAddress, ConnectFailed) as error:
            return error
        finally:
            resolver.close()
        return "connected"

    outcome = asyncio.run(scenario())
    addresses = answer if use_name else [literal]
    allowed = not networks or all(inside(a, networks) for a in addresses)
    if allowed:
        assert isinstance(outcome, ConnectFailed) and not isinstance(outcome, NoAddress)
        assert dialled and set(dialled) <= set(addresses)
    else:
        assert isinstance(outcome, NoAddress) and dialled == []  # fail closed, nothing dialled
    assert all(not networks or inside(a, networks) for a in dialled)


# -- the outcome of a call, for ejection and the upstream-error metric ----------------------------


@pytest.mark.parametrize(
    ("error", "status", "outcome", "kind"),
    [
        (None, 200, "ok", None),
        (None, 404, "ok", None),
        (None, 503, "failure", None),
        (None, 499, "cancelled", None),
        (PayloadTooLarge("413"), 413, "cancelled", None),
        (ClientError("400"), 400, "cancelled", None),
        (Unauthorized("401"), 401, "cancelled", None),
        (ConnectFailed("refused"), 503, "connect_failure", "connect"),
        (NoAddress("outside"), 503, "connect_failure", "connect"),
        (UpstreamBroken("reset"), 502, "failure", "broken"),
        (UpstreamTimeout("slow"), 504, "failure", "timeout"),
    ],
)
def test_only_the_planes_faults_count(error, status, outcome, kind) -> None:
    assert outcome_of(error, status) == outcome
    assert error_kind(error) == kind


def test_client_errors_never_eject_a_healthy_replica() -> None:
    a, b = Upstream("http", "127.0.0.1", 8001), Upstream("http", "127.0.0.1", 8002)
    endpoints = EndpointSet(("abc123", "v1"), [a, b])
    ep = next(e for e in endpoints.endpoints if e.upstream == a)
    for _ in range(12):  # the review's twelve oversized chunked uploads
        endpoints.started(ep)
        endpoints.finished(ep, outcome_of(PayloadTooLarge("request body exceeds 104857600 bytes"), 413))
    assert ep.state is Health.HEALTHY and endpoints.ejected_count() == 0
    for _ in range(12):
        endpoints.started(ep)
        endpoints.finished(ep, outcome_of(UpstreamBroken("plane closed the connection mid-call"), 502))
    assert ep.state is Health.EJECTED


# -- gRPC behind region networks, literal and DNS name ------------------------------------------------


class Listener:
    """A TCP listener on `host:port` in a thread of its own that counts connections and closes them."""

    def __init__(self, host: str, port: int) -> None:
        import socket

        self.sock = socket.socket()
        self.sock.bind((host, port))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.accepted = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()
        self.sock.close()


@pytest.fixture(scope="module")
def plane() -> Iterator[GrpcPlane]:
    p = GrpcPlane("us-east-1")
    yield p
    p.stop()


@pytest.fixture
def outside(plane: GrpcPlane) -> Iterator[Listener]:
    listener = Listener("127.0.0.2", plane.port)  # the same port at an address outside 127.0.0.1/32
    yield listener
    listener.stop()


def grpc_doc(grpc_address: str, nameserver: str | None = None) -> dict:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["regions"]["us"]["networks"] = ["127.0.0.1/32"]
    doc["planes"]["us-east-1"]["grpc"] = grpc_address
    if nameserver is not None:
        doc["gateway"]["dns"] = {"nameservers": [nameserver]}
    return doc


def grpc_call(gw: GatewayProcess) -> grpc.RpcError | bytes:
    with grpc.insecure_channel(
        f"127.0.0.1:{gw.grpc_port}", options=[("grpc.default_authority", "model-abc123.grpc.localhost")]
    ) as ch:
        try:
            return ch.unary_unary("/t.Plane/Echo")(b"hi", metadata=AUTH, timeout=10)
        except grpc.RpcError as error:
            return error


def test_a_literal_grpc_address_outside_the_networks_is_never_dialled(
    tmp_path: Path, plane: GrpcPlane, outside: Listener
) -> None:
    table = write_table(tmp_path / "t.yaml", grpc_doc(f"127.0.0.2:{plane.port}"))
    with running_gateway(table, grpc_port=free_port()) as gw:
        result = grpc_call(gw)
    assert isinstance(result, grpc.RpcError) and result.code() == grpc.StatusCode.UNAVAILABLE
    assert "outside region 'us'" in (result.details() or "")
    assert outside.accepted == 0


@pytest.mark.parametrize(
    ("records", "reached"),
    [(("127.0.0.1",), True), (("127.0.0.2",), False), (("127.0.0.1", "127.0.0.2"), False)],
    ids=["inside", "outside", "one-outside"],
)
def test_a_grpc_plane_name_is_resolved_by_the_tables_resolver_and_checked(
    tmp_path: Path, plane: GrpcPlane, outside: Listener, records: tuple[str, ...], reached: bool
) -> None:
    loop = asyncio.new_event_loop()
    server = DNSServer()
    loop.run_until_complete(server.__aenter__())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        server.set("plane.test", "A", *records, ttl=30)
        table = write_table(tmp_path / "t.yaml", grpc_doc(f"plane.test:{plane.port}", server.address))
        with running_gateway(table, grpc_port=free_port()) as gw:
            result = grpc_call(gw)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.run_until_complete(server.__aexit__(None, None, None))
        loop.close()
    assert server.queries["plane.test"] >= 1  # the table's resolver asked, not the system's
    if reached:
        assert result == b"hi"
    else:
        assert isinstance(result, grpc.RpcError) and result.code() == grpc.StatusCode.UNAVAILABLE
        assert "127.0.0.2, outside region 'us'" in (result.details() or "")
    assert outside.accepted == 0


# -- HTTP: warm connections follow a DNS change --------------------------------------------------------


def test_warm_connections_follow_a_dns_change_under_steady_traffic(tmp_path: Path) -> None:
    async def scenario() -> tuple[int, list[str]]:
        port = free_port()
        apps: dict[str, web.AppRunner] = {}
        for host in ("127.0.0.1", "127.0.0.2"):

            async def who(request: web.Request, host: str = host) -> web.Response:
                return web.Response(text=host)

            app = web.Application()
            app.router.add_post("/predict", who)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, host, port).start()
            apps[host] = runner
        async with DNSServer() as dns:
            dns.set("plane.test", "A", "127.0.0.1", ttl=1)
            doc = yaml.safe_load(EXAMPLE.read_text())
            doc["planes"]["us-east-1"]["url"] = f"http://plane.test:{port}"
            doc["gateway"]["dns"] = {"nameservers": [dns.address]}
            table = write_table(tmp_path / "t.yaml", doc)
            with running_gateway(table) as gw:
                answers: list[str] = []
                async with aiohttp.ClientSession() as session:

                    async def call() -> str:
                        async with session.post(
                            gw.url + "/production/predict", data=b"{}",
                            headers={"Host": "model-abc123.api.example.com", **KEY_HEADER},
                        ) as resp:  # fmt: skip
                            assert resp.status == 200
                            return await resp.text()

                    for _ in range(20):
                        answers.append(await call())
                    dns.set("plane.test", "A", "127.0.0.2", ttl=1)
                    changed_at = len(answers)
                    # Steady traffic on warm connections; bounded well below the pool's 30 s age limit.
                    for _ in range(200):
                        answers.append(await call())
                        if answers[-1] == "127.0.0.2":
                            break
                        await asyncio.sleep(0.05)
                    for _ in range(20):
                        answers.append(await call())
        for runner in apps.values():
            await runner.cleanup()
        return changed_at, answers

    changed_at, answers = asyncio.run(scenario())
    assert set(answers[:changed_at]) == {"127.0.0.1"}
    assert "127.0.0.2" in answers[changed_at:]
    switched = answers.index("127.0.0.2", changed_at)
    assert answers[switched:] == ["127.0.0.2"] * (len(answers) - switched)  # old connections took no more calls


def test_the_connector_is_the_only_place_that_opens_plane_connections() -> None:
    import ast

    package = Path(__file__).resolve().parents[1] / "gateway"
    callers = []
    for path in package.rglob("*.py"):
        if path.parent.name == "demo" or path.parent.name == "protos":
            continue  # the demo's own sample planes and clients
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("create_connection", "open_connection"):
                callers.append(f"{path.relative_to(package)}:{node.lineno}")
    assert len(callers) == 1 and callers[0].startswith("upstream/connect.py:"), callers
