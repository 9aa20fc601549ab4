"""Rate limits per API key and per team (issue 13) through a real gateway and real planes on 127.0.0.1.

One gateway (HTTP and gRPC listeners) serves the module; each test serves its own table through the
admin reload, with keys of its own (a key's counters live as long as the worker). Nothing asserts on
time: a limit is shown hit by a 429 and recovered by polling until a call goes through; an open
call is shown open by the plane having received it or by `gateway_inflight_requests`.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from concurrent import futures

import aiohttp
import grpc
import pytest

from tests.dataplane import LABEL, SAMPLE, STD, configure, metric, until
from tests.planes import Plane
from tests.support import GatewayProcess, example_doc, free_port, running_gateway, sha, write_table
from tests.test_grpc import HOST as GRPC_HOST
from tests.test_grpc import GrpcPlane, channel, trailer, unary

PRODUCTION = "/environments/production/predict"


def secret(name: str) -> str:
    return f"sk_{name}_7f3a9c21d4"  # never in a metric, a log line or an error


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Api-Key {secret(name)}"}


def limited_doc(plane_url: str, grpc_address: str, keys: dict[str, dict | None], team: dict | None = None) -> dict:
    """The example table on `plane_url` (and `grpc_address`), plus team acme's `keys` (name -> rate_limit)."""
    doc = example_doc(plane_url, plane_url)
    doc["planes"]["us-east-1"]["grpc"] = grpc_address
    for name, limit in keys.items():
        key = {"name": name, "team": "acme", "sha256": sha(secret(name))}
        if limit is not None:
            key["rate_limit"] = limit
        doc["api_keys"].append(key)
    if team is not None:
        doc["teams"]["acme"]["rate_limit"] = team
    return doc


@pytest.fixture(scope="module")
def grpc_plane() -> Iterator[GrpcPlane]:
    plane = GrpcPlane("us-east-1")
    yield plane
    plane.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, grpc_plane: GrpcPlane) -> Iterator[GatewayProcess]:
    doc = limited_doc("http://127.0.0.1:9", grpc_plane.address, {})
    table = write_table(tmp_path_factory.mktemp("ratelimit") / "table.yaml", doc)
    with running_gateway(table, grpc_port=free_port()) as gateway:
        yield gateway


async def call(
    session: aiohttp.ClientSession, gw: GatewayProcess, key: str, path: str = PRODUCTION, *, body: object = b"{}"
) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    async with session.post(gw.url + path, data=body, headers={"Host": STD, **auth(key)}) as resp:
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.read()


def inflight_is(session: aiohttp.ClientSession, gw: GatewayProcess, n: int, **labels: str):  # noqa: ANN201
    async def check() -> bool:
        return await metric(session, gw, "gateway_inflight_requests", **labels) == n

    return check


def ok_again(session: aiohttp.ClientSession, gw: GatewayProcess, key: str, path: str = PRODUCTION):  # noqa: ANN201
    async def check() -> bool:
        return (await call(session, gw, key, path))[0] == 200

    return check


async def rate_limited(session: aiohttp.ClientSession, gw: GatewayProcess, **labels: str) -> float:
    """The sum of `gateway_rate_limited_total` samples with `labels` (`name` is one of its labels,
    which `tests.dataplane.metric` takes as the metric's name)."""
    async with session.get(gw.admin_url + "/metrics") as resp:
        text = await resp.text()
    total = 0.0
    for m in filter(None, map(SAMPLE.match, text.splitlines())):
        have = dict(LABEL.findall(m.group(2) or ""))
        if m.group(1) == "gateway_rate_limited_total" and all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


async def open_call(gw: GatewayProcess, key: str, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A call on a connection of its own, left open (closing the writer is the client going away)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: {STD}\r\nAuthorization: Api-Key {secret(key)}\r\n"
        "Content-Length: 2\r\n\r\n{}".encode()
    )
    await writer.drain()
    return reader, writer


def assert_refused(status: int, headers: dict[str, str], body: bytes, message: str) -> None:
    assert status == 429, (status, body)
    error = json.loads(body)
    assert error["error_code"] == "rate_limited" and message in error["error"]
    assert int(headers["retry-after"]) >= 1
    assert len(headers["x-baseten-request-id"]) == 32


# -- HTTP --------------------------------------------------------------------------------------------


