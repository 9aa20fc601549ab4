"""Async inference (SPEC §10) through a real gateway process: a real plane, a real webhook receiver
on 127.0.0.1 that checks both signature schemes, and the embedded SQLite stores on disk."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.dataplane import AUTH, STD, metric, until
from tests.support import GatewayProcess, example_doc, write_table

SECRET_A = "plain-secret-a"
SECRET_B = "whsec_" + base64.b64encode(b"standard-secret-b").decode()
REGIONAL_US = "model-abc123-prod-us.api.example.com"


class AsyncPlane:
    """A model plane: records every predict (request id, body, time) and answers per `script`."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.statuses: list[int] = []  # answers to give, in order; then 200
        self.gate: asyncio.Event | None = None  # set: calls wait for it
        self.block: asyncio.Event | None = None  # set: calls whose body mentions "block" wait for it
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> AsyncPlane:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.gate is not None:
            self.gate.set()
        assert self.runner is not None
        await self.runner.cleanup()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.calls.append(
            {
                "path": request.path,
                "id": request.headers.get("x-baseten-request-id"),
                "body": body,
                "t": time.monotonic(),
            }
        )
        if self.gate is not None:
            await self.gate.wait()
        if b"block" in body and self.block is not None:
            await self.block.wait()
        status = self.statuses.pop(0) if self.statuses else 200
        if status != 200:
            return web.json_response({"error": f"scripted {status}"}, status=status)
        return web.json_response({"echo": json.loads(body)})


