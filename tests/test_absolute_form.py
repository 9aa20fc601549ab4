"""Absolute-form request targets (RFC 9112 §3.2.2; issue 13): clients configured with an HTTP proxy
send `POST http://model-x.../predict`. The target's authority routes; a Host that disagrees is 400."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import aiohttp
import pytest

from gateway.errors import ClientError
from gateway.headers import absolute_form
from tests.planes import Plane
from tests.support import (
    DEMO_KEY,
    GatewayProcess,
    example_doc,
    free_port,
    parse_response,
    raw_request,
    running_gateway,
    write_table,
)
from tests.test_proxy import serve, table

STD = "model-abc123.api.example.com"
AUTH = {"Authorization": f"Api-Key {DEMO_KEY}"}


@pytest.mark.parametrize(
    ("target", "host", "expected"),
    [
        ("/production/predict", None, None),
        (f"http://{STD}/production/predict", None, (STD, "/production/predict")),
        (
            f"HTTPS://{STD}:8443/production/sync/v1/models?limit=2",
            STD,
            (f"{STD}:8443", "/production/sync/v1/models?limit=2"),
        ),
        (f"http://{STD}", STD.upper(), (STD, "/")),
        (f"http://{STD}?x=1", None, (STD, "/?x=1")),
    ],
)
def test_absolute_form_gives_the_routing_host_and_the_origin_form(
    target: str, host: str | None, expected: object
) -> None:
    assert absolute_form(target, host) == expected


@pytest.mark.parametrize(
    ("target", "host", "words"),
    [
        (f"ftp://{STD}/production/predict", None, "not http or https"),
        (f"http://user@{STD}/production/predict", None, "user information"),
        ("http:///production/predict", None, "authority"),
        (f"http://{STD}/production/predict", "model-xyz789.api.example.com", "another host"),
    ],
)
def test_bad_absolute_forms_are_400(target: str, host: str | None, words: str) -> None:
    with pytest.raises(ClientError, match=words):
        absolute_form(target, host)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    dead = f"http://127.0.0.1:{free_port()}"
    config = write_table(tmp_path_factory.mktemp("absolute") / "table.yaml", example_doc(dead, dead))
    with running_gateway(config) as gateway:
        yield gateway


def test_a_client_behind_an_http_proxy_setting_reaches_the_model(gw: GatewayProcess) -> None:
    async def scenario() -> None:
        async with Plane() as plane, aiohttp.ClientSession() as session:
            serve(gw, table(plane))
            # aiohttp with proxy= sends the absolute form, as curl -x and requests' proxies do.
            async with session.post(f"http://{STD}/production/predict?q=1", data=b'{"x": 1}', headers=AUTH,
                                    proxy=gw.url) as r:  # fmt: skip
                body = await r.read()
                assert r.status == 200, body
                assert r.headers["x-baseten-deployment-id"] == "v1"
            assert plane.requests[-1] == ("POST", "/predict?q=1")

            raw = await raw_request(
                gw.port,
                f"POST http://{STD}/production/predict HTTP/1.1\r\nHost: model-xyz789.api.example.com\r\n"
                f"Authorization: Api-Key {DEMO_KEY}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}".encode(),
            )
            status, _, answer = parse_response(raw)
            assert status == 400 and "another host" in json.loads(answer)["error"]
            assert len(plane.requests) == 1  # nothing of the refused call was forwarded

    asyncio.run(scenario())