def test_a_key_with_5_rps_burst_5_gets_5_calls_then_429_with_the_fields_and_recovers(gw: GatewayProcess) -> None:
    async def scenario() -> None:
        async with Plane() as plane, aiohttp.ClientSession() as session:
            keys = {"rate5": {"requests_per_second": 5, "burst": 5}, "free": None}
            configure(gw, limited_doc(plane.url, "127.0.0.1:9", keys))
            firsts = [await call(session, gw, "rate5") for _ in range(5)]  # a fresh bucket holds five
            assert [status for status, _, _ in firsts] == [200] * 5
            # Successful answers tell the limits too: the first call left 4 tokens of 5.
            assert firsts[0][1]["ratelimit-policy"] == '"key";q=5;w=1'
            assert firsts[0][1]["ratelimit"] == '"key";r=4;t=1'
            status, headers, _ = await call(session, gw, "free")
            assert status == 200 and "ratelimit" not in headers and "ratelimit-policy" not in headers
            # Twenty at once: the bucket refills one token per 0.2 s, so most of them are refused.
            answers = await asyncio.gather(*(call(session, gw, "rate5") for _ in range(20)))
            refused = [a for a in answers if a[0] != 200]
            assert refused, "no call was refused"
            status, headers, body = refused[0]
            assert_refused(status, headers, body, "API key 'rate5' is past its rate limit")
            assert headers["ratelimit-policy"] == '"key";q=5;w=1'
            assert re.fullmatch(r'"key";r=0;t=[01]', headers["ratelimit"]), headers["ratelimit"]
            admitted = 6 + sum(1 for a in answers if a[0] == 200)
            assert len(plane.requests) == admitted  # a refused call never reaches the plane
            await until(ok_again(session, gw, "rate5"), "the key's bucket to refill")

            # At least those refused above (the polling may have been refused a few times more).
            assert await rate_limited(session, gw, limit="key", name="rate5", kind="rate") >= len(refused)
            async with session.get(gw.admin_url + "/metrics") as resp:
                text = await resp.text()
            assert secret("rate5") not in text and 'name="rate5"' in text

    asyncio.run(scenario())


def test_a_reload_keeps_an_unchanged_limits_state_and_applies_a_changed_one(gw: GatewayProcess) -> None:
    async def scenario() -> None:
        async with Plane() as plane, aiohttp.ClientSession() as session:
            doc = limited_doc(plane.url, "127.0.0.1:9", {"slow": {"requests_per_second": 0.01, "burst": 1}})
            configure(gw, doc)
            assert (await call(session, gw, "slow"))[0] == 200
            assert (await call(session, gw, "slow"))[0] == 429
            doc["gateway"]["hold_timeout_seconds"] = 30  # some other change: the bucket stays empty
            configure(gw, doc)
            assert (await call(session, gw, "slow"))[0] == 429
            doc["api_keys"][-1]["rate_limit"] = {"max_concurrent": 10}  # the rate limit removed
            configure(gw, doc)
            assert (await call(session, gw, "slow"))[0] == 200

    asyncio.run(scenario())


def test_a_team_limit_is_shared_by_its_keys(gw: GatewayProcess) -> None:
    async def scenario() -> None:
        async with Plane() as plane, aiohttp.ClientSession() as session:
            team = {"requests_per_second": 0.01, "burst": 3}
            configure(gw, limited_doc(plane.url, "127.0.0.1:9", {"team-a": None, "team-b": None}, team))
            assert [(await call(session, gw, k))[0] for k in ("team-a", "team-a", "team-b")] == [200, 200, 200]
            for key in ("team-b", "team-a"):
                status, headers, body = await call(session, gw, key)
                assert_refused(status, headers, body, "team 'acme' is past its rate limit")
                assert headers["ratelimit-policy"] == '"team";q=3;w=300'
            assert await rate_limited(session, gw, limit="team", name="acme", kind="rate") == 2
            assert len(plane.requests) == 3

    asyncio.run(scenario())


