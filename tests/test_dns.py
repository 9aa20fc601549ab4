"""DNS for plane hosts (SPEC §8, issue 5): real queries over UDP/TCP to a DNS server on 127.0.0.1.

The resolver's clock is injected (`Clock`) so TTLs, refresh points and stale windows are crossed by
advancing it, not by sleeping; only query timeouts (a server told to stay silent) take real time,
0.2 s each. Held answers (`DNSServer.hold`) show when a caller did or did not wait on a query.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop
from hypothesis import given
from hypothesis import strategies as st

from gateway.dns import Resolver, allowed, parse_nameserver
from gateway.errors import ModelUnavailable
from gateway.metrics import Metrics
from tests.dnsserver import DNSServer

T = TypeVar("T")
HOST = "plane.test"
TIMEOUT = 0.2  # real seconds a query waits for a silent server


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Setup:
    server: DNSServer
    resolver: Resolver
    clock: Clock
    metrics: Metrics

    def queries(self, name: str = HOST, rdtype: str | None = None) -> int:
        if rdtype is None:
            return self.server.queries[name]
        return self.server.queries_by_type[(name, rdtype)]

    def lookups(self, result: str) -> float:
        return self.metrics.dns_lookups.get((result,))


def run(scenario: Callable[[], Awaitable[T]]) -> T:
    """Run on uvloop, the gateway's event loop."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(scenario())  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def dns_setup(soa_minimum: int = 2, **options: Any) -> AsyncIterator[Setup]:
    """A DNS server, a resolver asking it (fake clock, 0.2 s query timeout) and its metrics."""
    clock, metrics = Clock(), Metrics()
    async with DNSServer(negative_ttl=soa_minimum) as server:
        resolver = Resolver((server.address,), metrics=metrics, clock=clock, timeout=TIMEOUT, **options)
        try:
            yield Setup(server, resolver, clock, metrics)
        finally:
            resolver.close()


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


# -- resolution and caching ------------------------------------------------------------------------


def test_resolves_a_name_through_a_real_server() -> None:
    async def scenario() -> None:
        async with dns_setup() as s:
            s.server.set(HOST, "A", "10.0.0.1", ttl=10)
            assert await s.resolver.resolve(HOST) == ("10.0.0.1",)
            assert s.queries(rdtype="A") == 1 and s.queries(rdtype="AAAA") == 1
            assert s.lookups("ok") == 1
            assert repr(s.resolver) == "<Resolver 1 names cached | 0 refreshing | 0 stale>"

    run(scenario)


def test_a_and_aaaa_both_returned_ipv4_first() -> None:
    async def scenario() -> None:
        async with dns_setup() as s:
            s.server.set(HOST, "AAAA", "fd00::2", "fd00::1", ttl=10)
            s.server.set(HOST, "A", "10.0.0.1", "10.0.0.2", ttl=10)
            addresses = await s.resolver.resolve(HOST)
            assert sorted(addresses[:2]) == ["10.0.0.1", "10.0.0.2"]  # answer order is the server's shuffle
            assert sorted(addresses[2:]) == ["fd00::1", "fd00::2"]

    run(scenario)


def test_a_and_aaaa_are_queried_concurrently_and_callers_share_one_query() -> None:
    async def scenario() -> None:
        async with dns_setup() as s:
            s.server.set(HOST, "A", "10.0.0.1", ttl=10)
            s.server.set(HOST, "AAAA", "fd00::1", ttl=10)
            gate = s.server.hold()
            callers = [asyncio.create_task(s.resolver.resolve(HOST)) for _ in range(50)]
            # Both questions reach the server while neither has been answered: they run at once.
            await until(lambda: s.queries(rdtype="A") == 1 and s.queries(rdtype="AAAA") == 1, "A and AAAA")
            assert repr(s.resolver) == "<Resolver 0 names cached | 1 refreshing | 0 stale>"
            gate.set()
            assert set(await asyncio.gather(*callers)) == {("10.0.0.1", "fd00::1")}
            assert s.queries() == 2

    run(scenario)


def test_case_and_trailing_dot_share_the_cache() -> None:
    async def scenario() -> None:
        async with dns_setup() as s:
            s.server.set(HOST, "A", "10.0.0.1", ttl=10)
            for host in (HOST, "PLANE.Test", "plane.test."):
                assert await s.resolver.resolve(host) == ("10.0.0.1",)
            assert s.queries() == 2

    run(scenario)


