"""Helpers for the SPEC §6 data-plane tests (holding, backpressure, shadow, canary): table changes
through the admin reload, calls through the gateway, and metric values read from /metrics."""

from __future__ import annotations

import asyncio
import inspect
import re
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from tests.support import DEMO_KEY, GatewayProcess, write_table

STD = "model-abc123.api.example.com"
AUTH = {"Authorization": f"Api-Key {DEMO_KEY}"}
SAMPLE = re.compile(r"^(\w+)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def configure(gw: GatewayProcess, doc: dict) -> None:
    """Serve `doc`: rewrite the table file and reload it through the admin listener."""
    write_table(Path(gw.config), doc)
    status, body = gw.admin("POST", "/v1/routing/reload")
    assert status == 200 and body["ok"], body  # type: ignore[index]


async def until(predicate: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    """Poll `predicate` (sync or async; bounded) until it is true; fail naming `what` otherwise."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                result = predicate()
                if inspect.isawaitable(result):
                    result = await result
                if result:
                    return
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


async def metric(session: aiohttp.ClientSession, gw: GatewayProcess, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    async with session.get(gw.admin_url + "/metrics") as resp:
        text = await resp.text()
    total = 0.0
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m is None or m.group(1) != name:
            continue
        have = dict(LABEL.findall(m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


async def call(
    session: aiohttp.ClientSession, gw: GatewayProcess, path: str, *, body: object = b"{}",
    method: str = "POST", host: str = STD, headers: dict | None = None,
) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    """One call through the gateway: status, headers (lowercased; a repeated field fails), body."""
    async with session.request(
        method, gw.url + path, data=body, headers={"Host": host, **AUTH, **(headers or {})}
    ) as resp:  # fmt: skip
        data = await resp.read()
        names = [k.lower() for k in resp.headers]
        for name in ("x-baseten-deployment-id", "x-baseten-request-id"):
            assert names.count(name) <= 1, f"{name} sent {names.count(name)} times"
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, data