def test_max_concurrent_counts_calls_open_on_a_slow_plane_and_a_cancel_frees_its_slot(gw: GatewayProcess) -> None:
    async def scenario() -> None:
        async with Plane(blocking=True, block_seconds=30) as plane, aiohttp.ClientSession() as session:
            configure(gw, limited_doc(plane.url, "127.0.0.1:9", {"conc2": {"max_concurrent": 2}}))
            slow = [await open_call(gw, "conc2", f"{PRODUCTION}?n={i}") for i in range(2)]
            await until(lambda: len(plane.requests) == 2, "two calls open at the plane")
            status, headers, body = await call(session, gw, "conc2")
            assert_refused(status, headers, body, "API key 'conc2' has its max_concurrent calls open")
            assert headers["ratelimit-policy"] == '"key-concurrency";q=2;qu="concurrency"'
            assert headers["ratelimit"] == '"key-concurrency";r=0'

            slow[0][1].close()  # the client goes away: its call ends, and gives its slot back
            await until(inflight_is(session, gw, 1, deployment="v1"), "the cancel to end")
            third = asyncio.create_task(call(session, gw, "conc2", f"{PRODUCTION}?n=3"))
            await until(lambda: len(plane.requests) == 3, "a third call to be admitted")
            assert (await call(session, gw, "conc2"))[0] == 429  # two open again
            plane.release.set()
            assert (await slow[1][0].readline()).startswith(b"HTTP/1.1 200")
            assert (await third)[0] == 200
            slow[1][1].close()
            await until(ok_again(session, gw, "conc2"), "both slots to be free")
            assert await rate_limited(session, gw, limit="key", name="conc2", kind="concurrency") == 2

    asyncio.run(scenario())


def test_a_held_call_holds_its_slot_and_gives_it_back_when_its_hold_times_out(gw: GatewayProcess) -> None:
    async def scenario() -> None:
        async with Plane() as plane, aiohttp.ClientSession() as session:
            doc = limited_doc(plane.url, "127.0.0.1:9", {"conc1": {"max_concurrent": 1}})
            doc["gateway"]["hold_timeout_seconds"] = 1
            doc["models"]["abc123"]["environments"]["cold"] = {"deployment": "v0"}  # v0 is scaled to zero
            configure(gw, doc)
            held = asyncio.create_task(call(session, gw, "conc1", "/environments/cold/predict"))
            await until(lambda: metric(session, gw, "gateway_held_requests", deployment="v0"), "the call to be held")
            status, headers, body = await call(session, gw, "conc1")
            assert_refused(status, headers, body, "has its max_concurrent calls open")
            assert (await asyncio.wait_for(held, 10))[0] == 503  # the hold timed out
            assert (await call(session, gw, "conc1"))[0] == 200

    asyncio.run(scenario())


def test_async_submits_count_against_the_key(gw: GatewayProcess) -> None:
    async def scenario() -> None:
        async with Plane() as plane, aiohttp.ClientSession() as session:
            configure(gw, limited_doc(plane.url, "127.0.0.1:9", {"async2": {"requests_per_second": 0.01, "burst": 2}}))
            submit = "/environments/production/async_predict"
            body = json.dumps({"model_input": {"n": 1}}).encode()
            assert [(await call(session, gw, "async2", submit, body=body))[0] for _ in range(2)] == [201, 201]
            status, headers, answer = await call(session, gw, "async2", submit, body=body)
            assert_refused(status, headers, answer, "API key 'async2' is past its rate limit")
            assert (await call(session, gw, "async2"))[0] == 429  # the same bucket as synchronous calls

    asyncio.run(scenario())


# -- WebSocket -----------------------------------------------------------------------------------------


def test_a_websocket_session_is_one_open_call_for_its_whole_life(gw: GatewayProcess) -> None:
    async def scenario() -> None:
        async with Plane() as plane, aiohttp.ClientSession() as session:
            configure(gw, limited_doc(plane.url, "127.0.0.1:9", {"ws1": {"max_concurrent": 1}}))
            url = gw.url + "/environments/production/websocket"
            async with session.ws_connect(url, headers={"Host": STD, **auth("ws1")}) as ws:
                await ws.send_str("hello")
                assert (await ws.receive(timeout=10)).data == "hello"
                status, headers, body = await call(session, gw, "ws1")
                assert_refused(status, headers, body, "API key 'ws1' has its max_concurrent calls open")
                with pytest.raises(aiohttp.WSServerHandshakeError) as second:
                    await session.ws_connect(url, headers={"Host": STD, **auth("ws1")})
                assert second.value.status == 429
                await ws.send_str("still open")
                assert (await ws.receive(timeout=10)).data == "still open"
            await until(ok_again(session, gw, "ws1"), "the closed session to give its slot back")

    asyncio.run(scenario())