def test_cached_within_ttl() -> None:
    async def scenario() -> None:
        async with dns_setup() as s:
            s.server.set(HOST, "A", "10.0.0.1", ttl=10)
            await s.resolver.resolve(HOST)
            s.server.set(HOST, "A", "10.0.0.2", ttl=10)  # changed, but the cached answer is still valid
            for _ in range(5):
                s.clock.advance(1)  # up to 5 s: before the refresh point (7.5 s)
                assert await s.resolver.resolve(HOST) == ("10.0.0.1",)
            assert s.queries() == 2

    run(scenario)


def test_requeried_after_ttl() -> None:
    async def scenario() -> None:
        async with dns_setup() as s:
            s.server.set(HOST, "A", "10.0.0.1", ttl=1)
            await s.resolver.resolve(HOST)
            s.server.set(HOST, "A", "10.0.0.2", ttl=1)
            s.clock.advance(1.0)  # exactly at expiry: expired
            assert await s.resolver.resolve(HOST) == ("10.0.0.2",)
            assert s.queries() == 4

    run(scenario)


@pytest.mark.parametrize(
    ("server_ttl", "expires"),
    [
        (0, 1.0),  # TTL 0 is raised to min_ttl (1 s)
        (86400, 300.0),  # a day is cut to max_ttl (300 s)
        (60, 60.0),  # in between: the server's TTL
    ],
)
def test_ttl_is_clamped(server_ttl: int, expires: float) -> None:
    async def scenario() -> None:
        async with dns_setup() as s:
            early = s.resolver
            late = Resolver((s.server.address,), clock=s.clock, timeout=TIMEOUT)
            s.server.set(HOST, "A", "10.0.0.1", ttl=server_ttl)
            await early.resolve(HOST)
            await late.resolve(HOST)
            s.server.set(HOST, "A", "10.0.0.2", ttl=server_ttl)
            gate = s.server.hold()
            s.clock.advance(expires - 0.25)
            assert await early.resolve(HOST) == ("10.0.0.1",)  # not expired yet (any refresh is held)
            early.close()
            gate.set()
            s.server.gate = None
            s.clock.advance(0.25)
            assert await late.resolve(HOST) == ("10.0.0.2",)  # expired: this caller waited for the new answer
            late.close()

    run(scenario)


def test_background_refresh_picks_up_a_change_without_a_caller_waiting() -> None:
    async def scenario() -> None:
        async with dns_setup() as s:
            s.server.set(HOST, "A", "10.0.0.1", ttl=8)
            await s.resolver.resolve(HOST)
            s.server.set(HOST, "A", "10.0.0.2", ttl=8)
            gate = s.server.hold()  # the refresh's answer is held: a caller waiting for it would hang
            s.clock.advance(7)  # last quarter of the TTL (6..8 s)
            assert await s.resolver.resolve(HOST) == ("10.0.0.1",)  # returned while the query is held
            await until(lambda: s.queries(rdtype="A") == 2, "the background refresh")
            assert repr(s.resolver) == "<Resolver 1 names cached | 1 refreshing | 0 stale>"
            gate.set()
            await s.resolver.wait_idle()
            s.server.gate = None
            s.clock.advance(2)  # past the first answer's expiry; the refreshed one is fresh
            assert await s.resolver.resolve(HOST) == ("10.0.0.2",)
            assert s.queries(rdtype="A") == 2  # that caller did not query

    run(scenario)


def test_a_name_nobody_uses_is_not_refreshed() -> None:
    async def scenario() -> None:
        async with dns_setup() as s:
            s.server.set(HOST, "A", "10.0.0.1", ttl=4)
            await s.resolver.resolve(HOST)
            s.clock.advance(3.5)  # in the refresh window, but nobody asks
            await asyncio.sleep(0.05)
            assert s.queries() == 2
            assert repr(s.resolver) == "<Resolver 1 names cached | 0 refreshing | 0 stale>"

    run(scenario)


