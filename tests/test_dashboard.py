"""deploy/grafana/gateway-dashboard.json: every PromQL expression names metrics and labels that a real
gateway exports, as scraped from its /metrics after calls of every kind the dashboard shows."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.dataplane import AUTH, STD, metric
from tests.planes import Plane
from tests.promql import PromQLError, parse, problems
from tests.support import REPO, GatewayProcess, example_doc, free_port, write_table

DASHBOARD = REPO / "deploy" / "grafana" / "gateway-dashboard.json"
SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? \S+$")
LABEL = re.compile(r'(\w+)="(?:[^"\\]|\\.)*"')
ENV = {"GATEWAY_DEMO_WEBHOOK_SECRET": "dashboard-test"}  # the example table's webhook secret


def expressions(dashboard: dict) -> list[str]:
    """Every target's `expr`, in rows or not, and the PromQL of the template variables."""
    found = []

    def panels(items: list[dict]) -> None:
        for panel in items:
            found.extend(t["expr"] for t in panel.get("targets", []) if "expr" in t)
            panels(panel.get("panels", []))

    panels(dashboard["panels"])
    found += [v["definition"] for v in dashboard["templating"]["list"] if v.get("type") == "query"]
    return found


def exported(text: str) -> tuple[dict[str, set[str]], set[str]]:
    """(sample name -> label names seen on it, histogram family names) of a /metrics answer."""
    samples: dict[str, set[str]] = {}
    histograms = set()
    for line in text.splitlines():
        if line.startswith("# TYPE ") and line.endswith(" histogram"):
            histograms.add(line.split()[2])
        m = SAMPLE.match(line)
        if m is not None:
            samples.setdefault(m.group(1), set()).update(LABEL.findall(m.group(2) or ""))
    return samples, histograms


async def exercise(gw: GatewayProcess, hook_url: str, session: aiohttp.ClientSession) -> str:
    """Calls of every kind the dashboard shows; the /metrics text once they have all been counted."""

    async def call(path: str, body: object = None) -> int:
        data = json.dumps(body if body is not None else {}).encode()
        async with session.post(gw.url + path, data=data, headers={"Host": STD, **AUTH}) as resp:
            await resp.read()
            return resp.status

    assert await call("/production/predict") == 200  # and a shadow copy (100%)
    assert await call("/environments/staging/predict") == 200  # the canary split
    assert await call("/environments/prod-eu/predict") >= 500  # its plane is down: an upstream error
    assert await call("/deployment/v0/predict") == 503  # held, then the hold times out (1 s)
    assert await call("/production/async_predict", {"model_input": {"n": 1}, "webhook_endpoint": hook_url}) == 201
    assert await call("/deployment/v9/async_predict", {"model_input": {"n": 2}}) == 201  # queued: its plane says 429
    status, body = await asyncio.to_thread(
        gw.admin, "POST", "/v1/models/abc123/environments/staging/promote",
        body={"deployment_id": "v2", "ramp_up_duration_seconds": 30},
    )  # fmt: skip
    assert status == 200, body
    status, body = await asyncio.to_thread(gw.admin, "POST", "/v1/routing/reload")
    assert status == 200, body
    for name, labels in (("gateway_webhook_deliveries_total", {"outcome": "delivered"}),
                         ("gateway_shadow_requests_total", {}), ("gateway_async_queue_depth", {})):  # fmt: skip
        for _ in range(200):  # bounded: 10 s
            if await metric(session, gw, name, **labels) > 0:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail(f"{name} was never counted")
    async with session.get(gw.admin_url + "/metrics") as resp:
        return await resp.text()


def test_every_dashboard_expression_names_what_the_gateway_exports(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = expressions(dashboard)
    assert len(exprs) >= 20

    async def scenario() -> str:
        async def webhook(request: web.Request) -> web.Response:
            await request.read()
            return web.json_response({"ok": True})

        app = web.Application()
        app.router.add_post("/hook", webhook)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        hook = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/hook"  # type: ignore[union-attr]
        async with Plane() as plane, Plane(fixed_status=429) as busy, aiohttp.ClientSession() as session:
            doc = example_doc(plane.url, f"http://127.0.0.1:{free_port()}")
            doc["planes"]["us-busy"] = {"region": "us", "url": busy.url}
            doc["models"]["abc123"]["deployments"]["v9"] = {"plane": "us-busy"}
            doc["gateway"]["hold_timeout_seconds"] = 1
            doc["models"]["abc123"]["environments"]["production"]["shadow"] = {"deployment": "v2", "percent": 100}
            table = write_table(tmp_path / "table.yaml", doc)
            gw = GatewayProcess(table, "--queue-store", str(tmp_path / "queues"), env=ENV).start()
            try:
                return await exercise(gw, hook, session)
            finally:
                gw.stop()
                await runner.cleanup()

    samples, histograms = exported(asyncio.run(scenario()))
    assert {"gateway_request_duration_seconds", "gateway_async_wait_seconds"} <= histograms
    found = [f"{expr}\n    {problem}" for expr in exprs for problem in problems(expr, samples, histograms)]
    assert not found, "\n".join(found)


EXPORTED = {
    "gateway_requests_total": {"model", "code"},
    "gateway_request_duration_seconds_bucket": {"model", "le"},
    "gateway_request_duration_seconds_count": {"model"},
}


@pytest.mark.parametrize(
    "expr, expected",
    [
        ('sum by (code) (rate(gateway_requests_total{model=~"$model"}[$__rate_interval]))', []),
        ("histogram_quantile(0.9, sum by (le) (rate(gateway_request_duration_seconds_bucket[5m])))", []),
        ("sum(rate(gateway_request_duration_seconds_count[5m])) by (model)", []),
        ("label_values(gateway_requests_total, model)", []),
        ("rate(gateway_requests_totl[5m])", ["gateway_requests_totl: not a metric the gateway exports"]),
        ('gateway_requests_total{modle="x"}', ["gateway_requests_total: no label 'modle'"]),
        ("sum by (nope) (gateway_requests_total)", ["by/on (nope): no metric of the expression has it"]),
        ('gateway_request_duration_seconds_count{le="1"}', ["gateway_request_duration_seconds_count: no label 'le'"]),
        ("gateway_request_duration_seconds_sum", ["gateway_request_duration_seconds_sum: histogram "
                                                  "gateway_request_duration_seconds exports no samples yet"]),
        ("gateway_request_duration_seconds", ["gateway_request_duration_seconds: not a metric the gateway exports"]),
        ("label_values(gateway_requests_total, team)", ["gateway_requests_total: no label 'team'"]),
    ],
)  # fmt: skip
def test_the_checker_finds_what_a_dashboard_gets_wrong(expr: str, expected: list[str]) -> None:
    assert problems(expr, EXPORTED, {"gateway_request_duration_seconds"}) == expected


@pytest.mark.parametrize("expr", ["sum(rat(gateway_requests_total[5m]))", '{__name__="x"}', "a{b c}", "x ~ y"])
def test_the_reader_refuses_what_it_does_not_understand(expr: str) -> None:
    with pytest.raises(PromQLError):
        parse(expr)
