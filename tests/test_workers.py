"""`--workers N` (issue 5): one port, merged metrics, reloads together, a dead worker restarted."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.support import DEMO_KEY, GatewayProcess, example_doc, wait_for, write_table

HOST = {"Host": "model-abc123.api.example.com", "Authorization": f"Api-Key {DEMO_KEY}"}


def test_workers_share_a_port_report_together_and_reload_together(tmp_path: Path) -> None:
    async def pid(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"ok": True})

    async def scenario() -> None:
        app = web.Application()
        app.router.add_post("/predict", pid)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        table = write_table(tmp_path / "t.yaml", example_doc(url, url))
        gw = GatewayProcess(table, "--workers", "2").start()
        try:
            routing = await asyncio.to_thread(wait_for, lambda: _workers_ready(gw, 2))
            first_pids = {w["pid"] for w in routing["workers"]}
            assert len(first_pids) == 2 and len({w["digest"] for w in routing["workers"]}) == 1

            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
                for _ in range(60):  # new connection each: the kernel spreads them over both workers
                    async with session.post(gw.url + "/production/predict", headers=HOST, data=b"{}") as r:
                        assert r.status == 200

            def counted() -> bool:
                _, metrics = gw.admin("GET", "/metrics")
                values = re.findall(r'gateway_requests_total\{model="abc123"[^}]*code="200"\} (\S+)', metrics)
                return sum(float(v) for v in values) == 60

            await asyncio.to_thread(wait_for, counted)  # summed over both workers

            doc = example_doc(url, url)
            doc["gateway"]["hold_timeout_seconds"] = 42
            write_table(table, doc)
            status, body = await asyncio.to_thread(gw.admin, "POST", "/v1/routing/reload")
            assert status == 200 and body["ok"] and body["changed"]
            new_digest = body["digest"]

            def reloaded() -> bool:
                _, r = gw.admin("GET", "/v1/routing")
                return all(w["digest"] == new_digest for w in r["workers"]) and len(r["workers"]) == 2

            await asyncio.to_thread(wait_for, reloaded, "both workers to reload", 10)

            victim = sorted(first_pids)[0]
            os.kill(victim, signal.SIGKILL)

            def restarted() -> dict | None:
                r = _workers_ready(gw, 2)
                return r if r and victim not in {w["pid"] for w in r["workers"]} else None

            await asyncio.to_thread(wait_for, restarted, "the killed worker to be restarted", 30)
            async with aiohttp.ClientSession() as session:
                async with session.post(gw.url + "/production/predict", headers=HOST, data=b"{}") as r:
                    assert r.status == 200
        finally:
            code = gw.stop()
            await runner.cleanup()
        assert code == 0

    asyncio.run(scenario())


def _workers_ready(gw: GatewayProcess, n: int) -> dict | None:
    status, body = gw.admin("GET", "/v1/routing")
    if status != 200 or len(body.get("workers", [])) != n or not all(w["ready"] for w in body["workers"]):
        return None
    return body