def test_a_caller_giving_up_does_not_cancel_the_shared_query() -> None:
    async def scenario() -> None:
        async with dns_setup() as s:
            s.server.set(HOST, "A", "10.0.0.1", ttl=10)
            gate = s.server.hold()
            first = asyncio.create_task(s.resolver.resolve(HOST))
            second = asyncio.create_task(s.resolver.resolve(HOST))
            await until(lambda: s.queries() == 2, "the query")
            first.cancel()
            gate.set()
            assert await second == ("10.0.0.1",)
            with pytest.raises(asyncio.CancelledError):
                await first
            assert s.queries() == 2

    run(scenario)


def test_a_large_answer_is_fetched_over_tcp() -> None:
    async def scenario() -> None:
        async with dns_setup() as s:
            many = [f"10.1.{i}.{j}" for i in range(4) for j in range(1, 41)]
            s.server.set(HOST, "A", *many, ttl=10)
            assert sorted(await s.resolver.resolve(HOST)) == sorted(many)
            assert s.queries(rdtype="A") == 2  # truncated over UDP, then again over TCP

    run(scenario)


def test_the_next_nameserver_answers_when_the_first_is_silent() -> None:
    async def scenario() -> None:
        async with DNSServer() as silent, DNSServer() as working:
            silent.mode = "drop"
            working.set(HOST, "A", "10.0.0.1", ttl=10)
            resolver = Resolver((silent.address, working.address), timeout=1.0)
            assert await resolver.resolve(HOST) == ("10.0.0.1",)
            assert silent.queries[HOST] >= 1 and working.queries[HOST] >= 1
            resolver.close()

    run(scenario)


def test_resolution_works_on_the_stock_asyncio_loop() -> None:
    async def scenario() -> None:
        async with dns_setup() as s:
            s.server.set(HOST, "A", "10.0.0.1", ttl=10)
            assert await s.resolver.resolve(HOST) == ("10.0.0.1",)

    asyncio.run(scenario())


# -- failures: stale answers, negative answers -----------------------------------------------------


@pytest.mark.parametrize("outage", ["drop", "servfail"])
def test_stale_answer_served_while_the_resolver_fails_then_503(outage: str) -> None:
    async def scenario() -> None:
        async with dns_setup(stale_seconds=30.0, retry_seconds=1.0) as s:
            s.server.set(HOST, "A", "10.0.0.1", ttl=10)
            await s.resolver.resolve(HOST)
            s.server.mode = outage  # type: ignore[assignment]
            s.clock.advance(11)  # expired 1 s ago
            assert await s.resolver.resolve(HOST) == ("10.0.0.1",)  # the query failed: stale
            assert s.queries() == 4 and s.lookups("failed") == 1 and s.lookups("stale_served") == 1
            assert repr(s.resolver) == "<Resolver 0 names cached | 0 refreshing | 1 stale>"
            # Within retry_seconds of the failure, the stale answer comes at once, without a query.
            assert await s.resolver.resolve(HOST) == ("10.0.0.1",)
            assert s.queries() == 4
            # Later, the stale answer still comes at once while a retry runs in the background.
            s.clock.advance(1.5)
            assert await s.resolver.resolve(HOST) == ("10.0.0.1",)
            assert repr(s.resolver) == "<Resolver 0 names cached | 1 refreshing | 1 stale>"
            await s.resolver.wait_idle()
            assert s.queries() == 6
            # 30 s past the TTL the failure surfaces.
            s.clock.advance(30)
            with pytest.raises(ModelUnavailable) as caught:
                await s.resolver.resolve(HOST)
            message = caught.value.message
            assert "'plane.test'" in message and "expired more than 30s ago" in message
            assert ("SERVFAIL" if outage == "servfail" else "no answer from") in message
            assert caught.value.status == 503 and caught.value.error_code == "model_unavailable"

    run(scenario)


def test_recovers_after_an_outage() -> None:
    async def scenario() -> None:
        async with dns_setup() as s:
            s.server.set(HOST, "A", "10.0.0.1", ttl=10)
            await s.resolver.resolve(HOST)
            s.server.mode = "servfail"
            s.clock.advance(12)
            assert await s.resolver.resolve(HOST) == ("10.0.0.1",)
            s.server.mode = "answer"
            s.server.set(HOST, "A", "10.0.0.2", ttl=10)
            s.clock.advance(2)
            assert await s.resolver.resolve(HOST) == ("10.0.0.1",)  # stale at once, retry in background
            await s.resolver.wait_idle()
            assert await s.resolver.resolve(HOST) == ("10.0.0.2",)
            assert repr(s.resolver) == "<Resolver 1 names cached | 0 refreshing | 0 stale>"

    run(scenario)


