"""The canary split (SPEC §6) as callers see it: through the `x-baseten-deployment-id` response
header of a real gateway, and in `gateway_split_requests_total`.

The split is a pure function of (model, environment, caller) (`gateway.routing.resolve.in_canary`),
so each observed side is compared with it exactly; the share of canary calls is also checked
against a binomial tolerance.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator

import aiohttp
import pytest

from gateway.routing.resolve import in_canary
from tests.dataplane import call, configure, metric
from tests.planes import Plane, RawPlane, read_head
from tests.support import GatewayProcess, example_doc, running_gateway, sha, write_table

KEYS = [f"key-{i}" for i in range(12)]  # API keys k0..k11 of team acme
STAGING = "/environments/staging/predict"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    doc = example_doc("http://127.0.0.1:9", "http://127.0.0.1:9")
    with running_gateway(write_table(tmp_path_factory.mktemp("canary") / "table.yaml", doc)) as gateway:
        yield gateway


def canary_doc(url: str, percent: float) -> dict:
    doc = example_doc(url, url)
    doc["api_keys"] += [{"name": f"k{i}", "team": "acme", "sha256": sha(key)} for i, key in enumerate(KEYS)]
    doc["models"]["abc123"]["environments"]["staging"]["canary"] = {"deployment": "v2", "percent": percent}
    return doc


def side(deployment: str) -> str:
    return {"v1": "primary", "v2": "canary"}[deployment]


def expected(percent: float, caller: str) -> str:
    return "canary" if in_canary(percent, "abc123", "staging", caller) else "primary"


async def split(session: aiohttp.ClientSession, gw: GatewayProcess, which: str) -> float:
    return await metric(session, gw, "gateway_split_requests_total", environment="staging", side=which)


def test_ten_percent_of_callers_get_the_canary(gw: GatewayProcess) -> None:
    n, percent = 4000, 10

    async def scenario() -> None:
        connector = aiohttp.TCPConnector(limit=32)
        async with Plane() as plane, aiohttp.ClientSession(connector=connector) as session:
            configure(gw, canary_doc(plane.url, percent))
            before = {s: await split(session, gw, s) for s in ("primary", "canary")}

            async def one(i: int) -> tuple[str, str]:
                status, headers, _ = await call(session, gw, STAGING, headers={"x-baseten-routing-key": f"user-{i}"})
                assert status == 200
                return f"user-{i}", side(headers["x-baseten-deployment-id"])

            observed = dict(await asyncio.gather(*(one(i) for i in range(n))))
            canary = sum(1 for s in observed.values() if s == "canary")
            tolerance = 4.5 * math.sqrt(n * 0.1 * 0.9)  # 4.5 sigma of Binomial(4000, 0.1)
            assert abs(canary - n * percent / 100) <= tolerance, canary
            assert observed == {k: expected(percent, k) for k in observed}  # every caller on its own side
            assert await split(session, gw, "canary") - before["canary"] == canary
            assert await split(session, gw, "primary") - before["primary"] == n - canary

    asyncio.run(scenario())


def test_the_side_is_sticky_per_routing_key_and_per_api_key(gw: GatewayProcess) -> None:
    percent = 50

    async def scenario() -> None:
        async with Plane() as plane, aiohttp.ClientSession() as session:
            configure(gw, canary_doc(plane.url, percent))

            async def side_of(key: str, routing_key: str | None = None) -> str:
                headers = {"Authorization": f"Api-Key {key}"}
                if routing_key is not None:
                    headers["x-baseten-routing-key"] = routing_key
                status, response, _ = await call(session, gw, STAGING, headers=headers)
                assert status == 200
                return side(response["x-baseten-deployment-id"])

            # The same API key (no routing key): the same side every time, the one of the key's name.
            by_key = {}
            for i, key in enumerate(KEYS):
                sides = {await side_of(key) for _ in range(4)}
                assert sides == {expected(percent, f"k{i}")}
                by_key[key] = sides.pop()
            assert set(by_key.values()) == {"primary", "canary"}  # both sides are exercised

            # The routing key wins over the API key: every key gets the routing key's side.
            for routing_key in ("session-a", "session-b", "session-c", "session-d"):
                sides = {await side_of(key, routing_key) for key in KEYS}
                assert sides == {expected(percent, routing_key)}

    asyncio.run(scenario())


def test_the_deployment_header_replaces_the_planes_own(tmp_path) -> None:  # noqa: ANN001
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-baseten-deployment-id: plane-says-v7\r\n"
            b"X-Baseten-Deployment-Id: twice\r\n\r\nok"
        )
        await writer.drain()

    async def scenario() -> None:
        async with RawPlane(answer) as plane, aiohttp.ClientSession() as session:
            with running_gateway(write_table(tmp_path / "t.yaml", example_doc(plane.url, plane.url))) as gw:
                status, headers, body = await call(session, gw, "/production/predict")  # one value, or it fails
                assert (status, headers["x-baseten-deployment-id"], body) == (200, "v1", b"ok")

    asyncio.run(scenario())
