"""Timeouts per phase, SIGTERM drain under load, TLS termination and mTLS to planes (issue 5)."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import ssl
from pathlib import Path

import aiohttp
import trustme
from aiohttp import web

from tests.support import DEMO_KEY, GatewayProcess, example_doc, running_gateway, write_table

HOST = {"Host": "model-abc123.api.example.com", "Authorization": f"Api-Key {DEMO_KEY}"}


async def start_app(routes: list[web.RouteDef], ssl_context: ssl.SSLContext | None = None) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.add_routes(routes)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


def table_with_timeouts(tmp: Path, url: str, **timeouts: float) -> Path:
    doc = example_doc(url, url)
    doc["models"]["abc123"]["deployments"]["v1"]["timeouts"] = timeouts
    return write_table(tmp / "t.yaml", doc)


def test_idle_timeout_aborts_a_stream_that_goes_silent(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def stalls(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"first chunk;")
        await release.wait()  # then nothing, until the test is over
        return resp

    async def scenario() -> None:
        runner, port = await start_app([web.post("/predict", stalls)])
        table = table_with_timeouts(tmp_path, f"http://127.0.0.1:{port}", idle_seconds=1)
        with running_gateway(table) as gw:
            async with aiohttp.ClientSession() as session:
                async with session.post(gw.url + "/production/predict", headers=HOST) as resp:
                    assert resp.status == 200
                    assert await resp.content.readexactly(len(b"first chunk;")) == b"first chunk;"
                    try:
                        await asyncio.wait_for(resp.read(), 10)
                        raise AssertionError("a stream cut by the idle timeout must not end cleanly")
                    except aiohttp.ClientPayloadError:
                        pass
            status, metrics = gw.admin("GET", "/metrics")
        release.set()
        await runner.cleanup()
        assert re.search(r'gateway_upstream_errors_total\{[^}]*deployment="v1"[^}]*kind="timeout"\} 1', metrics)

    asyncio.run(scenario())


def test_total_timeout_ends_a_call_that_never_finishes(tmp_path: Path) -> None:
    async def trickles(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(300):
            await resp.write(b".")
            await asyncio.sleep(0.1)  # never idle, never done
        return resp

    async def scenario() -> None:
        runner, port = await start_app([web.post("/predict", trickles)])
        table = table_with_timeouts(tmp_path, f"http://127.0.0.1:{port}", total_seconds=1.5, idle_seconds=5)
        with running_gateway(table) as gw:
            async with aiohttp.ClientSession() as session:
                async with session.post(gw.url + "/production/predict", headers=HOST) as resp:
                    got = b""
                    try:
                        async for chunk in resp.content.iter_any():
                            got += chunk
                        raise AssertionError("the total timeout must cut the call")
                    except aiohttp.ClientPayloadError:
                        pass
        await runner.cleanup()
        assert 0 < len(got) < 300

    asyncio.run(scenario())


def test_connect_timeout_gives_503(tmp_path: Path) -> None:
    """A plane whose accept queue is full never completes the handshake: connect_seconds applies."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):  # fill the queue; further SYNs are dropped (tcp_abort_on_overflow = 0)
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    table = table_with_timeouts(tmp_path, f"http://127.0.0.1:{port}", connect_seconds=0.5)
    try:
        with running_gateway(table) as gw:

            async def call() -> tuple[int, dict]:
                async with aiohttp.ClientSession() as session:
                    async with session.post(gw.url + "/production/predict", headers=HOST, data=b"{}") as resp:
                        return resp.status, await resp.json()

            status, body = asyncio.run(call())
    finally:
        for s in fillers:
            s.close()
        listener.close()
    assert status == 503 and body["error_code"] == "model_unavailable"
    assert "0.5" in body["error"]