def test_refresh_failure_before_expiry_keeps_serving_the_fresh_answer() -> None:
    async def scenario() -> None:
        async with dns_setup() as s:
            s.server.set(HOST, "A", "10.0.0.1", ttl=8)
            await s.resolver.resolve(HOST)
            s.server.mode = "servfail"
            s.clock.advance(7)
            assert await s.resolver.resolve(HOST) == ("10.0.0.1",)
            await s.resolver.wait_idle()
            assert s.lookups("failed") == 1
            assert await s.resolver.resolve(HOST) == ("10.0.0.1",)  # no retry within retry_seconds
            assert s.queries() == 4
            s.clock.advance(1.5)  # expired, and the last query failed: stale at once
            assert await s.resolver.resolve(HOST) == ("10.0.0.1",)
            await s.resolver.wait_idle()

    run(scenario)


def test_failure_with_nothing_cached_is_503_and_remembered_briefly() -> None:
    async def scenario() -> None:
        async with dns_setup(retry_seconds=1.0) as s:
            s.server.set(HOST, "A", "10.0.0.1", ttl=10)
            s.server.mode = "servfail"
            with pytest.raises(ModelUnavailable, match=r"DNS lookup of plane host 'plane.test' failed: .*SERVFAIL"):
                await s.resolver.resolve(HOST)
            with pytest.raises(ModelUnavailable):
                await s.resolver.resolve(HOST)  # within retry_seconds: no new query
            assert s.queries() == 2
            s.server.mode = "answer"
            s.clock.advance(1)
            assert await s.resolver.resolve(HOST) == ("10.0.0.1",)

    run(scenario)


def test_a_silent_server_times_out_as_503() -> None:
    async def scenario() -> None:
        async with dns_setup() as s:
            s.server.mode = "drop"
            with pytest.raises(ModelUnavailable, match=r"no answer from 127\.0\.0\.1:\d+ within 0\.2s"):
                await s.resolver.resolve(HOST)

    run(scenario)


def test_nxdomain_is_503_and_cached_for_the_negative_ttl() -> None:
    async def scenario() -> None:
        async with dns_setup(soa_minimum=2) as s:  # RFC 2308 negative TTL: 2 s
            expected = "plane host 'plane.test' does not resolve: no such name (NXDOMAIN)"
            with pytest.raises(ModelUnavailable) as caught:
                await s.resolver.resolve(HOST)
            assert caught.value.message == expected and caught.value.status == 503
            s.server.set(HOST, "A", "10.0.0.1", ttl=10)  # the record appears
            s.clock.advance(1.9)
            with pytest.raises(ModelUnavailable, match="NXDOMAIN"):
                await s.resolver.resolve(HOST)  # still the cached negative answer
            assert s.queries() == 2 and s.lookups("not_found") == 1
            s.clock.advance(0.1)
            assert await s.resolver.resolve(HOST) == ("10.0.0.1",)

    run(scenario)


def test_negative_ttl_is_capped() -> None:
    async def scenario() -> None:
        async with dns_setup(soa_minimum=3600, negative_ttl=5.0) as s:
            with pytest.raises(ModelUnavailable):
                await s.resolver.resolve(HOST)
            s.server.set(HOST, "A", "10.0.0.1", ttl=10)
            s.clock.advance(5)  # an hour's SOA MINIMUM is cut to 5 s
            assert await s.resolver.resolve(HOST) == ("10.0.0.1",)

    run(scenario)


def test_a_name_without_addresses_is_503() -> None:
    async def scenario() -> None:
        async with dns_setup() as s:
            s.server.set(HOST, "TXT", '"hello"')
            with pytest.raises(
                ModelUnavailable, match="plane host 'plane.test' does not resolve: no A or AAAA records"
            ):
                await s.resolver.resolve(HOST)

    run(scenario)