# -- gRPC ----------------------------------------------------------------------------------------------


def test_grpc_calls_are_limited_with_retry_info_in_the_trailers(gw: GatewayProcess, grpc_plane: GrpcPlane) -> None:
    async def scenario() -> None:
        async with Plane() as plane, aiohttp.ClientSession() as session:
            limits = {"grpc2": {"requests_per_second": 0.01, "burst": 2}}
            configure(gw, limited_doc(plane.url, grpc_plane.address, limits))
            metadata = (("authorization", f"Api-Key {secret('grpc2')}"),)
            with channel(gw, GRPC_HOST) as ch:
                for text in (b"one", b"two"):
                    assert unary(ch, "Echo")(text, metadata=metadata, timeout=10) == text
                with pytest.raises(grpc.RpcError) as refused:
                    unary(ch, "Echo")(b"three", metadata=metadata, timeout=10)
            error = refused.value
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
            assert "API key 'grpc2' is past its rate limit" in (error.details() or "")  # type: ignore[attr-defined]
            retry_after = int(trailer(error, "retry-after"))  # type: ignore[arg-type]
            assert retry_after >= 1 and trailer(error, "grpc-retry-pushback-ms") == str(retry_after * 1000)
            assert trailer(error, "ratelimit-policy") == '"key";q=2;w=200'
            assert (await call(session, gw, "grpc2"))[0] == 429  # one bucket for every protocol

    asyncio.run(scenario())


def test_an_open_grpc_call_keeps_its_slot_until_it_ends(gw: GatewayProcess, grpc_plane: GrpcPlane) -> None:
    async def scenario() -> None:
        async with Plane() as plane, aiohttp.ClientSession() as session:
            configure(gw, limited_doc(plane.url, grpc_plane.address, {"grpc-c": {"max_concurrent": 1}}))
            metadata = (("authorization", f"Api-Key {secret('grpc-c')}"),)
            with channel(gw, GRPC_HOST) as ch, futures.ThreadPoolExecutor(1) as pool:
                hanging = pool.submit(unary(ch, "Hang"), b"", metadata=metadata, timeout=3)
                await until(inflight_is(session, gw, 1, protocol="grpc"), "the open call")
                with pytest.raises(grpc.RpcError) as refused:
                    unary(ch, "Echo")(b"second", metadata=metadata, timeout=10)
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
                assert (await call(session, gw, "grpc-c"))[0] == 429  # the gRPC call holds the key's slot
                with pytest.raises(grpc.RpcError):
                    hanging.result(10)  # its deadline passes
                await until(ok_again(session, gw, "grpc-c"), "the slot to be free")
                assert unary(ch, "Echo")(b"third", metadata=metadata, timeout=10) == b"third"

    asyncio.run(scenario())


def test_a_held_grpc_call_gives_its_slot_back_when_its_hold_times_out(
    gw: GatewayProcess, grpc_plane: GrpcPlane
) -> None:
    async def scenario() -> None:
        async with Plane() as plane, aiohttp.ClientSession() as session:
            doc = limited_doc(plane.url, grpc_plane.address, {"grpc-h": {"max_concurrent": 1}})
            doc["gateway"]["hold_timeout_seconds"] = 1
            doc["models"]["abc123"]["environments"]["cold"] = {"deployment": "v0"}  # v0 is scaled to zero
            configure(gw, doc)
            metadata = (("authorization", f"Api-Key {secret('grpc-h')}"), ("x-baseten-environment", "cold"))
            with channel(gw, GRPC_HOST) as ch, futures.ThreadPoolExecutor(1) as pool:
                held = pool.submit(unary(ch, "Echo"), b"held", metadata=metadata, timeout=10)
                await until(
                    lambda: metric(session, gw, "gateway_held_requests", protocol="grpc"), "the gRPC call to be held"
                )
                assert (await call(session, gw, "grpc-h"))[0] == 429  # the held call holds the key's slot
                with pytest.raises(grpc.RpcError) as timed_out:
                    held.result(10)
                assert timed_out.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
            assert (await call(session, gw, "grpc-h"))[0] == 200

    asyncio.run(scenario())
