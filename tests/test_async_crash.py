"""Nothing accepted is lost (SPEC §10): a gateway SIGKILLed in a loop while clients submit and while
runs are on the plane, restarted on the same queue store each time. Every request that got its 201
is delivered to the webhook receiver (at least once, always with the same request id), and each
run the plane saw carries an accepted or at least stored id."""

from __future__ import annotations

import asyncio
import json
import random
import signal
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.dataplane import AUTH, STD, until
from tests.support import GatewayProcess, write_table
from tests.test_async import ENV, AsyncPlane, Receiver, async_doc

KILLS = 6


class SlowPlane(AsyncPlane):
    """Each run takes 30-80 ms, so kills land while runs are on the plane."""

    async def handle(self, request: web.Request) -> web.Response:
        await asyncio.sleep(random.uniform(0.03, 0.08))
        return await super().handle(request)


def test_sigkill_in_a_loop_loses_no_accepted_request(tmp_path: Path) -> None:
    accepted: set[str] = set()
    unanswered = 0  # submits cut by a kill before their answer: the client does not know; may or may not run

    async def client(session: aiohttp.ClientSession, gw: GatewayProcess, hook: Receiver, stop: asyncio.Event) -> None:
        nonlocal unanswered
        n = 0
        while not stop.is_set():
            n += 1
            doc = {"model_input": {"n": n}, "webhook_endpoint": hook.url}
            try:
                async with session.post(
                    gw.url + "/production/async_predict", data=json.dumps(doc), headers={"Host": STD, **AUTH}
                ) as r:
                    body = await r.read()
                    if r.status == 201:
                        accepted.add(json.loads(body)["request_id"])
                    else:
                        assert r.status in (429,), (r.status, body)  # never a 5xx for an accepted-looking submit
                await asyncio.sleep(0.01)
            except (aiohttp.ClientError, OSError):
                unanswered += 1
                await asyncio.sleep(0.05)

    async def scenario() -> None:
        async with SlowPlane() as plane, Receiver() as hook, aiohttp.ClientSession() as session:
            table = write_table(tmp_path / "table.yaml", async_doc(plane.url, concurrency=8))
            store = ("--queue-store", str(tmp_path / "queues"))
            rng = random.Random(7)
            for _ in range(KILLS):
                gw = GatewayProcess(table, *store, env=ENV).start()
                stop = asyncio.Event()
                clients = [asyncio.ensure_future(client(session, gw, hook, stop)) for _ in range(4)]
                await asyncio.sleep(rng.uniform(0.4, 1.2))
                gw.signal(signal.SIGKILL)
                gw.proc.wait()  # type: ignore[union-attr]
                stop.set()
                await asyncio.gather(*clients)
                gw.log.close()
            gw = GatewayProcess(table, *store, env=ENV).start()  # the last one runs the queue dry
            try:
                delivered = lambda: accepted <= {d["body"]["request_id"] for d in hook.deliveries}  # noqa: E731
                await until(delivered, "every accepted request at the webhook receiver", timeout=90)
            finally:
                gw.stop()
        got = [d["body"]["request_id"] for d in hook.deliveries]
        lost = accepted - set(got)
        assert not lost, f"{len(lost)} accepted requests lost"
        assert all(d["baseten_ok"] and d["standard_ok"] for d in hook.deliveries)
        ran = {c["id"] for c in plane.calls}
        assert accepted <= ran  # each ran on the plane, under its own id
        duplicates = len(got) - len(set(got))
        print(f"\ncrash loop: {KILLS} kills, accepted {len(accepted)}, delivered {len(set(got))}, "
              f"duplicated deliveries {duplicates}, plane runs {len(plane.calls)} for {len(ran)} ids, "
              f"submits cut by a kill {unanswered}, lost {len(lost)}")  # fmt: skip
        assert len(accepted) > 50  # the loop really submitted under the kills

    asyncio.run(scenario())