def test_a_removed_name_is_not_served_stale(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with dns_setup() as s:
            s.server.set(HOST, "A", "10.0.0.1", ttl=10)
            await s.resolver.resolve(HOST)
            s.server.remove(HOST)
            s.clock.advance(10)
            with pytest.raises(ModelUnavailable, match="NXDOMAIN"):
                await s.resolver.resolve(HOST)  # an authoritative "gone" is not an outage

    with caplog.at_level(logging.WARNING, logger="gateway.dns"):
        run(scenario)
    assert "'plane.test' no longer resolves" in caplog.text


# -- SRV ------------------------------------------------------------------------------------------


def test_srv_discovery_sorted_cached_and_targets_resolved() -> None:
    async def scenario() -> None:
        async with dns_setup() as s:
            service = "_http._tcp.plane.test"
            s.server.set(service, "SRV", "20 0 9000 backup.test.", "10 10 8001 b.test.", "10 90 8000 a.test.", ttl=30)
            s.server.set("a.test", "A", "10.0.0.1")
            s.server.set("b.test", "A", "10.0.0.2")
            replicas = await s.resolver.resolve_srv(service)
            assert replicas == (("a.test", 8000), ("b.test", 8001), ("backup.test", 9000))
            assert await s.resolver.resolve_srv(service.upper() + ".") == replicas  # cached
            assert s.queries(service) == 1
            assert [await s.resolver.resolve(host) for host, _ in replicas[:2]] == [("10.0.0.1",), ("10.0.0.2",)]
            s.server.set(service, "SRV", "10 10 8002 c.test.", ttl=30)
            s.clock.advance(30)
            assert await s.resolver.resolve_srv(service) == (("c.test", 8002),)
            assert s.queries(service) == 2

    run(scenario)


def test_srv_served_stale_while_the_resolver_fails() -> None:
    async def scenario() -> None:
        async with dns_setup() as s:
            service = "_grpc._tcp.plane.test"
            s.server.set(service, "SRV", "10 10 8000 a.test.", ttl=5)
            await s.resolver.resolve_srv(service)
            s.server.mode = "servfail"
            s.clock.advance(6)
            assert await s.resolver.resolve_srv(service) == (("a.test", 8000),)

    run(scenario)


def test_srv_recheck_follows_the_ttl_and_the_retry_pace() -> None:
    async def scenario() -> None:
        async with dns_setup(retry_seconds=3.0) as s:
            service = "_http._tcp.plane.test"
            assert s.resolver.srv_recheck_in(service) == 3.0  # nothing known: ask at the retry pace
            s.server.set(service, "SRV", "10 10 8000 a.test.", ttl=20)
            await s.resolver.resolve_srv(service)
            assert s.resolver.srv_recheck_in(service.upper() + ".") == 20.0  # the whole TTL
            s.clock.advance(19.5)
            assert s.resolver.srv_recheck_in(service) == 1.0  # never below min_ttl
            s.server.mode = "servfail"
            s.clock.advance(1)
            assert await s.resolver.resolve_srv(service) == (("a.test", 8000),)  # stale
            assert s.resolver.srv_recheck_in(service) == 3.0  # failing: the retry pace

    run(scenario)


@pytest.mark.parametrize(
    ("records", "message"),
    [
        (None, "service '_http._tcp.plane.test' does not resolve: no such name (NXDOMAIN)"),
        ("A", "service '_http._tcp.plane.test' does not resolve: no SRV records"),
        ("SRV", "service '_http._tcp.plane.test' does not resolve: the service is declared unavailable"),
    ],
)
def test_srv_without_replicas_is_503(records: str | None, message: str) -> None:
    async def scenario() -> None:
        async with dns_setup() as s:
            service = "_http._tcp.plane.test"
            if records == "A":
                s.server.set(service, "A", "10.0.0.1")
            elif records == "SRV":
                s.server.set(service, "SRV", "0 0 0 .")  # RFC 2782: decidedly not available
            with pytest.raises(ModelUnavailable) as caught:
                await s.resolver.resolve_srv(service)
            assert caught.value.message.startswith(message)

    run(scenario)


# -- names that are never queried ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("10.1.2.3", ("10.1.2.3",)),
        ("::1", ("::1",)),
        ("[::1]", ("::1",)),
        ("[2001:DB8::1]", ("2001:db8::1",)),
        ("localhost", ("127.0.0.1",)),
        ("LOCALHOST.", ("127.0.0.1",)),
        ("plane.localhost", ("127.0.0.1",)),  # RFC 6761 §6.3: names under .localhost too
    ],
)
def test_ip_literals_and_localhost_are_never_queried(host: str, expected: tuple[str, ...]) -> None:
    async def scenario() -> None:
        async with dns_setup() as s:
            s.server.mode = "servfail"
            for _ in range(3):
                assert await s.resolver.resolve(host) == expected
            assert s.server.total_queries == 0
            assert repr(s.resolver) == "<Resolver 0 names cached | 0 refreshing | 0 stale>"

    run(scenario)


