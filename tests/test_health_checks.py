"""Active health checks of replicas (issue 5, table key `health_check`): the rules pure, one probe
against real servers, the prober with the real balancer, and the real gateway with replicas whose
/healthz the tests flip."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from gateway.dns import Resolver
from gateway.errors import ModelUnavailable
from gateway.metrics import Metrics
from gateway.routing.loader import compile_table
from gateway.routing.model import HealthCheck, Upstream
from gateway.upstream.balance import EndpointSet, Health
from gateway.upstream.connect import Connector
from gateway.upstream.health import FRESH, RULES, HealthProber, ProbeView, View, classify, observe, probe, probe_head
from gateway.upstream.replicas import ReplicaSets
from tests.dnsserver import DNSServer
from tests.support import example_doc, loader_problems, running_gateway, write_table
from tests.test_upstreams import HOST, Replica

FAST = {"path": "/healthz", "interval_seconds": 0.1, "timeout_seconds": 0.5, "unhealthy_threshold": 2,
        "healthy_threshold": 1}  # fmt: skip


# -- the rules, pure -------------------------------------------------------------------------------------


def run_probes(results: str, unhealthy: int = 2, healthy: int = 1) -> str:
    """Feed 'P'ass/'F'ail results; return what was reported per probe: '-' nothing, 'U'nhealthy, 'H'ealthy."""
    check = HealthCheck(unhealthy_threshold=unhealthy, healthy_threshold=healthy)
    state, out = FRESH, ""
    for r in results:
        state, report = observe(state, r == "P", check)
        out += "-" if report is None else ("H" if report else "U")
    return out


@pytest.mark.parametrize(
    ("results", "unhealthy", "healthy", "reports"),
    [
        ("PPPP", 2, 1, "----"),
        ("FPFP", 2, 1, "----"),  # failures not in a row never eject
        ("FF", 2, 1, "-U"),
        ("FFFF", 2, 1, "-UUU"),  # every failure while unhealthy keeps it out
        ("FFP", 2, 1, "-UH"),
        ("FFPFP", 2, 2, "-U-U-"),  # a pass not followed by enough passes is not a recovery
        ("FFPPP", 2, 2, "-U-H-"),
        ("F", 1, 1, "U"),
        ("FFFPFFF", 3, 1, "--UH--U"),
    ],
)
def test_observe_reports(results: str, unhealthy: int, healthy: int, reports: str) -> None:
    assert run_probes(results, unhealthy, healthy) == reports


def test_rules_cover_every_case() -> None:
    assert set(RULES) == {(v, p, r) for v in View for p in (True, False) for r in (True, False)}
    assert observe(ProbeView(View.UNHEALTHY, 0), True, HealthCheck(healthy_threshold=2)) == (
        ProbeView(View.UNHEALTHY, 1),
        None,
    )


@pytest.mark.parametrize(
    ("line", "result"),
    [
        (b"HTTP/1.1 200 OK\r\n", "healthy"),
        (b"HTTP/1.0 204 No Content\r\n", "healthy"),
        (b"HTTP/1.1 299\r\n", "healthy"),
        (b"HTTP/1.1 301 Moved\r\n", "bad_status"),
        (b"HTTP/1.1 503 Service Unavailable\r\n", "bad_status"),
        (b"HTTP/1.1 2000 OK\r\n", "bad_status"),
        (b"SSH-2.0-OpenSSH\r\n", "bad_status"),
        (b"", "bad_status"),
    ],
)
def test_classify(line: bytes, result: str) -> None:
    assert classify(line) == result


def test_probe_head_carries_the_identity() -> None:
    head = probe_head(Upstream("http", "r1.test", 8000), "/healthz?deep=1", "abc123", "v1")
    assert head.startswith(b"GET /healthz?deep=1 HTTP/1.1\r\nhost: r1.test:8000\r\n")
    assert b"x-baseten-model-id: abc123\r\n" in head and b"x-baseten-deployment-id: v1\r\n" in head
    assert head.endswith(b"connection: close\r\n\r\n")


# -- one probe against real servers --------------------------------------------------------------------------


async def loopback(up: Upstream) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", up.port)


def test_probe_results_against_real_servers() -> None:
    async def scenario() -> list[str]:
        replica = await Replica("a").start()
        up = Upstream("http", "127.0.0.1", replica.port)
        head = probe_head(up, "/healthz", "abc123", "v1")
        results = [await probe(up, head, 1.0, loopback)]
        replica.healthy = False
        results.append(await probe(up, head, 1.0, loopback))
        await replica.stop()
        results.append(await probe(up, head, 1.0, loopback))  # nothing listens any more

        silent_conns: list[asyncio.StreamWriter] = []

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            silent_conns.append(writer)  # reads, never answers

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        mute = Upstream("http", "127.0.0.1", server.sockets[0].getsockname()[1])
        results.append(await probe(mute, head, 0.2, loopback))

        async def refused(up: Upstream) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            raise ModelUnavailable("plane host 'x' resolves outside region 'us' networks")

        results.append(await probe(up, head, 1.0, refused))
        for writer in silent_conns:
            writer.close()
        server.close()
        await server.wait_closed()
        assert replica.health_checks[0]["x-baseten-deployment-id"] == "v1"
        assert replica.health_checks[0]["user-agent"] == "baseten-gateway-health-check"
        return results

    assert asyncio.run(scenario()) == ["healthy", "bad_status", "connection_error", "timeout", "no_address"]


# -- the prober with the real balancer ------------------------------------------------------------------------


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 15
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def test_prober_ejects_unhealthy_replicas_never_more_than_half_and_returns_them() -> None:
    async def scenario() -> None:
        replicas = [await Replica(name).start() for name in "abcd"]
        ups = {Upstream("http", "127.0.0.1", r.port): r for r in replicas}
        endpoints = EndpointSet(("abc123", "v1"), list(ups))
        metrics = Metrics()

        async def probe_one(up: Upstream) -> str:
            return await probe(up, probe_head(up, "/healthz", "abc123", "v1"), 1.0, loopback)

        check = HealthCheck(interval_seconds=0.05, unhealthy_threshold=2, healthy_threshold=1)
        prober = HealthProber(("abc123", "v1"), check, lambda: endpoints, probe_one, metrics).start()
        a, b, c, d = endpoints.endpoints
        for r in replicas[:3]:
            r.healthy = False  # three of four fail their checks
        await until(lambda: prober.rounds >= 6 and endpoints.ejected_count() == 2, "two ejections")
        rounds = prober.rounds
        await until(lambda: prober.rounds >= rounds + 5, "more rounds")
        assert endpoints.ejected_count() == 2  # the cap: never more than half of four
        assert d.state is Health.HEALTHY
        assert sum(ep.state is Health.EJECTED for ep in (a, b, c)) == 2
        assert endpoints.refused_ejections > 0  # the third is tried again at each failed probe
        assert "4 replicas, 3 unhealthy" in repr(prober)
        assert metrics.health_checks.get(("abc123", "v1", "bad_status")) >= 9

        for r in replicas:
            r.healthy = True
        await until(lambda: endpoints.ejected_count() == 0, "the replicas to return")
        assert {ep.state for ep in (a, b, c)} <= {Health.PROBING, Health.HEALTHY}
        assert "4 replicas, 0 unhealthy" in repr(prober)
        prober.stop()
        assert not prober.running
        for r in replicas:
            await r.stop()

    asyncio.run(scenario())


def test_probes_never_connect_outside_the_region_and_stop_with_the_deployment() -> None:
    accepted: list[str] = []

    async def scenario() -> None:
        a = await Replica("a").start()

        async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append("connection")
            writer.close()

        outside = await asyncio.start_server(count, "127.0.0.4", 0)
        outside_port = outside.sockets[0].getsockname()[1]
        async with DNSServer() as dns:
            dns.set("r4.test", "A", "127.0.0.4", ttl=30)
            doc = example_doc("http://127.0.0.1:9", "http://127.0.0.1:9")
            doc["gateway"]["dns"] = {"nameservers": [dns.address]}
            doc["regions"]["us"]["networks"] = ["127.0.0.1/32"]
            dep = doc["models"]["abc123"]["deployments"]["v1"]
            dep["endpoints"] = [a.url, f"http://r4.test:{outside_port}"]
            dep["health_check"] = FAST
            resolver = Resolver((dns.address,), timeout=0.5)
            metrics = Metrics()
            sets = ReplicaSets(Connector(resolver=resolver), metrics)
            sets.sync(compile_table(doc))
            prober = sets.prober("abc123", "v1")
            assert prober is not None and prober.running
            await until(lambda: metrics.health_checks.get(("abc123", "v1", "no_address")) >= 3, "refused probes")
            assert metrics.health_checks.get(("abc123", "v1", "healthy")) >= 3
            assert a.health_checks and a.health_checks[-1]["x-baseten-model-id"] == "abc123"

            del dep["health_check"]  # a reload without health checks: the probes stop
            sets.sync(compile_table(doc))
            assert not prober.running and sets.prober("abc123", "v1") is None
            dep["health_check"] = FAST
            sets.sync(compile_table(doc))
            again = sets.prober("abc123", "v1")
            assert again is not None and again.running
            sets.close()  # the gateway shuts down
            assert not again.running
            resolver.close()
        outside.close()
        await a.stop()

    asyncio.run(scenario())
    assert accepted == []


# -- through the gateway ---------------------------------------------------------------------------------------


async def call(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.post(url + "/production/predict", headers=HOST, data=b"{}") as r:
        body = await r.json()
        return r.status, body.get("replica") or body.get("error_code", "?")


def replicas_table(tmp_path: Path, replicas: list[Replica], health_check: dict | None) -> Path:
    doc = example_doc(replicas[0].url, replicas[0].url)
    dep = doc["models"]["abc123"]["deployments"]["v1"]
    dep["endpoints"] = [r.url for r in replicas]
    if health_check is not None:
        doc["planes"]["us-east-1"]["health_check"] = health_check  # inherited by the deployment
    return write_table(tmp_path / "t.yaml", doc)


def test_an_unhealthy_replica_stops_receiving_calls_and_comes_back(tmp_path: Path) -> None:
    async def scenario() -> None:
        replicas = [await Replica(name).start() for name in "abc"]
        a, b, c = replicas
        with running_gateway(replicas_table(tmp_path, replicas, FAST)) as gw:
            async with aiohttp.ClientSession() as session:
                await until(lambda: len(b.health_checks) >= 2, "probes")
                assert b.health_checks[-1]["x-baseten-deployment-id"] == "v1"
                assert {name for _, name in [await call(session, gw.url) for _ in range(40)]} == {"a", "b", "c"}

                b.healthy = False
                seen = len(b.health_checks)
                await until(lambda: len(b.health_checks) >= seen + 3, "failed probes")  # 2 failures eject
                b_calls = b.calls
                results = [await call(session, gw.url) for _ in range(40)]
                assert all(status == 200 for status, _ in results)
                assert b.calls == b_calls  # ejected: no calls

                b.healthy = True
                deadline = time.monotonic() + 15
                while b.calls == b_calls and time.monotonic() < deadline:
                    assert (await call(session, gw.url))[0] == 200
                    await asyncio.sleep(0.05)
                assert b.calls > b_calls  # healthy again: back in rotation
            _, metrics = gw.admin("GET", "/metrics")
            assert re.search(r'gateway_health_checks_total\{model="abc123",deployment="v1",result="bad_status"\} [1-9]',
                             str(metrics))  # fmt: skip

            # A reload without health checks stops the probes.
            replicas_table(tmp_path, replicas, None)
            status, _ = gw.admin("POST", "/v1/routing/reload")
            assert status == 200
            await asyncio.sleep(0.5)  # a probe in flight during the reload may still land
            probes = [len(r.health_checks) for r in replicas]
            await asyncio.sleep(1.0)  # ten intervals
            assert [len(r.health_checks) for r in replicas] == probes
        for r in replicas:
            await r.stop()

    asyncio.run(scenario())


def test_never_more_than_half_of_a_deployment_is_ejected_by_health_checks(tmp_path: Path) -> None:
    async def scenario() -> None:
        replicas = [await Replica(name).start() for name in "ab"]
        for r in replicas:
            r.healthy = False  # both fail: one may be ejected, the other must keep serving
        with running_gateway(replicas_table(tmp_path, replicas, FAST)) as gw:
            await until(lambda: all(len(r.health_checks) >= 4 for r in replicas), "failed probes")
            async with aiohttp.ClientSession() as session:
                results = [await call(session, gw.url) for _ in range(30)]
        assert all(status == 200 for status, _ in results)
        assert len({name for _, name in results}) == 1  # one ejected, the other takes every call
        for r in replicas:
            await r.stop()

    asyncio.run(scenario())


# -- the table ----------------------------------------------------------------------------------------------


def test_health_check_in_the_table_most_specific_wins_field_by_field() -> None:
    doc = example_doc("http://127.0.0.1:9001", "http://127.0.0.1:9002")
    doc["planes"]["us-east-1"]["health_check"] = {"path": "/ready", "interval_seconds": 2}
    deps = doc["models"]["abc123"]["deployments"]
    deps["v1"]["health_check"] = {"timeout_seconds": 0.5, "unhealthy_threshold": 3}
    deps["v2"]["health_check"] = {"enabled": False}
    deps["v3"]["health_check"] = {}
    table = compile_table(doc)
    plane_check = HealthCheck(path="/ready", interval_seconds=2.0)
    assert table.planes["us-east-1"].health_check == plane_check
    assert table.planes["eu-west-1"].health_check is None
    model = table.models["abc123"]
    assert model.deployments["v1"].health_check == HealthCheck("/ready", 2.0, 0.5, 3, 1)
    assert model.deployments["v2"].health_check is None  # switched off under a plane that has it
    assert model.deployments["v3"].health_check == HealthCheck()  # defaults: GET /healthz every 5 s
    assert model.deployments["dev"].health_check == plane_check  # inherited

    doc["planes"]["us-east-1"]["health_check"] = {"path": "healthz", "interval_seconds": 0, "color": "red"}
    deps["v1"]["health_check"] = {"timeout_seconds": -1, "unhealthy_threshold": 0, "healthy_threshold": 1.5,
                                  "path": "/a b", "enabled": "yes"}  # fmt: skip
    assert loader_problems(doc) == [
        "models.abc123.deployments.v1.health_check.enabled: expected true or false, got the string 'yes'",
        "models.abc123.deployments.v1.health_check.healthy_threshold: expected an integer, got the number 1.5",
        "models.abc123.deployments.v1.health_check.path: '/a b' is not a request path starting with '/' (visible "
        "ASCII, no spaces)",
        "models.abc123.deployments.v1.health_check.timeout_seconds: must be greater than 0, got -1",
        "models.abc123.deployments.v1.health_check.unhealthy_threshold: must be at least 1, got 0",
        "planes.us-east-1.health_check.color: unknown key 'color' (allowed: enabled, path, interval_seconds, "
        "timeout_seconds, unhealthy_threshold, healthy_threshold)",
        "planes.us-east-1.health_check.interval_seconds: must be greater than 0, got 0",
        "planes.us-east-1.health_check.path: 'healthz' is not a request path starting with '/' (visible ASCII, no "
        "spaces)",
    ]
