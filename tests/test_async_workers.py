"""Async inference under `--workers 2` (SPEC §10): the workers share the region's queue file, every
request runs once (claims in the store), one worker reports the depth gauge, and the supervisor's
admin listener shows the queues."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import aiohttp

from tests.dataplane import metric, until
from tests.support import GatewayProcess, write_table
from tests.test_async import ENV, AsyncPlane, async_doc, post


def test_two_workers_run_each_request_once_and_report_one_depth(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with AsyncPlane() as plane, aiohttp.ClientSession() as session:
            plane.gate = asyncio.Event()
            table = write_table(tmp_path / "table.yaml", async_doc(plane.url, concurrency=2))
            gw = GatewayProcess(table, "--workers", "2", "--queue-store", str(tmp_path / "queues"), env=ENV).start()
            try:
                ids = []
                for i in range(40):  # new connections: the kernel spreads them over both workers
                    async with aiohttp.ClientSession() as one:
                        code, _, body = await post(one, gw, "/production/async_predict", {"model_input": i})
                    assert code == 201, body
                    ids.append(body["request_id"])

                async def depth_reported() -> bool:
                    return await metric(session, gw, "gateway_async_queue_depth", deployment="v1") > 0

                await until(depth_reported, "the depth gauge")
                depth = await metric(session, gw, "gateway_async_queue_depth", deployment="v1")
                status, queues = gw.admin("GET", "/v1/async/queues")
                assert status == 200 and queues["regions"] == ["us"]  # type: ignore[index]
                row = queues["queues"][0]  # type: ignore[index]
                assert row["model_id"] == "abc123" and row["queued"] + row["in_progress"] == 40
                assert depth <= 40  # one worker's view, not the sum of both over the same file
                plane.gate.set()
                await until(lambda: len({c["id"] for c in plane.calls}) == 40, "every request run", timeout=30)
                await asyncio.sleep(1.0)
                runs = Counter(c["id"] for c in plane.calls)
                assert set(runs) == set(ids) and max(runs.values()) == 1  # each ran once, on one worker
                assert sorted(json.loads(c["body"]) for c in plane.calls) == list(range(40))
            finally:
                gw.stop()

    asyncio.run(scenario())
