"""Planes behind DNS names and several replicas (issue 5, SPEC §8): resolution, region networks
enforced on every address, failover when a replica dies, outlier ejection and recovery."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.dnsserver import DNSServer
from tests.support import DEMO_KEY, example_doc, free_port, running_gateway, write_table

HOST = {"Host": "model-abc123.api.example.com", "Authorization": f"Api-Key {DEMO_KEY}"}


class Replica:
    """A plane replica on a given address; answers with its name; can fail on demand; counts calls.

    `GET /healthz` answers 200, or 503 while `healthy` is False; its request headers are kept.
    """

    def __init__(self, name: str, host: str = "127.0.0.1", port: int = 0, *, close: bool = False) -> None:
        self.name, self.host, self.port, self.close = name, host, port, close
        self.calls = 0
        self.failing = False
        self.healthy = True
        self.health_checks: list[dict[str, str]] = []  # headers of each /healthz request
        self.runner: web.AppRunner | None = None

    async def healthz(self, request: web.Request) -> web.Response:
        self.health_checks.append({k.lower(): v for k, v in request.headers.items()})
        return web.Response(text="ok" if self.healthy else "unhealthy", status=200 if self.healthy else 503)

    async def predict(self, request: web.Request) -> web.Response:
        self.calls += 1
        await request.read()
        headers = {"Connection": "close"} if self.close else {}
        if self.failing:
            return web.json_response({"replica": self.name, "error": "boom"}, status=500, headers=headers)
        return web.json_response({"replica": self.name}, headers=headers)

    async def start(self) -> Replica:
        app = web.Application()
        app.router.add_post("/predict", self.predict)
        app.router.add_get("/healthz", self.healthz)
        self.runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


async def post(session: aiohttp.ClientSession, url: str) -> tuple[int, dict]:
    async with session.post(url + "/production/predict", headers=HOST, data=b"{}") as r:
        return r.status, await r.json()


def test_plane_host_names_are_resolved_and_a_dns_change_is_followed(tmp_path: Path) -> None:
    async def scenario() -> None:
        port = free_port()
        a = await Replica("a", "127.0.0.1", port, close=True).start()
        b = await Replica("b", "127.0.0.3", port, close=True).start()  # same port, another loopback address
        async with DNSServer() as dns:
            dns.set("plane-us.test", "A", "127.0.0.1", ttl=1)
            doc = example_doc(f"http://plane-us.test:{port}", f"http://plane-us.test:{port}")
            doc["gateway"]["dns"] = {"nameservers": [dns.address]}
            with running_gateway(write_table(tmp_path / "t.yaml", doc)) as gw:
                async with aiohttp.ClientSession() as session:
                    assert (await post(session, gw.url))[1]["replica"] == "a"
                    assert (await post(session, gw.url))[1]["replica"] == "a"
                    assert dns.total_queries <= 3  # cached within the TTL (A and AAAA once, maybe a refresh)
                    dns.set("plane-us.test", "A", "127.0.0.3", ttl=1)
                    deadline = time.monotonic() + 10
                    seen = "a"
                    while seen == "a" and time.monotonic() < deadline:
                        await asyncio.sleep(0.2)
                        seen = (await post(session, gw.url))[1]["replica"]
                    assert seen == "b"
        await a.stop()
        await b.stop()

    asyncio.run(scenario())


def test_an_address_outside_the_region_never_receives_a_connection(tmp_path: Path) -> None:
    accepted: list[str] = []

    async def scenario() -> tuple[list, list, str]:
        port = free_port()

        async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append("connection")
            writer.close()

        outside = await asyncio.start_server(count, "127.0.0.4", port)
        answers = []
        async with DNSServer() as dns:
            dns.set("plane-us.test", "A", "127.0.0.4", ttl=30)
            doc = example_doc(f"http://plane-us.test:{port}", f"http://127.0.0.4:{port}")
            doc["gateway"]["dns"] = {"nameservers": [dns.address]}
            doc["regions"]["us"]["networks"] = ["127.0.0.1/32"]
            doc["regions"]["eu"]["networks"] = ["127.0.0.1/32"]
            with running_gateway(write_table(tmp_path / "t.yaml", doc)) as gw:
                async with aiohttp.ClientSession() as session:
                    answers.append(await post(session, gw.url))  # a DNS name resolving outside
                    async with session.post(
                        gw.url + "/environments/prod-eu/predict", headers=HOST, data=b"{}"
                    ) as r:  # an IP literal outside
                        answers.append((r.status, await r.json()))
                status, metrics = gw.admin("GET", "/metrics")
        outside.close()
        return answers, accepted, metrics

    answers, accepted, metrics = asyncio.run(scenario())
    assert accepted == []  # fail closed: not one connection was made
    for status, body in answers:
        assert status == 503 and body["error_code"] == "model_unavailable"
        assert "outside region" in body["error"]
    assert re.search(r'gateway_dns_region_violations_total\{region="us",host="plane-us.test"\} [1-9]', metrics)


def two_replica_table(tmp_path: Path, a: Replica, b: Replica) -> Path:
    doc = example_doc(a.url, a.url)
    doc["models"]["abc123"]["deployments"]["v1"]["endpoints"] = [a.url, b.url]
    return write_table(tmp_path / "t.yaml", doc)


def test_killing_one_of_two_replicas_under_load_fails_no_call_sent_after_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        a, b = await Replica("a").start(), await Replica("b").start()
        with running_gateway(two_replica_table(tmp_path, a, b)) as gw:
            killed_at = float("inf")
            after_kill: list[tuple[int, str]] = []
            stop = asyncio.Event()

            async def client() -> None:
                deadline = time.monotonic() + 30.0
                async with aiohttp.ClientSession() as session:
                    # Bounded in time and count, and long enough to outlast the kill: with a fixed 400
                    # calls a fast machine had finished them all before it (nothing sent after it).
                    for _ in range(200_000):
                        if stop.is_set() or time.monotonic() > deadline:
                            return
                        sent = time.monotonic()
                        try:
                            status, body = await post(session, gw.url)
                            result = (status, body.get("replica", body.get("error_code")))
                        except aiohttp.ClientError as exc:
                            result = (0, repr(exc))
                        if sent > killed_at:
                            after_kill.append(result)

            clients = [asyncio.create_task(client()) for _ in range(6)]
            await asyncio.sleep(0.5)
            assert a.calls > 0 and b.calls > 0  # both replicas serve
            await a.stop()  # the replica dies
            killed_at = time.monotonic()
            await asyncio.sleep(1.5)
            stop.set()
            await asyncio.gather(*clients)
            assert after_kill and all(r == (200, "b") for r in after_kill), [r for r in after_kill if r[0] != 200][:5]
            # It comes back: once its ejection back-off (5 s) ends, it is tried and serves again.
            a_again = await Replica("a", port=a.port).start()
            async with aiohttp.ClientSession() as session:
                deadline = time.monotonic() + 15
                while a_again.calls == 0 and time.monotonic() < deadline:
                    status, _ = await post(session, gw.url)
                    assert status == 200
                    await asyncio.sleep(0.1)
            assert a_again.calls > 0
            await a_again.stop()
        await b.stop()

    asyncio.run(scenario())


def test_outlier_ejection_and_recovery(tmp_path: Path) -> None:
    async def scenario() -> None:
        a, b = await Replica("a").start(), await Replica("b").start()
        a.failing = True
        with running_gateway(two_replica_table(tmp_path, a, b)) as gw:
            async with aiohttp.ClientSession() as session:
                statuses = []
                while a.calls < 5:  # five consecutive 500s from a (each passed through, not retried)
                    statuses.append((await post(session, gw.url))[0])
                assert statuses.count(500) == 5
                calls_at_ejection = a.calls
                for _ in range(30):
                    assert await post(session, gw.url) == (200, {"replica": "b"})
                assert a.calls == calls_at_ejection  # ejected: no traffic
                a.failing = False
                deadline = time.monotonic() + 15
                while a.calls == calls_at_ejection and time.monotonic() < deadline:
                    await asyncio.sleep(0.25)
                    await post(session, gw.url)
                assert a.calls > calls_at_ejection  # back after its back-off
                results = [(await post(session, gw.url))[1]["replica"] for _ in range(40)]
                assert "a" in results and "b" in results  # healthy again: both serve
        await a.stop()
        await b.stop()

    asyncio.run(scenario())


def test_a_restarted_replica_is_used_while_still_ejected_when_the_other_dies(tmp_path: Path) -> None:
    """Found by the soak run: a rolling restart must not leave a deployment with no replica to try."""

    async def scenario() -> list[tuple[int, dict]]:
        a, b = await Replica("a").start(), await Replica("b").start()
        with running_gateway(two_replica_table(tmp_path, a, b)) as gw:
            async with aiohttp.ClientSession() as session:
                await a.stop()
                for _ in range(12):  # a's connect failures eject it; every call retried on b
                    assert (await post(session, gw.url))[0] == 200
                a = await Replica("a", port=a.port).start()  # back, but still inside its ejection back-off
                await b.stop()
                results = [await post(session, gw.url) for _ in range(5)]
        await a.stop()
        return results

    results = asyncio.run(scenario())
    assert results == [(200, {"replica": "a"})] * 5
