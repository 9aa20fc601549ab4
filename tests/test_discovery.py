"""SRV replica discovery (issue 5, table key `endpoints_srv`): a real DNS server on 127.0.0.1 whose SRV
records and TTLs the tests change, real replica servers, and the real gateway in front of them."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import uvloop

from gateway.dns import Resolver
from gateway.metrics import Metrics
from gateway.routing.loader import compile_table, load_table
from gateway.routing.model import Table, Upstream
from gateway.routing.resolve import Call, Route, resolve
from gateway.upstream.balance import Health, replica_count
from gateway.upstream.connect import Connector
from gateway.upstream.discovery import srv_upstreams
from gateway.upstream.replicas import ReplicaSets
from tests.dnsserver import DNSServer
from tests.support import DEMO_KEY, example_doc, loader_problems, running_gateway, write_table
from tests.test_upstreams import HOST, Replica

SRV = "_http._tcp.v1.test"


def srv(*replicas: tuple[str, int]) -> list[str]:
    """SRV record texts for (target, port) pairs, all at priority 10, weight 5."""
    return [f"10 5 {port} {target}." for target, port in replicas]


def srv_doc(dns: DNSServer, *, networks: list[str] | None = None) -> dict:
    doc = example_doc("http://127.0.0.1:9", "http://127.0.0.1:9")  # v1 never uses the plane url
    doc["gateway"]["dns"] = {"nameservers": [dns.address]}
    doc["models"]["abc123"]["deployments"]["v1"]["endpoints_srv"] = SRV
    if networks is not None:
        doc["regions"]["us"]["networks"] = networks
    return doc


async def call(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    """One predict call: (status, the replica's name or the gateway's error_code)."""
    async with session.post(url + "/production/predict", headers=HOST, data=b"{}") as r:
        body = await r.json()
        return r.status, body.get("replica") or body.get("error_code", "?")


async def call_until(session: aiohttp.ClientSession, url: str, done: Callable[[tuple[int, str]], bool]) -> None:
    """Call (a bounded number of times, 20 s at most) until `done(result)`."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if done(await call(session, url)):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the gateway never gave the expected answer")


# -- pure ---------------------------------------------------------------------------------------------


def test_srv_targets_become_replica_addresses_with_the_planes_scheme() -> None:
    pairs = [("a.test", 8000), ("b.test", 8001), ("a.test", 8000)]
    assert srv_upstreams(pairs, "https") == (Upstream("https", "a.test", 8000), Upstream("https", "b.test", 8001))
    assert srv_upstreams([], "http") == ()


# -- through the gateway ---------------------------------------------------------------------------------


def test_replicas_follow_the_srv_records(tmp_path: Path) -> None:
    """A replica added to the SRV records receives calls; a removed one stops receiving them."""

    async def scenario() -> None:
        a, b = await Replica("a").start(), await Replica("b").start()
        async with DNSServer() as dns:
            dns.set("ra.test", "A", "127.0.0.1", ttl=30)
            dns.set("rb.test", "A", "127.0.0.1", ttl=30)
            dns.set(SRV, "SRV", *srv(("ra.test", a.port)), ttl=1)
            with running_gateway(write_table(tmp_path / "t.yaml", srv_doc(dns))) as gw:
                async with aiohttp.ClientSession() as session:
                    await call_until(session, gw.url, lambda r: r[0] == 200)
                    assert [await call(session, gw.url) for _ in range(10)] == [(200, "a")] * 10

                    dns.set(SRV, "SRV", *srv(("ra.test", a.port), ("rb.test", b.port)), ttl=1)
                    await call_until(session, gw.url, lambda r: r == (200, "b"))  # discovered: b serves

                    dns.set(SRV, "SRV", *srv(("rb.test", b.port)), ttl=1)
                    streak = 0

                    def only_b(result: tuple[int, str]) -> bool:
                        nonlocal streak
                        assert result[0] == 200
                        streak = streak + 1 if result[1] == "b" else 0
                        return streak >= 20  # with a still listed, 20 b's in a row are a 1-in-a-million draw

                    await call_until(session, gw.url, only_b)
                    a_calls = a.calls
                    assert [await call(session, gw.url) for _ in range(30)] == [(200, "b")] * 30
                    assert a.calls == a_calls  # removed: a receives nothing any more
        await a.stop()
        await b.stop()

    asyncio.run(scenario())