class Receiver:
    """A webhook receiver that verifies both signature schemes with the table's two secrets."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.deliveries: list[dict] = []
        self.statuses = statuses or []
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        h = request.headers
        self.deliveries.append(
            {
                "body": json.loads(body),
                "headers": dict(h),
                "baseten_ok": baseten_ok(body, h),
                "standard_ok": standard_ok(body, h),
            }
        )
        status = self.statuses.pop(0) if self.statuses else 200
        return web.Response(status=status)


def baseten_ok(body: bytes, headers) -> bool:  # noqa: ANN001
    """Each active secret's `v1=` entry verifies (written here by hand, not with the gateway's code)."""
    entries = headers.get("x-baseten-signature", "").split(",")
    want = [hmac.new(s.encode(), body, hashlib.sha256).hexdigest() for s in (SECRET_A, SECRET_B)]
    return sorted(e.strip().removeprefix("v1=") for e in entries) == sorted(want)


def standard_ok(body: bytes, headers) -> bool:  # noqa: ANN001
    msg_id, ts = headers.get("webhook-id", ""), headers.get("webhook-timestamp", "")
    signed = f"{msg_id}.{ts}.".encode() + body
    keys = [SECRET_A.encode(), base64.b64decode(SECRET_B.removeprefix("whsec_"))]
    want = sorted(base64.b64encode(hmac.new(k, signed, hashlib.sha256).digest()).decode() for k in keys)
    got = sorted(e.removeprefix("v1,") for e in headers.get("webhook-signature", "").split())
    return got == want and abs(time.time() - int(ts or 0)) < 300


def async_doc(plane_url: str, *, concurrency: int | None = None, webhook_retry: dict | None = None) -> dict:
    doc = example_doc(plane_url, plane_url)
    doc["gateway"]["async"] = {
        "webhook_allowed_hosts": ["127.0.0.1"],
        "webhook_secrets": [{"name": "a", "secret_env": "WH_SECRET_A"}, {"name": "b", "secret_env": "WH_SECRET_B"}],
        "webhook_retry": webhook_retry or {"max_attempts": 5, "initial_delay_ms": 200, "max_delay_ms": 1000},
    }
    if concurrency is not None:
        doc["models"]["abc123"]["environments"]["production"]["autoscaling"] = {"concurrency_target": concurrency}
    return doc


ENV = {"WH_SECRET_A": SECRET_A, "WH_SECRET_B": SECRET_B}


def start_gateway(tmp_path: Path, doc: dict) -> GatewayProcess:
    table = write_table(tmp_path / "table.yaml", doc)
    return GatewayProcess(table, "--queue-store", str(tmp_path / "queues"), env=ENV).start()


@pytest.fixture
def tmp(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


async def post(session: aiohttp.ClientSession, gw: GatewayProcess, path: str, doc: object, host: str = STD,
               headers: dict | None = None) -> tuple[int, dict, dict]:  # fmt: skip
    data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    async with session.post(gw.url + path, data=data, headers={"Host": host, **AUTH, **(headers or {})}) as r:
        body = await r.read()
        return r.status, {k.lower(): v for k, v in r.headers.items()}, json.loads(body) if body else {}


async def get(session: aiohttp.ClientSession, gw: GatewayProcess, path: str, host: str = STD, method: str = "GET",
              headers: dict | None = None) -> tuple[int, bytes]:  # fmt: skip
    async with session.request(method, gw.url + path, headers={"Host": host, **AUTH, **(headers or {})}) as r:
        return r.status, await r.read()


async def status_of(session: aiohttp.ClientSession, gw: GatewayProcess, rid: str, host: str = STD) -> dict:
    code, body = await get(session, gw, f"/async_request/{rid}", host)
    assert code == 200, body
    return json.loads(body)


def test_a_call_is_stored_run_delivered_signed_and_its_result_kept(tmp: Path) -> None:
    async def scenario() -> None:
        async with AsyncPlane() as plane, Receiver() as hook, aiohttp.ClientSession() as session:
            gw = start_gateway(tmp, async_doc(plane.url))
            try:
                code, headers, body = await post(
                    session, gw, "/production/async_predict",
                    {"model_input": {"prompt": "hi"}, "webhook_endpoint": hook.url},
                )  # fmt: skip
                assert code == 201, body
                rid = body["request_id"]
                assert len(rid) == 32 and headers["x-baseten-request-id"] == rid
                await until(lambda: hook.deliveries, "the webhook")
                call = plane.calls[0]
                assert call["path"] == "/predict" and call["id"] == rid and json.loads(call["body"]) == {"prompt": "hi"}
                d = hook.deliveries[0]
                assert d["baseten_ok"] and d["standard_ok"], d["headers"]
                assert d["headers"]["x-baseten-request-id"] == rid and d["headers"]["webhook-id"] == rid
                assert d["body"]["request_id"] == rid and d["body"]["type"] == "async_request_completed"
                assert d["body"]["model_id"] == "abc123" and d["body"]["deployment_id"] == "v1"
                assert d["body"]["data"] == {"echo": {"prompt": "hi"}} and d["body"]["errors"] == []

                async def delivered() -> bool:
                    return (await status_of(session, gw, rid))["webhook_status"] == "SUCCEEDED"

                await until(delivered, "webhook_status SUCCEEDED")
                st = await status_of(session, gw, rid)
                assert st["status"] == "SUCCEEDED" and st["model_id"] == "abc123" and st["deployment_id"] == "v1"
                assert st["errors"] == [] and st["created_at"].endswith("Z")
                code, result = await get(session, gw, f"/async_request/{rid}/result")
                assert code == 200 and json.loads(result) == {"echo": {"prompt": "hi"}}
                # Another team's key sees nothing of it.
                code, _ = await get(
                    session, gw, f"/async_request/{rid}", headers={"Authorization": "Api-Key demo-key-globex"}
                )
                assert code == 404
            finally:
                gw.stop()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("doc", "status", "words"),
    [
        ({"model_input": 1, "colour": "red"}, 400, "unknown field 'colour'"),
        ({"webhook_endpoint": "https://example.com"}, 400, "'model_input' is required"),
        ({"model_input": 1, "priority": 3}, 400, "'priority'"),
        ({"model_input": 1, "priority": "1"}, 400, "'priority'"),
        ({"model_input": 1, "max_time_in_queue_seconds": 5}, 400, "'max_time_in_queue_seconds'"),
        (
            {"model_input": 1, "inference_retry_config": {"max_attempts": 11}},
            400,
            "inference_retry_config.max_attempts",
        ),
        ({"model_input": 1, "inference_retry_config": {"tries": 1}}, 400, "inference_retry_config.tries"),
        ({"model_input": 1, "webhook_endpoint": "http://example.com/hook"}, 400, "'webhook_endpoint'"),
        (b"[1, 2]", 400, "JSON object"),
        (b"not json", 400, "JSON object"),
        ({"model_input": "x" * (256 * 1024)}, 413, "256"),
    ],
)
def test_a_bad_submit_is_refused_naming_the_field_and_nothing_is_stored(
    tmp: Path, doc: object, status: int, words: str
) -> None:
    async def scenario() -> None:
        async with AsyncPlane() as plane, aiohttp.ClientSession() as session:
            gw = start_gateway(tmp, async_doc(plane.url))
            try:
                code, _, body = await post(session, gw, "/production/async_predict", doc)
                assert code == status and words in body["error"], body
                await asyncio.sleep(0.3)
                assert plane.calls == []
            finally:
                gw.stop()
        rows = sqlite3.connect(tmp / "queues" / "async-queue-us.sqlite3").execute("SELECT COUNT(*) FROM requests")
        assert rows.fetchone()[0] == 0

    asyncio.run(scenario())


def test_priority_then_fifo(tmp: Path) -> None:
    async def scenario() -> None:
        async with AsyncPlane() as plane, aiohttp.ClientSession() as session:
            plane.gate = asyncio.Event()
            gw = start_gateway(tmp, async_doc(plane.url, concurrency=1))
            try:
                code, _, first = await post(session, gw, "/production/async_predict", {"model_input": "first"})
                await until(lambda: len(plane.calls) == 1, "the first run to start")
                order = [("p2-a", 2), ("p1-a", 1), ("p0-a", 0), ("p2-b", 2), ("p0-b", 0), ("p1-b", 1)]
                for name, priority in order:
                    code, _, _ = await post(
                        session, gw, "/production/async_predict", {"model_input": name, "priority": priority}
                    )
                    assert code == 201
                code, body = await get(session, gw, "/production/async_queue_status")
                counts = json.loads(body)
                assert code == 200 and counts["num_queued_requests"] == 6 and counts["num_in_progress_requests"] == 1
                assert counts["model_id"] == "abc123" and counts["deployment_id"] == "v1"
                plane.gate.set()
                await until(lambda: len(plane.calls) == 7, "every run")
                ran = [json.loads(c["body"]) for c in plane.calls[1:]]
                assert ran == ["p0-a", "p0-b", "p1-a", "p1-b", "p2-a", "p2-b"]
            finally:
                gw.stop()

    asyncio.run(scenario())


def test_retries_back_off_with_the_same_request_id_then_fail(tmp: Path) -> None:
    async def scenario() -> None:
        async with AsyncPlane() as plane, Receiver() as hook, aiohttp.ClientSession() as session:
            plane.statuses = [500, 503, 200]
            gw = start_gateway(tmp, async_doc(plane.url))
            try:
                retry = {"max_attempts": 3, "initial_delay_ms": 300, "max_delay_ms": 5000}
                _, _, ok = await post(session, gw, "/production/async_predict",
                                      {"model_input": 1, "inference_retry_config": retry, "webhook_endpoint": hook.url})  # fmt: skip
                await until(lambda: hook.deliveries, "the webhook after two retries", timeout=15)
                assert [c["id"] for c in plane.calls] == [ok["request_id"]] * 3
                gaps = [b["t"] - a["t"] for a, b in zip(plane.calls, plane.calls[1:], strict=False)]
                assert gaps[0] >= 0.3 and gaps[1] >= 0.6, gaps  # 300 ms, then doubled
                assert hook.deliveries[0]["body"]["errors"] == []

                plane.statuses = [500, 500]
                _, _, bad = await post(session, gw, "/production/async_predict",
                                       {"model_input": 2, "inference_retry_config": {**retry, "max_attempts": 2}})  # fmt: skip

                async def failed() -> bool:
                    return (await status_of(session, gw, bad["request_id"]))["status"] == "FAILED"

                await until(failed, "FAILED after two attempts", timeout=15)
                st = await status_of(session, gw, bad["request_id"])
                assert (
                    st["errors"][0]["code"] == "MODEL_PREDICT_ERROR" and st["webhook_status"] == "NO_WEBHOOK_PROVIDED"
                )
                assert sum(1 for c in plane.calls if c["id"] == bad["request_id"]) == 2
                code, _ = await get(session, gw, f"/async_request/{bad['request_id']}/result")
                assert code == 409

                plane.statuses = [400]  # a 4xx other than 429 fails at once
                _, _, four = await post(session, gw, "/production/async_predict", {"model_input": 3})

                async def failed_once() -> bool:
                    return (await status_of(session, gw, four["request_id"]))["status"] == "FAILED"

                await until(failed_once, "FAILED at once")
                assert sum(1 for c in plane.calls if c["id"] == four["request_id"]) == 1
            finally:
                gw.stop()

    asyncio.run(scenario())


def test_cancel_a_queued_request_and_not_a_running_one(tmp: Path) -> None:
    async def scenario() -> None:
        async with AsyncPlane() as plane, aiohttp.ClientSession() as session:
            plane.gate = asyncio.Event()
            gw = start_gateway(tmp, async_doc(plane.url, concurrency=1))
            try:
                _, _, running = await post(session, gw, "/production/async_predict", {"model_input": "running"})
                await until(lambda: plane.calls, "the run to start")
                _, _, queued = await post(session, gw, "/production/async_predict", {"model_input": "queued"})
                code, body = await get(session, gw, f"/async_request/{queued['request_id']}", method="DELETE")
                assert code == 200 and json.loads(body)["canceled"] is True
                code, body = await get(session, gw, f"/async_request/{running['request_id']}", method="DELETE")
                assert code == 200 and json.loads(body)["canceled"] is False
                plane.gate.set()

                async def done() -> bool:
                    return (await status_of(session, gw, running["request_id"]))["status"] == "SUCCEEDED"

                await until(done, "the running request to finish")
                await asyncio.sleep(0.5)
                assert [json.loads(c["body"]) for c in plane.calls] == ["running"]  # the canceled one never ran
                assert (await status_of(session, gw, queued["request_id"]))["status"] == "CANCELED"
            finally:
                gw.stop()

    asyncio.run(scenario())


def test_a_regional_request_is_stored_only_in_its_regions_file_and_421_elsewhere(tmp: Path) -> None:
    async def scenario() -> None:
        async with AsyncPlane() as plane, aiohttp.ClientSession() as session:
            plane.gate = asyncio.Event()  # keep it stored while we look
            doc = async_doc(plane.url)
            doc["gateway"]["regions"] = ["us", "eu"]
            gw = start_gateway(tmp, doc)
            try:
                code, _, us = await post(
                    session, gw, "/async_predict", {"model_input": "marker-us-7"}, host=REGIONAL_US
                )
                assert code == 201
                code, _, eu = await post(session, gw, "/async_predict", {"model_input": "marker-eu-7"},
                                         host="model-abc123-prod-eu.api.example.com")  # fmt: skip
                assert code == 201
                await until(lambda: len(plane.calls) == 2, "both runs to start")
                # The regional host sees only its region's requests.
                code, _ = await get(session, gw, f"/async_request/{eu['request_id']}", host=REGIONAL_US)
                assert code == 404
                assert (await status_of(session, gw, us["request_id"], REGIONAL_US))["status"] == "IN_PROGRESS"
            finally:
                plane.gate.set()
                gw.stop()
        us_file = (tmp / "queues" / "async-queue-us.sqlite3").read_bytes() + wal(tmp, "us")
        eu_file = (tmp / "queues" / "async-queue-eu.sqlite3").read_bytes() + wal(tmp, "eu")
        assert b"marker-us-7" in us_file and b"marker-us-7" not in eu_file
        assert b"marker-eu-7" in eu_file and b"marker-eu-7" not in us_file

        # A gateway that serves only us (the example's setting) refuses eu submits: 421, nothing stored.
        async with AsyncPlane() as plane, aiohttp.ClientSession() as session:
            (tmp / "only-us").mkdir()
            gw = start_gateway(tmp / "only-us", async_doc(plane.url))
            try:
                code, _, body = await post(session, gw, "/async_predict", {"model_input": "x"},
                                           host="model-abc123-prod-eu.api.example.com")  # fmt: skip
                assert code == 421, body
                code, _, body = await post(session, gw, "/environments/prod-eu/async_predict", {"model_input": "x"})
                assert code == 421, body
            finally:
                gw.stop()
        assert not (tmp / "only-us" / "queues" / "async-queue-eu.sqlite3").exists()

    asyncio.run(scenario())


def wal(tmp: Path, region: str) -> bytes:
    path = tmp / "queues" / f"async-queue-{region}.sqlite3-wal"
    return path.read_bytes() if path.exists() else b""


def test_a_receiver_that_fails_then_recovers_gets_it_and_410_stops(tmp: Path) -> None:
    async def scenario() -> None:
        async with AsyncPlane() as plane, Receiver([500, 503]) as hook, Receiver([410]) as gone, \
                aiohttp.ClientSession() as session:  # fmt: skip
            gw = start_gateway(tmp, async_doc(plane.url))
            try:
                _, _, a = await post(
                    session, gw, "/production/async_predict", {"model_input": 1, "webhook_endpoint": hook.url}
                )
                _, _, b = await post(
                    session, gw, "/production/async_predict", {"model_input": 2, "webhook_endpoint": gone.url}
                )
                await until(lambda: len(hook.deliveries) == 3, "three deliveries (two refused)", timeout=15)
                assert {d["body"]["request_id"] for d in hook.deliveries} == {a["request_id"]}

                async def settled() -> bool:
                    sa = await status_of(session, gw, a["request_id"])
                    sb = await status_of(session, gw, b["request_id"])
                    return sa["webhook_status"] == "SUCCEEDED" and sb["webhook_status"] == "FAILED"

                await until(settled, "both webhooks settled")
                assert (await status_of(session, gw, b["request_id"]))["status"] == "WEBHOOK_FAILED"
                await asyncio.sleep(1.0)
                assert len(gone.deliveries) == 1  # 410: never again
                code, result = await get(session, gw, f"/async_request/{b['request_id']}/result")
                assert code == 200 and json.loads(result) == {"echo": 2}  # still retrievable
            finally:
                gw.stop()

    asyncio.run(scenario())


def test_a_request_waiting_for_a_scaled_to_zero_deployment_expires_and_its_result_is_purged(tmp: Path) -> None:
    async def scenario() -> None:
        async with AsyncPlane() as plane, Receiver() as hook, aiohttp.ClientSession() as session:
            doc = async_doc(plane.url)
            doc["gateway"]["async"]["result_ttl_seconds"] = 2
            doc["models"]["abc123"]["environments"]["production"]["deployment"] = "v0"  # scaled to zero
            gw = start_gateway(tmp, doc)
            try:
                _, _, req = await post(session, gw, "/production/async_predict",
                                       {"model_input": 1, "max_time_in_queue_seconds": 10, "webhook_endpoint": hook.url})  # fmt: skip
                await until(lambda: any(c["path"] == "/wake" for c in plane.calls), "a wake of the deployment")
                st = await status_of(session, gw, req["request_id"])
                assert st["status"] == "QUEUED"

                async def depth_shows_it() -> bool:  # it waits in the queue, so the depth gauge counts it
                    return await metric(session, gw, "gateway_async_queue_depth", deployment="v0") == 1

                await until(depth_shows_it, "gateway_async_queue_depth counting the waiting request", timeout=8)
                await until(lambda: hook.deliveries, "the EXPIRED webhook", timeout=20)
                d = hook.deliveries[0]["body"]
                assert d["errors"][0]["code"] == "MODEL_NOT_READY" and d["data"] is None
                assert (await status_of(session, gw, req["request_id"]))["status"] == "EXPIRED"
                assert not any(c["path"] == "/predict" for c in plane.calls)

                async def purged() -> bool:
                    return (await get(session, gw, f"/async_request/{req['request_id']}"))[0] == 404

                await until(purged, "the request purged after result_ttl_seconds", timeout=10)
            finally:
                gw.stop()

    asyncio.run(scenario())


def test_team_limits_answer_429_with_retry_after(tmp: Path) -> None:
    async def scenario() -> None:
        async with AsyncPlane() as plane, aiohttp.ClientSession() as session:
            plane.gate = asyncio.Event()
            doc = async_doc(plane.url, concurrency=1)
            doc["teams"]["acme"]["async"] = {"max_queued": 3, "submits_per_second": 50, "status_calls_per_second": 5}
            gw = start_gateway(tmp, doc)
            try:
                codes = [
                    (await post(session, gw, "/production/async_predict", {"model_input": i}))[0] for i in range(5)
                ]
                assert codes == [201, 201, 201, 429, 429]
                code, headers, body = await post(session, gw, "/production/async_predict", {"model_input": 9})
                assert code == 429 and body["error_code"] == "rate_limited" and int(headers["retry-after"]) >= 1
                statuses = [(await get(session, gw, "/production/async_queue_status"))[0] for _ in range(8)]
                assert statuses.count(200) == 5 and statuses[-1] == 429  # five per second, per worker
            finally:
                plane.gate.set()
                gw.stop()

    asyncio.run(scenario())


def test_chains_and_a_webhook_to_a_refused_address(tmp: Path) -> None:
    async def scenario() -> None:
        async with AsyncPlane() as plane, aiohttp.ClientSession() as session:
            gw = start_gateway(tmp, async_doc(plane.url))
            try:
                code, _, ok = await post(session, gw, "/production/async_run_remote", {"model_input": {"x": 1}},
                                         host="chain-pipeline1.api.example.com")  # fmt: skip
                assert code == 201

                async def ran() -> bool:
                    code, body = await get(session, gw, f"/async_request/{ok['request_id']}",
                                           host="chain-pipeline1.api.example.com")  # fmt: skip
                    return code == 200 and json.loads(body)["status"] == "SUCCEEDED"

                await until(ran, "the chain's run")
                assert plane.calls[0]["path"] == "/run_remote"
                _, body = await get(
                    session, gw, f"/async_request/{ok['request_id']}", host="chain-pipeline1.api.example.com"
                )
                assert json.loads(body)["chain_id"] == "pipeline1"
                # https to a private address is accepted at submit, refused at delivery (checked on the resolved address).
                code, _, bad = await post(session, gw, "/production/async_predict",
                                          {"model_input": 1, "webhook_endpoint": "https://10.1.2.3/hook"})  # fmt: skip
                assert code == 201

                async def refused() -> bool:
                    return (await status_of(session, gw, bad["request_id"]))["webhook_status"] == "FAILED"

                await until(refused, "the webhook refused")
                assert (await status_of(session, gw, bad["request_id"]))["status"] == "WEBHOOK_FAILED"
            finally:
                gw.stop()

    asyncio.run(scenario())


def test_sync_calls_keep_precedence_over_the_async_queue(tmp: Path) -> None:
    """concurrency_target 1: a sync call in flight leaves no room for async runs, and a sync call held
    for that slot takes it before the queue does."""

    async def sync_call(session: aiohttp.ClientSession, gw: GatewayProcess, body: object) -> int:
        async with session.post(
            gw.url + "/production/predict", data=json.dumps(body), headers={"Host": STD, **AUTH}
        ) as r:
            await r.read()
            return r.status

    async def scenario() -> None:
        async with AsyncPlane() as plane, aiohttp.ClientSession() as session:
            plane.block = asyncio.Event()
            gw = start_gateway(tmp, async_doc(plane.url, concurrency=1))
            try:
                first = asyncio.ensure_future(sync_call(session, gw, {"block": "sync-a"}))
                await until(lambda: len(plane.calls) == 1, "the sync call on the plane")
                code, _, _ = await post(session, gw, "/production/async_predict", {"model_input": "async-x"})
                assert code == 201
                held = asyncio.ensure_future(sync_call(session, gw, "sync-b"))
                await asyncio.sleep(0.5)
                assert len(plane.calls) == 1  # neither the async run nor the second sync call took the slot
                plane.block.set()
                assert await first == 200 and await held == 200
                await until(lambda: len(plane.calls) == 3, "the async run once sync calls left room")
                assert [json.loads(c["body"]) for c in plane.calls] == [{"block": "sync-a"}, "sync-b", "async-x"]
            finally:
                gw.stop()

    asyncio.run(scenario())


def test_a_plane_429_backs_the_queue_off_without_using_an_attempt(tmp: Path) -> None:
    async def scenario() -> None:
        async with AsyncPlane() as plane, aiohttp.ClientSession() as session:
            plane.statuses = [429]
            gw = start_gateway(tmp, async_doc(plane.url))
            try:
                _, _, req = await post(session, gw, "/production/async_predict",
                                       {"model_input": 1, "inference_retry_config": {"max_attempts": 1}})  # fmt: skip

                async def succeeded() -> bool:
                    return (await status_of(session, gw, req["request_id"]))["status"] == "SUCCEEDED"

                await until(succeeded, "the run after the back-off")
                assert [c["id"] for c in plane.calls] == [req["request_id"]] * 2
                assert plane.calls[1]["t"] - plane.calls[0]["t"] >= 1.0  # the target backed off 1 s
            finally:
                gw.stop()

    asyncio.run(scenario())