def test_without_a_system_configuration_only_literals_resolve(tmp_path: Path) -> None:
    async def scenario() -> None:
        resolver = Resolver(resolv_conf=str(tmp_path / "missing-resolv.conf"))
        assert await resolver.resolve("10.0.0.1") == ("10.0.0.1",)
        assert await resolver.resolve("localhost") == ("127.0.0.1",)
        with pytest.raises(ModelUnavailable, match="no DNS resolver configured"):
            await resolver.resolve(HOST)

    run(scenario)


# -- region enforcement ----------------------------------------------------------------------------

US = ("10.10.0.0/16", "fd10::/16")


def test_one_outside_address_fails_the_whole_answer(caplog: pytest.LogCaptureFixture) -> None:
    # SPEC §8: every resolved address must lie inside the networks; keeping the inside ones would
    # trust a name someone outside the region can add records to (issue 10).
    async def scenario() -> None:
        async with dns_setup() as s:
            s.server.set(HOST, "A", "10.10.0.5", "192.0.2.7", ttl=10)
            s.server.set(HOST, "AAAA", "2001:db8::7", ttl=10)
            violations = s.metrics.dns_region_violations
            for _ in range(2):
                with pytest.raises(ModelUnavailable) as caught:
                    await s.resolver.resolve_in_region(HOST, "us", US)
                assert (
                    caught.value.status == 503 and "192.0.2.7, 2001:db8::7, outside region 'us'" in caught.value.message
                )
            assert violations.get(("us", HOST)) == 4  # both outside addresses, counted on every call
            warnings = [r for r in caplog.records if r.name == "gateway.dns" and r.levelno == logging.WARNING]
            assert len(warnings) == 2  # logged once per (host, address) per TTL
            assert {"192.0.2.7", "2001:db8::7"} == {r.args[1] for r in warnings}  # type: ignore[index]
            s.clock.advance(10)
            with pytest.raises(ModelUnavailable):
                await s.resolver.resolve_in_region(HOST, "us", US)
            assert len([r for r in caplog.records if r.name == "gateway.dns"]) == 4  # a new TTL: again
            s.server.set(HOST, "A", "10.10.0.5", ttl=10)
            s.server.set(HOST, "AAAA", "fd10::5", ttl=10)
            s.clock.advance(10)
            assert await s.resolver.resolve_in_region(HOST, "us", US) == ("10.10.0.5", "fd10::5")

    with caplog.at_level(logging.WARNING, logger="gateway.dns"):
        run(scenario)


def test_region_all_addresses_outside_is_503_and_counted() -> None:
    async def scenario() -> None:
        async with dns_setup() as s:
            s.server.set(HOST, "A", "192.0.2.7", "198.51.100.1", ttl=10)
            with pytest.raises(ModelUnavailable) as caught:
                await s.resolver.resolve_in_region(HOST, "us", US)
            expected = "plane host 'plane.test' resolves to 192.0.2.7, 198.51.100.1, outside region 'us' networks; refusing to connect"
            assert caught.value.message == expected and caught.value.status == 503
            assert s.metrics.dns_region_violations.get(("us", HOST)) == 2
            assert b'gateway_dns_region_violations_total{region="us",host="plane.test"} 2' in s.metrics.render()

    run(scenario)


def test_region_without_networks_is_unrestricted() -> None:
    async def scenario() -> None:
        async with dns_setup() as s:
            s.server.set(HOST, "A", "192.0.2.7", ttl=10)
            assert await s.resolver.resolve_in_region(HOST, "eu", ()) == ("192.0.2.7",)
            assert s.metrics.dns_region_violations.values == {}

    run(scenario)