def test_an_srv_target_outside_the_region_never_receives_a_connection(tmp_path: Path) -> None:
    accepted: list[str] = []

    async def scenario() -> tuple[list[tuple[int, str]], str]:
        a = await Replica("a").start()

        async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append("connection")
            writer.close()

        outside = await asyncio.start_server(count, "127.0.0.4", 0)
        outside_port = outside.sockets[0].getsockname()[1]
        async with DNSServer() as dns:
            dns.set("ra.test", "A", "127.0.0.1", ttl=30)
            dns.set("r4.test", "A", "127.0.0.4", ttl=30)
            dns.set(SRV, "SRV", *srv(("ra.test", a.port), ("r4.test", outside_port)), ttl=1)
            doc = srv_doc(dns, networks=["127.0.0.1/32"])
            with running_gateway(write_table(tmp_path / "t.yaml", doc)) as gw:
                async with aiohttp.ClientSession() as session:
                    await call_until(session, gw.url, lambda r: r[0] == 200)
                    # r4 is picked now and then: refused before connecting, retried on a
                    results = [await call(session, gw.url) for _ in range(30)]
                    dns.set(SRV, "SRV", *srv(("r4.test", outside_port)), ttl=1)  # only the outside target left
                    await call_until(session, gw.url, lambda r: r[0] == 503)
                    results.append(await call(session, gw.url))
                _, metrics = gw.admin("GET", "/metrics")
        outside.close()
        await a.stop()
        return results, str(metrics)

    results, metrics = asyncio.run(scenario())
    assert accepted == []  # fail closed: not one connection to the outside target
    assert results[:30] == [(200, "a")] * 30
    assert results[30] == (503, "model_unavailable")
    assert re.search(r'gateway_dns_region_violations_total\{region="us",host="r4.test"\} [1-9]', metrics)


def test_no_srv_answer_is_503_then_records_appear_and_survive_a_resolver_outage(tmp_path: Path) -> None:
    async def scenario() -> None:
        a = await Replica("a").start()
        async with DNSServer(negative_ttl=1) as dns:
            dns.set("ra.test", "A", "127.0.0.1", ttl=60)
            with running_gateway(write_table(tmp_path / "t.yaml", srv_doc(dns))) as gw:
                async with aiohttp.ClientSession() as session:
                    async with session.post(gw.url + "/production/predict", headers=HOST, data=b"{}") as r:
                        assert r.status == 503
                        assert (await r.json())["error_code"] == "model_unavailable"  # NXDOMAIN: no replicas

                    dns.set(SRV, "SRV", *srv(("ra.test", a.port)), ttl=1)
                    await call_until(session, gw.url, lambda r: r == (200, "a"))

                    dns.mode = "drop"  # the resolver stops answering: the last answer is served stale
                    asked = dns.queries[SRV.lower()]
                    deadline = time.monotonic() + 20
                    while dns.queries[SRV.lower()] < asked + 2 and time.monotonic() < deadline:
                        assert await call(session, gw.url) == (200, "a")
                        await asyncio.sleep(0.1)
                    assert dns.queries[SRV.lower()] >= asked + 2  # asked again past its TTL, and failed
                    assert [await call(session, gw.url) for _ in range(5)] == [(200, "a")] * 5
        await a.stop()

    asyncio.run(scenario())


# -- in process: health state kept across changes, work stopped with the deployment ------------------


