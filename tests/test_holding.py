"""Scale-from-zero holding and backpressure (SPEC §6) through a real gateway and real planes.

One gateway serves the module; each test points the table at its own planes and changes it through
the admin reload, as an operator (or the promotion controller) would. Nothing asserts on time: a held
call is shown held by the `gateway_held_requests` gauge and by the plane having received nothing.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import io
import json
from collections.abc import Iterator

import aiohttp
import pytest

from gateway.calls.admission import admission, concurrency_limit
from gateway.routing.model import Autoscaling, Deployment, Environment, Upstream
from gateway.routing.model import Plane as PlaneModel
from gateway.upstream.balance import replica_count
from tests.dataplane import STD, call, configure, metric, until
from tests.planes import Plane
from tests.support import GatewayProcess, example_doc, running_gateway, write_table

MiB = 1024 * 1024
COLD = {"model": "abc123", "environment": "cold", "deployment": "v0"}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    doc = example_doc("http://127.0.0.1:9", "http://127.0.0.1:9")
    with running_gateway(write_table(tmp_path_factory.mktemp("hold") / "table.yaml", doc)) as gateway:
        yield gateway


def cold_doc(plane: Plane, **gateway: float) -> dict:
    """The example table on `plane`, with environment `cold` on the scaled-to-zero deployment v0."""
    doc = example_doc(plane.url, plane.url)
    doc["gateway"].update(gateway)
    doc["models"]["abc123"]["environments"]["cold"] = {"deployment": "v0"}
    return doc


def activated(doc: dict, dep: str = "v0") -> dict:
    doc = copy.deepcopy(doc)
    doc["models"]["abc123"]["deployments"][dep]["status"] = "active"
    return doc


async def held(session: aiohttp.ClientSession, gw: GatewayProcess, **labels: str) -> float:
    return await metric(session, gw, "gateway_held_requests", **labels)


def held_is(session: aiohttp.ClientSession, gw: GatewayProcess, n: int, **labels: str):  # noqa: ANN201
    async def check() -> bool:
        return await held(session, gw, **labels) == n

    return check


def forwarded(plane: Plane) -> list[tuple[str, str]]:
    return [r for r in plane.requests if r[1] != "/wake"]


# -- pure decisions ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("in_flight", "limit", "waiting", "policy", "expected"),
    [
        (100, None, 0, "QUEUE_ON_FULL", "go"),  # no concurrency_target: never limited
        (0, 1, 0, "QUEUE_ON_FULL", "go"),
        (1, 1, 0, "QUEUE_ON_FULL", "queue"),
        (1, 1, 0, "REJECT_ON_FULL", "reject"),
        (0, 2, 1, "QUEUE_ON_FULL", "queue"),  # room, but an earlier call waits: no overtaking
        (3, 2, 0, "REJECT_ON_FULL", "reject"),
    ],
)
def test_admission(in_flight: int, limit: int | None, waiting: int, policy: str, expected: str) -> None:
    assert admission(in_flight, limit, waiting, policy) == expected


def test_the_limit_is_target_times_replicas() -> None:
    plane = PlaneModel("p", "us", Upstream("http", "127.0.0.1", 1))
    one = Deployment("d", "m", plane)
    three = Deployment("d", "m", plane, replicas=3)
    listed = Deployment("d", "m", plane, endpoints=(Upstream("http", "a", 1), Upstream("http", "b", 1)), replicas=9)
    assert [replica_count(d) for d in (one, three, listed)] == [1, 3, 2]
    env = Environment("e", one, autoscaling=Autoscaling(concurrency_target=4))
    assert concurrency_limit(env, replica_count(three)) == 12
    assert concurrency_limit(Environment("e", one), 3) is None
    assert concurrency_limit(None, 3) is None


# -- scale from zero -----------------------------------------------------------------------------


def test_a_held_call_is_released_when_its_deployment_becomes_active(gw: GatewayProcess) -> None:
    async def scenario() -> None:
        async with Plane() as plane, aiohttp.ClientSession() as session:
            doc = cold_doc(plane)
            configure(gw, doc)
            pending = asyncio.create_task(call(session, gw, "/environments/cold/predict?q=1", body=b'{"n": 7}'))
            await asyncio.wait_for(plane.woken.wait(), 10)
            wake = plane.wakes[0]
            assert (wake["x-baseten-model-id"], wake["x-baseten-environment"], wake["x-baseten-deployment-id"]) == (
                "abc123", "cold", "v0",
            )  # fmt: skip
            assert len(wake["x-baseten-request-id"]) == 32 and "authorization" not in wake
            await until(lambda: held(session, gw, **COLD), "the held gauge to show the call")
            assert await held(session, gw, **COLD) == 1
            assert not pending.done() and forwarded(plane) == []

            configure(gw, activated(doc))
            status, headers, body = await asyncio.wait_for(pending, 10)
            assert status == 200 and headers["x-baseten-deployment-id"] == "v0"
            echo = json.loads(body)
            assert echo["path"] == "/predict?q=1" and echo["body"] == '{"n": 7}'
            assert dict(echo["headers"])["x-baseten-request-id"] == headers["x-baseten-request-id"]
            assert await held(session, gw) == 0
            assert len(plane.wakes) == 1  # one wake in flight per deployment, not one per call

    asyncio.run(scenario())


def test_a_held_call_follows_its_environment_to_another_deployment(gw: GatewayProcess) -> None:
    async def scenario() -> None:
        async with Plane() as plane, aiohttp.ClientSession() as session:
            doc = cold_doc(plane)
            configure(gw, doc)
            pending = [asyncio.create_task(call(session, gw, "/environments/cold/predict")) for _ in range(3)]
            await until(held_is(session, gw, 3, **COLD), "three held calls")
            doc["models"]["abc123"]["environments"]["cold"] = {"deployment": "v1"}  # a promotion, say
            configure(gw, doc)
            for status, headers, _ in await asyncio.wait_for(asyncio.gather(*pending), 10):
                assert status == 200 and headers["x-baseten-deployment-id"] == "v1"
            assert await held(session, gw) == 0

    asyncio.run(scenario())


def test_a_held_call_times_out_with_503_and_retry_after(gw: GatewayProcess) -> None:
    async def scenario() -> None:
        async with Plane() as plane, aiohttp.ClientSession() as session:
            configure(gw, cold_doc(plane, hold_timeout_seconds=0.3))
            status, headers, body = await asyncio.wait_for(call(session, gw, "/environments/cold/predict"), 10)
            assert status == 503 and json.loads(body)["error_code"] == "model_not_ready"
            assert int(headers["retry-after"]) > 0
            assert forwarded(plane) == [] and await held(session, gw) == 0
            labels = dict(COLD, code="503")
            assert await metric(session, gw, "gateway_requests_total", **labels) >= 1

    asyncio.run(scenario())


def test_held_calls_past_the_bound_get_429(gw: GatewayProcess) -> None:
    async def scenario() -> None:
        async with Plane() as plane, aiohttp.ClientSession() as session:
            doc = cold_doc(plane, max_held_calls_per_deployment=2)
            configure(gw, doc)
            pending = [asyncio.create_task(call(session, gw, "/environments/cold/predict")) for _ in range(2)]
            await until(held_is(session, gw, 2, **COLD), "two held calls")
            status, headers, body = await asyncio.wait_for(call(session, gw, "/environments/cold/predict"), 10)
            assert status == 429 and json.loads(body)["error_code"] == "rate_limited"
            assert int(headers["retry-after"]) > 0
            # The bound is per deployment: a call to another scaled-to-zero deployment is still held.
            doc["models"]["abc123"]["deployments"]["v9"] = {"plane": "us-east-1", "status": "scaled_to_zero"}
            configure(gw, doc)
            other = asyncio.create_task(call(session, gw, "/deployment/v9/predict"))
            await until(lambda: held(session, gw, deployment="v9"), "a held call to v9")
            configure(gw, activated(activated(doc), "v9"))
            results = await asyncio.wait_for(asyncio.gather(*pending, other), 10)
            assert [r[0] for r in results] == [200, 200, 200]
            assert await held(session, gw) == 0

    asyncio.run(scenario())


def test_a_client_vanishing_while_held_is_dropped(gw: GatewayProcess) -> None:
    async def scenario() -> None:
        async with Plane() as plane, aiohttp.ClientSession() as session:
            doc = cold_doc(plane)
            configure(gw, doc)
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(
                f"POST /environments/cold/predict?gone=1 HTTP/1.1\r\nHost: {STD}\r\n"
                "Authorization: Api-Key demo-key-acme\r\nContent-Length: 2\r\n\r\n{}".encode()
            )
            await writer.drain()
            await until(held_is(session, gw, 1, **COLD), "the call to be held")
            writer.close()
            await until(held_is(session, gw, 0, **COLD), "the vanished call to leave the hold")
            assert await metric(session, gw, "gateway_requests_total", **COLD, code="499") == 1

            configure(gw, activated(doc))  # a release now would send the vanished call: it must not
            status, _, _ = await call(session, gw, "/environments/cold/predict?fresh=1")
            assert status == 200
            assert forwarded(plane) == [("POST", "/predict?fresh=1")]

    asyncio.run(scenario())


def test_a_held_body_is_not_lost(gw: GatewayProcess) -> None:
    """A body larger than the server's buffer waits unread while held, then streams whole."""

    async def scenario() -> None:
        async with Plane() as plane, aiohttp.ClientSession() as session:
            doc = cold_doc(plane)
            configure(gw, doc)
            data = bytes(range(256)) * (4 * MiB // 256)
            pending = asyncio.create_task(call(session, gw, "/environments/cold/sync/sink", body=io.BytesIO(data)))
            await until(held_is(session, gw, 1, **COLD), "the call to be held")
            configure(gw, activated(doc))
            status, _, body = await asyncio.wait_for(pending, 20)
            assert status == 200
            assert json.loads(body) == {"length": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    asyncio.run(scenario())


# -- backpressure --------------------------------------------------------------------------------


def limited_doc(plane: Plane, policy: str, replicas: int = 1) -> dict:
    doc = example_doc(plane.url, plane.url)
    doc["models"]["abc123"]["deployments"]["v1"]["replicas"] = replicas
    doc["models"]["abc123"]["environments"]["production"] = {
        "deployment": "v1", "autoscaling": {"concurrency_target": 1}, "backpressure": {"policy": policy},
    }  # fmt: skip
    return doc


def test_queue_on_full_holds_the_call_until_a_slot_frees(gw: GatewayProcess) -> None:
    async def scenario() -> None:
        async with Plane(blocking=True, block_seconds=30) as plane, aiohttp.ClientSession() as session:
            configure(gw, limited_doc(plane, "QUEUE_ON_FULL", replicas=2))  # limit: 1 x 2 replicas
            first = [asyncio.create_task(call(session, gw, "/production/predict")) for _ in range(2)]
            await until(lambda: len(plane.seen) == 2, "two calls at the plane")
            third = asyncio.create_task(call(session, gw, "/production/predict?third=1"))
            await until(lambda: held(session, gw, deployment="v1"), "the third call to be held")
            assert len(plane.seen) == 2 and not third.done()
            plane.release.set()
            results = await asyncio.wait_for(asyncio.gather(*first, third), 10)
            assert [r[0] for r in results] == [200, 200, 200]
            assert plane.seen[-1]["path"] == "/predict?third=1"
            assert await held(session, gw) == 0

    asyncio.run(scenario())


def test_reject_on_full_answers_429_at_once(gw: GatewayProcess) -> None:
    async def scenario() -> None:
        async with Plane(blocking=True, block_seconds=30) as plane, aiohttp.ClientSession() as session:
            configure(gw, limited_doc(plane, "REJECT_ON_FULL"))
            first = asyncio.create_task(call(session, gw, "/production/predict"))
            await asyncio.wait_for(plane.arrived.wait(), 10)
            status, headers, body = await asyncio.wait_for(call(session, gw, "/production/predict"), 10)
            assert status == 429 and json.loads(body)["error_code"] == "rate_limited"
            assert int(headers["retry-after"]) > 0
            plane.release.set()
            status, headers, _ = await asyncio.wait_for(first, 10)
            assert status == 200 and headers["x-baseten-deployment-id"] == "v1"
            assert len(plane.seen) == 1

    asyncio.run(scenario())


def test_many_queued_calls_all_get_through_a_small_limit(gw: GatewayProcess) -> None:
    """Each freed slot goes to the longest-waiting call, which is not sent back behind the others."""

    async def scenario() -> None:
        connector = aiohttp.TCPConnector(limit=40)
        async with Plane() as plane, aiohttp.ClientSession(connector=connector) as session:
            configure(gw, limited_doc(plane, "QUEUE_ON_FULL", replicas=2))
            calls = [call(session, gw, f"/production/predict?i={i}") for i in range(200)]
            results = await asyncio.wait_for(asyncio.gather(*calls), 60)
            assert [r[0] for r in results] == [200] * 200
            assert await held(session, gw) == 0

    asyncio.run(scenario())