def test_region_applies_to_ip_literals_and_localhost() -> None:
    async def scenario() -> None:
        async with dns_setup() as s:
            assert await s.resolver.resolve_in_region("localhost", "us", ("127.0.0.0/8",)) == ("127.0.0.1",)
            with pytest.raises(ModelUnavailable, match="outside region 'us'"):
                await s.resolver.resolve_in_region("192.0.2.1", "us", US)
            with pytest.raises(ModelUnavailable, match="outside region 'us'"):
                await s.resolver.resolve_in_region("localhost", "us", US)
            assert s.server.total_queries == 0

    run(scenario)


def test_region_filters_stale_answers_too() -> None:
    async def scenario() -> None:
        async with dns_setup() as s:
            s.server.set(HOST, "A", "10.10.0.5", "192.0.2.7", ttl=10)
            await s.resolver.resolve(HOST)
            s.server.mode = "servfail"
            s.clock.advance(15)
            assert sorted(await s.resolver.resolve(HOST)) == ["10.10.0.5", "192.0.2.7"]  # stale
            with pytest.raises(ModelUnavailable, match="192.0.2.7, outside region 'us'"):
                await s.resolver.resolve_in_region(HOST, "us", US)  # a stale answer is checked whole too
            assert s.lookups("stale_served") == 2

    run(scenario)


def test_region_refresh_to_an_outside_address_is_refused() -> None:
    async def scenario() -> None:
        async with dns_setup() as s:
            s.server.set(HOST, "A", "10.10.0.5", ttl=8)
            assert await s.resolver.resolve_in_region(HOST, "us", US) == ("10.10.0.5",)
            s.server.set(HOST, "A", "192.0.2.7", ttl=8)  # the record is moved out of the region
            s.clock.advance(7)
            # The refresh runs in the background; whatever it brings, only inside addresses come out.
            assert await s.resolver.resolve_in_region(HOST, "us", US) == ("10.10.0.5",)
            await s.resolver.wait_idle()
            with pytest.raises(ModelUnavailable, match="outside region 'us'"):
                await s.resolver.resolve_in_region(HOST, "us", US)

    run(scenario)


@pytest.mark.parametrize(
    ("addresses", "networks", "inside", "outside"),
    [
        (("10.10.1.1", "10.11.0.1"), ("10.10.0.0/16",), ("10.10.1.1",), ("10.11.0.1",)),
        (("10.10.1.1", "fd10::1"), ("10.10.0.0/16",), ("10.10.1.1",), ("fd10::1",)),  # other family
        (("fd10::1", "fd11::1"), ("fd10::/16",), ("fd10::1",), ("fd11::1",)),
        (("::ffff:10.10.1.1", "::ffff:10.11.0.1"), ("10.10.0.0/16",), ("::ffff:10.10.1.1",), ("::ffff:10.11.0.1",)),
        (("not-an-ip", "", "10.10.1.1"), ("10.10.0.0/16",), ("10.10.1.1",), ("not-an-ip", "")),  # fail closed
        (("10.10.1.1",), ("10.10.1.7/16",), ("10.10.1.1",), ()),  # host bits ignored, as the loader does
        (("192.0.2.1", "10.10.1.1"), (), ("192.0.2.1", "10.10.1.1"), ()),  # no networks: no restriction
        ((), ("10.10.0.0/16",), (), ()),
    ],
)
def test_allowed_cases(
    addresses: tuple[str, ...], networks: tuple[str, ...], inside: tuple[str, ...], outside: tuple[str, ...]
) -> None:
    assert allowed(addresses, networks) == (inside, outside)


def test_allowed_rejects_a_bad_network() -> None:
    with pytest.raises(ValueError, match="'10.10.0.0/33' is not a network"):
        allowed(("10.10.0.1",), ("10.10.0.0/33",))


def _networks() -> st.SearchStrategy[str]:
    v4 = st.builds(
        lambda a, p: str(ipaddress.ip_network(f"{a}/{p}", strict=False)), st.ip_addresses(v=4), st.integers(0, 32)
    )
    v6 = st.builds(
        lambda a, p: str(ipaddress.ip_network(f"{a}/{p}", strict=False)), st.ip_addresses(v=6), st.integers(0, 128)
    )
    return st.one_of(v4, v6)