def test_sigterm_under_load_cuts_no_call(tmp_path: Path) -> None:
    async def slow(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(0.4)
        return web.json_response({"ok": True})

    async def scenario() -> tuple[int, int, list[str], int]:
        runner, port = await start_app([web.post("/predict", slow)])
        table = write_table(tmp_path / "t.yaml", example_doc(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}"))
        gw = GatewayProcess(table, "--drain-timeout", "10").start()
        completed, refused, cut = 0, 0, []
        sent = asyncio.Event()

        async def client() -> None:
            nonlocal completed, refused
            connector = aiohttp.TCPConnector(force_close=True)
            async with aiohttp.ClientSession(connector=connector) as session:
                for _ in range(50):
                    try:
                        async with session.post(gw.url + "/production/predict", headers=HOST, data=b"{}") as r:
                            sent.set()
                            if r.status == 200 and (await r.json()) == {"ok": True}:
                                completed += 1
                            else:
                                cut.append(f"status {r.status}")
                    except aiohttp.ClientConnectorError:
                        refused += 1  # the listener is closed: the call was never made
                        return
                    except aiohttp.ClientError as exc:
                        cut.append(repr(exc))  # a call that was accepted and then lost

        tasks = [asyncio.create_task(client()) for _ in range(16)]
        await sent.wait()
        await asyncio.sleep(0.2)  # calls in flight at the plane
        gw.signal(signal.SIGTERM)
        await asyncio.gather(*tasks)
        code = await asyncio.to_thread(gw.proc.wait, 20)  # type: ignore[union-attr]
        gw.log.close()
        await runner.cleanup()
        return completed, refused, cut, code

    completed, refused, cut, code = asyncio.run(scenario())
    assert cut == []
    assert completed >= 16 and refused >= 1
    assert code == 0


def _certs(tmp: Path) -> tuple[trustme.CA, Path]:
    ca = trustme.CA()
    ca_path = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    return ca, ca_path


def test_tls_termination_on_the_public_listener(tmp_path: Path) -> None:
    ca, ca_path = _certs(tmp_path)
    server_cert = ca.issue_cert("model-abc123.api.example.com", "127.0.0.1")
    cert, key = tmp_path / "gw.pem", tmp_path / "gw-key.pem"
    server_cert.cert_chain_pems[0].write_to_path(str(cert))
    server_cert.private_key_pem.write_to_path(str(key))

    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"proto": request.headers["x-forwarded-proto"]})

    async def scenario() -> None:
        runner, port = await start_app([web.post("/predict", echo)])
        table = write_table(tmp_path / "t.yaml", example_doc(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}"))
        with running_gateway(table, "--tls-cert", str(cert), "--tls-key", str(key)) as gw:
            client_ctx = ssl.create_default_context(cafile=str(ca_path))
            async with aiohttp.ClientSession() as session:
                async with session.post(
                    f"https://127.0.0.1:{gw.port}/production/predict", headers=HOST, ssl=client_ctx
                ) as resp:
                    assert resp.status == 200 and await resp.json() == {"proto": "https"}
        await runner.cleanup()

    asyncio.run(scenario())


def test_https_plane_with_custom_ca_and_client_certificate(tmp_path: Path) -> None:
    ca, ca_path = _certs(tmp_path)
    plane_cert = ca.issue_cert("127.0.0.1")
    client_ca = trustme.CA()
    gateway_cert = client_ca.issue_cert("gateway.internal")
    cert, key = tmp_path / "gateway-client.pem", tmp_path / "gateway-client-key.pem"
    gateway_cert.cert_chain_pems[0].write_to_path(str(cert))
    gateway_cert.private_key_pem.write_to_path(str(key))
    plane_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    plane_cert.configure_cert(plane_ctx)
    client_ca.configure_trust(plane_ctx)
    plane_ctx.verify_mode = ssl.CERT_REQUIRED  # mTLS: the plane insists on the gateway's certificate

    async def who(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peercert")  # type: ignore[union-attr]
        return web.json_response({"client": dict(x[0] for x in peer["subject"]) if peer else None})

    async def scenario() -> tuple[int, dict, int, dict]:
        runner, port = await start_app([web.post("/predict", who)], ssl_context=plane_ctx)
        doc = example_doc(f"https://127.0.0.1:{port}", f"https://127.0.0.1:{port}")
        doc["planes"]["us-east-1"]["tls"] = {"ca": str(ca_path), "cert": str(cert), "key": str(key)}
        doc["planes"]["eu-west-1"]["tls"] = {"ca": str(ca_path)}  # no client certificate
        table = write_table(tmp_path / "t.yaml", doc)
        with running_gateway(table) as gw:
            async with aiohttp.ClientSession() as session:
                async with session.post(gw.url + "/production/predict", headers=HOST) as ok:
                    good = (ok.status, await ok.json())
                async with session.post(gw.url + "/environments/prod-eu/predict", headers=HOST) as refused:
                    bad = (refused.status, await refused.json())
        await runner.cleanup()
        return (*good, *bad)

    status, body, bad_status, bad_body = asyncio.run(scenario())
    assert status == 200 and body["client"] is not None  # the plane saw the gateway's client certificate
    # The eu plane's table entry has no client certificate: the plane refuses the handshake, and a
    # pooled connection made with the us plane's certificate is never lent to it (same address).
    assert bad_status in (502, 503) and bad_body["error_code"] == "model_unavailable"