def route_for(table: Table) -> Route:
    found = resolve(table, Call("POST", "model-abc123.api.example.com", "/production/predict", f"Api-Key {DEMO_KEY}"))
    assert isinstance(found, Route)
    return found


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 20
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def test_discovery_keeps_the_health_of_replicas_that_stay_and_stops_with_the_deployment() -> None:
    async def scenario() -> None:
        async with DNSServer(negative_ttl=1) as dns:
            dns.set(SRV, "SRV", *srv(("ra.test", 8001), ("rb.test", 8002)), ttl=1)
            table = compile_table(srv_doc(dns))
            resolver = Resolver((dns.address,), timeout=0.5)
            sets = ReplicaSets(Connector(resolver=resolver), Metrics())
            sets.sync(table)
            route = route_for(table)
            first = sets.get(route)
            assert first.replica_count() == 0 and first.pick() is None
            assert first.unavailable is not None and SRV in first.unavailable
            await until(lambda: len(sets.get(route).endpoints) == 2, "the first answer")
            endpoints = sets.get(route)
            a, b = endpoints.endpoints
            assert (a.upstream, b.upstream) == (Upstream("http", "ra.test", 8001), Upstream("http", "rb.test", 8002))
            endpoints.health_result(a, healthy=False)
            assert (a.state, a.ejections) == (Health.EJECTED, 1)
            # Below, a stays the same object with its ejection level; its state is EJECTED, or PROBING
            # if its 5 s back-off ran out on a slow machine (`updated` notices expiries) - never HEALTHY.
            out = (Health.EJECTED, Health.PROBING)

            dns.set(SRV, "SRV", *srv(("ra.test", 8001), ("rb.test", 8002), ("rc.test", 8003)), ttl=1)
            await until(lambda: len(sets.get(route).endpoints) == 3, "the added replica")
            grown = sets.get(route)
            assert grown.endpoints[:2] == (a, b) and a.state in out and a.ejections == 1  # the same objects
            assert grown.replica_count() == 3 and replica_count(route.deployment, 3) == 3
            assert first.replica_count() == 3  # an old reference forwards to the newest set

            dns.set(SRV, "SRV", *srv(("ra.test", 8001), ("rc.test", 8003)), ttl=1)
            await until(lambda: len(sets.get(route).endpoints) == 2, "the removed replica")
            assert sets.get(route).endpoints[0] is a and a.state in out and a.ejections == 1

            dns.remove(SRV)  # NXDOMAIN: nothing left to call, with the reason
            await until(lambda: not sets.get(route).endpoints, "the replicas to go")
            gone = sets.get(route)
            assert gone.replica_count() == 0 and gone.pick_or_least_loaded() is None
            assert gone.unavailable is not None and "NXDOMAIN" in gone.unavailable
            assert repr(gone).startswith("<EndpointSet no endpoints | unavailable: no replicas of deployment 'v1'")

            # A table without the deployment's SRV key: discovery stops, no more SRV queries.
            discovery = sets.discovery("abc123", "v1")
            assert discovery is not None and discovery.running
            doc = srv_doc(dns)
            del doc["models"]["abc123"]["deployments"]["v1"]["endpoints_srv"]
            sets.sync(compile_table(doc))
            assert not discovery.running and sets.discovery("abc123", "v1") is None
            await resolver.wait_idle()  # a query the stopped discovery had started may still be sent
            asked = dns.queries[SRV.lower()]
            await asyncio.sleep(2.5)  # more than two TTLs and negative TTLs
            assert dns.queries[SRV.lower()] == asked
            resolver.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


def test_close_stops_discovery() -> None:
    async def scenario() -> None:
        async with DNSServer() as dns:
            dns.set(SRV, "SRV", *srv(("ra.test", 8001)), ttl=1)
            resolver = Resolver((dns.address,), timeout=0.5)
            sets = ReplicaSets(Connector(resolver=resolver), Metrics())
            sets.sync(compile_table(srv_doc(dns)))
            discovery = sets.discovery("abc123", "v1")
            assert discovery is not None
            await until(lambda: discovery.answers == 1, "the first answer")
            assert repr(discovery) == f"<SrvDiscovery {SRV} running | ra.test:8001>"
            sets.close()
            assert not discovery.running
            resolver.close()

    asyncio.run(scenario())


# -- the table ------------------------------------------------------------------------------------------


def test_endpoints_srv_in_the_table() -> None:
    doc = example_doc("https://plane.test:8443", "http://127.0.0.1:9")
    deps = doc["models"]["abc123"]["deployments"]
    deps["v1"]["endpoints_srv"] = "_HTTPS._tcp.V1.Models.Internal."
    table = compile_table(doc)
    v1 = table.models["abc123"].deployments["v1"]
    assert v1.endpoints_srv == "_https._tcp.v1.models.internal" and v1.endpoints == ()

    deps["v1"]["endpoints"] = ["http://10.0.0.1:8000"]
    deps["v1"]["replicas"] = 2
    deps["v2"]["endpoints_srv"] = "not a name!"
    deps["v3"]["endpoints_srv"] = "10.0.0.1"
    deps["dev"]["endpoints_srv"] = 7
    assert loader_problems(doc) == [
        "models.abc123.deployments.dev.endpoints_srv: expected a string, got the integer 7 (YAML read it as a "
        "number or boolean; quote it)",
        "models.abc123.deployments.v1.endpoints_srv: endpoints and endpoints_srv exclude each other: list the "
        "replicas or discover them, not both",
        "models.abc123.deployments.v1.replicas: with endpoints_srv the replica count is the number of SRV targets "
        "discovered; remove replicas",
        "models.abc123.deployments.v2.endpoints_srv: 'not a name!' is not a valid SRV name (like "
        "_http._tcp.v1.models.internal)",
        "models.abc123.deployments.v3.endpoints_srv: '10.0.0.1' is an address, not an SRV name; list addresses "
        "under endpoints",
    ]


def test_the_replicas_example_table_compiles() -> None:
    table = load_table(Path(__file__).resolve().parents[1] / "routing_config" / "replicas.yaml")
    deps = table.models["abc123"].deployments
    assert deps["v1"].endpoints_srv == "_https._tcp.v1.abc123.models.internal"
    assert deps["v2"].health_check is not None and deps["v2"].health_check.interval_seconds == 2
    assert deps["v3"].health_check is None