_ADDRESSES = st.one_of(
    st.ip_addresses().map(str),
    st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}"),
    st.sampled_from(["10.0.0.1", "10.255.255.255", "fd00::1", "garbage", "", "10.0.0.256", "1.2.3"]),
)


def _oracle(address: str, networks: tuple[str, ...]) -> bool:
    """Inside, judged independently: a parsed address in a parsed network of its family (or mapped v4)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        candidates.append(ip.ipv4_mapped)
    nets = [ipaddress.ip_network(n) for n in networks]
    return any(c.version == n.version and c in n for c in candidates for n in nets)


@given(st.lists(_ADDRESSES, max_size=8), st.lists(_networks(), min_size=1, max_size=4))
def test_allowed_property(addresses: list[str], networks: list[str]) -> None:
    nets = tuple(networks)
    inside, outside = allowed(addresses, nets)
    assert all(_oracle(a, nets) for a in inside)  # nothing returned lies outside the networks
    assert sorted(inside + outside) == sorted(addresses)  # allowed ∪ refused == input
    assert inside == tuple(a for a in addresses if _oracle(a, nets))  # order preserved
    assert outside == tuple(a for a in addresses if not _oracle(a, nets))


# -- configuration, lifecycle, metrics -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("10.0.0.2", ("10.0.0.2", 53)),
        ("[::1]:53", ("::1", 53)),
        ("[fd00::1]", ("fd00::1", 53)),
        ("::1", ("::1", 53)),
    ],
)
def test_nameserver_forms(text: str, expected: tuple[str, int]) -> None:
    assert parse_nameserver(text) == expected


@pytest.mark.parametrize("text", ["dns.example", "127.0.0.1:0", "127.0.0.1:70000", "1.2.3.4:dns", "[::1", "[::1]x", ""])
def test_bad_nameservers_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="nameserver"):
        Resolver((text,))


@pytest.mark.parametrize(
    ("option", "value"),
    [("min_ttl", 0.0), ("max_ttl", 0.5), ("stale_seconds", -1.0), ("timeout", 0.0), ("negative_ttl", 0.5)],
)
def test_bad_settings_are_refused(option: str, value: float) -> None:
    with pytest.raises(ValueError, match=option):
        Resolver(("127.0.0.1",), **{option: value})  # type: ignore[arg-type]


def test_close_cancels_background_refreshes_and_waiting_callers() -> None:
    async def scenario() -> None:
        async with dns_setup() as s:
            s.server.set(HOST, "A", "10.0.0.1", ttl=8)
            await s.resolver.resolve(HOST)
            s.server.hold()
            s.clock.advance(7)
            await s.resolver.resolve(HOST)  # starts a background refresh, held by the server
            waiting = asyncio.create_task(s.resolver.resolve("other.test"))
            await until(lambda: s.queries() == 4 and s.queries("other.test") == 2, "the queries")
            assert repr(s.resolver) == "<Resolver 1 names cached | 2 refreshing | 0 stale>"
            s.resolver.close()
            assert repr(s.resolver) == "<Resolver 1 names cached | 0 refreshing | 0 stale | closed>"
            with pytest.raises(ModelUnavailable, match="closed"):
                await waiting
            assert await s.resolver.resolve(HOST) == ("10.0.0.1",)  # still fresh: served
            s.clock.advance(1)
            with pytest.raises(ModelUnavailable, match="closed"):
                await s.resolver.resolve(HOST)
            await s.resolver.wait_idle()

    run(scenario)


def test_lookup_metrics_render() -> None:
    async def scenario() -> None:
        async with dns_setup() as s:
            s.server.set(HOST, "A", "10.0.0.1", ttl=10)
            await s.resolver.resolve(HOST)
            with pytest.raises(ModelUnavailable):
                await s.resolver.resolve("missing.test")
            text = s.metrics.render().decode()
            assert 'gateway_dns_lookups_total{result="ok"} 1' in text
            assert 'gateway_dns_lookups_total{result="not_found"} 1' in text
            assert "# TYPE gateway_dns_region_violations_total counter" in text

    run(scenario)
