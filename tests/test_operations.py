"""Operating the gateway (SPEC §3 loading, §11): reloads under traffic, admin listener, CLI, demo."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web

from tests.support import DEMO_KEY, EXAMPLE, REPO, example_doc, free_port, interrupt, running_gateway, write_table

HOST = {"Host": "model-abc123.api.example.com", "Authorization": f"Api-Key {DEMO_KEY}"}


async def start_plane(name: str, *, stream_delay: float = 0.0) -> tuple[web.AppRunner, str, list[str]]:
    """A real plane: answers /predict with its name; /stream sends 10 chunks `stream_delay` apart."""
    seen: list[str] = []

    async def predict(request: web.Request) -> web.Response:
        seen.append(request.headers["x-baseten-request-id"])
        await request.read()
        return web.json_response({"plane": name})

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for i in range(10):
            await resp.write(f"{name}:{i};".encode())
            await asyncio.sleep(stream_delay)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/predict", predict)
    app.router.add_post("/stream", stream)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}", seen


def test_reload_under_traffic_fails_no_call_and_never_cuts_a_stream(tmp_path: Path) -> None:
    async def scenario() -> None:
        a, a_url, a_seen = await start_plane("A", stream_delay=0.15)
        b, b_url, b_seen = await start_plane("B")
        table = write_table(tmp_path / "table.yaml", example_doc(a_url, b_url))
        failures: list[str] = []
        ok = 0
        with running_gateway(table) as gw:
            async with aiohttp.ClientSession() as session:
                # A stream that starts on plane A and must finish on plane A whatever the table says meanwhile.
                stream_resp = await session.post(gw.url + "/production/sync/stream", headers=HOST)
                stop = asyncio.Event()

                async def client() -> None:
                    nonlocal ok
                    for _ in range(2000):  # bounded
                        if stop.is_set():
                            return
                        try:
                            async with session.post(gw.url + "/production/predict", headers=HOST, data=b"{}") as r:
                                body = await r.json()
                                if r.status != 200 or body["plane"] not in ("A", "B"):
                                    failures.append(f"{r.status} {body}")
                                else:
                                    ok += 1
                        except aiohttp.ClientError as exc:
                            failures.append(repr(exc))

                clients = [asyncio.create_task(client()) for _ in range(8)]
                triggers = ["file", "sighup", "admin"]
                for i in range(9):
                    doc = example_doc(b_url if i % 2 == 0 else a_url, b_url)
                    doc["gateway"]["hold_timeout_seconds"] = 301 + i  # every version differs: each load swaps
                    write_table(table, doc)
                    trigger = triggers[i % 3]
                    if trigger == "sighup":
                        gw.signal(signal.SIGHUP)
                    elif trigger == "admin":
                        status, body = await asyncio.to_thread(gw.admin, "POST", "/v1/routing/reload")
                        assert status == 200 and body["ok"], body
                    await asyncio.sleep(0.35)  # the file watcher polls once a second; SIGHUP/admin are at once
                # An invalid table is refused and the last good one keeps serving.
                bad = example_doc(a_url, b_url)
                bad["models"]["abc123"]["environments"]["production"]["deployment"] = "v9"
                write_table(table, bad)
                status, body = await asyncio.to_thread(gw.admin, "POST", "/v1/routing/reload")
                assert status == 422 and not body["ok"]
                assert "models.abc123.environments.production.deployment" in " ".join(body["problems"])
                await asyncio.sleep(1.5)
                stop.set()
                await asyncio.gather(*clients)
                streamed = await stream_resp.read()
                assert stream_resp.status == 200
                assert streamed.decode() == "".join(f"A:{i};" for i in range(10))
                status, metrics = await asyncio.to_thread(gw.admin, "GET", "/metrics")
                status, routing = await asyncio.to_thread(gw.admin, "GET", "/v1/routing")
        await a.cleanup()
        await b.cleanup()
        assert failures == []
        assert ok > 100
        assert a_seen and b_seen, "both planes must have served calls as the table flipped between them"
        # 6 of the 9 versions were loaded at once (SIGHUP, admin); file changes may coalesce.
        assert routing["generation"] >= 7 and routing["last_reload_error"]
        assert re.search(r'gateway_table_reloads_total\{result="failure"\} [1-9]', metrics)
        assert re.search(r'gateway_table_reloads_total\{result="success"\} [1-9]', metrics)

    asyncio.run(scenario())


def test_admin_listener(tmp_path: Path) -> None:
    table = write_table(tmp_path / "t.yaml", example_doc("http://127.0.0.1:9", "http://127.0.0.1:9"))
    with running_gateway(table, env={"GATEWAY_ADMIN_TOKEN": "s3cret"}) as gw:
        assert gw.admin("GET", "/healthz") == (200, {"status": "ok"})
        status, body = gw.admin("GET", "/readyz")
        assert status == 200 and body["status"] == "ready"
        status, text = gw.admin("GET", "/metrics")
        assert status == 200
        for name in ("gateway_requests_total", "gateway_request_duration_seconds", "gateway_inflight_requests",
                     "gateway_table_reloads_total", "gateway_upstream_errors_total"):  # fmt: skip
            assert f"# TYPE {name} " in text
        assert gw.admin("GET", "/v1/routing")[0] == 401
        assert gw.admin("POST", "/v1/routing/reload", token="wrong")[0] == 401
        status, body = gw.admin("GET", "/v1/routing", token="s3cret")
        assert status == 200 and len(body["digest"]) == 64 and body["version"] == 1
        assert body["digest"] == __import__("hashlib").sha256(table.read_bytes()).hexdigest()
        status, body = gw.admin("GET", "/v1/nothing", token="s3cret")
        assert (status, body["error_code"]) == (404, "client_error")
        status, body = gw.admin("GET", "/v1/routing/reload", token="s3cret")
        assert status == 405


def test_admin_refuses_a_public_address_without_a_token(tmp_path: Path) -> None:
    table = write_table(tmp_path / "t.yaml", example_doc("http://127.0.0.1:9", "http://127.0.0.1:9"))
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_ADMIN_TOKEN"}
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(table), "--admin-host", "0.0.0.0",
         "--port", str(free_port()), "--admin-port", str(free_port())],
        capture_output=True, text=True, timeout=30, env=env,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "admin token" in proc.stderr


def test_serve_refuses_an_invalid_table_listing_every_problem(tmp_path: Path) -> None:
    doc = example_doc("http://127.0.0.1:9", "http://127.0.0.1:9")
    doc["models"]["abc123"]["environments"]["prod-us"]["deployment"] = "v3"  # eu deployment in a us environment
    doc["planes"]["us-east-1"]["colour"] = "blue"
    table = write_table(tmp_path / "t.yaml", doc)
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(table), "--port", str(free_port())],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "models.abc123.environments.prod-us.deployment" in proc.stderr
    assert "planes.us-east-1" in proc.stderr and "colour" in proc.stderr


def gateway_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60)


def test_check_command(tmp_path: Path) -> None:
    ok = gateway_cli("check", str(EXAMPLE))
    assert ok.returncode == 0 and "ok (4 models" in ok.stdout
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["models"]["abc123"]["environments"]["staging"]["canary"]["deployment"] = "v3"  # leaves no region: fine
    doc["models"]["abc123"]["environments"]["prod-us"]["shadow"] = {"deployment": "v3", "percent": 5}
    doc["models"]["abc123"]["environments"]["production"]["deployment"] = "v9"
    doc["api_keys"][0]["team"] = "nobody"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    out = gateway_cli("check", str(bad))
    assert out.returncode == 1
    assert "3 problem(s)" in out.stdout
    for path in ("models.abc123.environments.prod-us.shadow.deployment",
                 "models.abc123.environments.production.deployment", "api_keys[0].team"):  # fmt: skip
        assert path in out.stdout
    missing = gateway_cli("check", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 1


@pytest.mark.parametrize(
    ("args", "code", "expect"),
    [
        (["-H", f"Authorization: Api-Key {DEMO_KEY}", "http://model-abc123-prod-us.api.example.com/predict"], 0,
         ["environment:  prod-us", "region:       us (regional host: pinned to us)",
          "upstream:     POST http://127.0.0.1:9001/predict"]),
        (["-H", f"Authorization: Api-Key {DEMO_KEY}", "https://model-abc123.api.example.com/environments/staging/predict",
          "-H", "x-baseten-routing-key: user-42"], 0, ["deployment:   v2", "canary:       v2 at 10%"]),
        (["-X", "GET", "-H", f"Authorization: Api-Key {DEMO_KEY}",
          "http://model-abc123.api.example.com/production/sync/v1/models?limit=2"], 0,
         ["upstream:     GET http://127.0.0.1:9001/v1/models?limit=2"]),
        (["http://model-abc123.api.example.com/production/predict"], 1, ["error: 401 unauthorized"]),
        (["-H", f"Authorization: Api-Key {DEMO_KEY}", "http://model-abc123-prod-eu.api.example.com/predict"], 1,
         ["error: 421 client_error", '"error_code": "client_error"']),
        (["-H", f"Authorization: Api-Key {DEMO_KEY}", "http://model-abc123-prod-us.api.example.com/production/predict"],
         1, ["error: 400 client_error"]),
        (["not-a-url"], 2, []),
        (["-H", "no-colon", "http://model-abc123.api.example.com/production/predict"], 2, []),
    ],
)  # fmt: skip
def test_explain_command(args: list[str], code: int, expect: list[str]) -> None:
    out = gateway_cli("explain", "--config", str(EXAMPLE), *args)
    assert out.returncode == code, out.stdout + out.stderr
    for text in expect:
        assert text in out.stdout


def test_explain_with_an_invalid_table_is_usage_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 2\n")
    out = gateway_cli("explain", "--config", str(bad), "http://model-abc123.api.example.com/production/predict")
    assert out.returncode == 2


EXPECTED_DEMO_STATUS = [200, 200, 200, 200, 421, 400, 401, 403, 200, 200, 200, 201, 200, 200, 202, 200, 200]
# The gRPC calls the demo prints (gateway.demo.grpc_client): exit status and what the output shows.
EXPECTED_DEMO_GRPC = [
    (0, ["from plane us-east-1 (region us)", "environment production, deployment v1", "status OK"]),
    (0, ["Chat <- [us-east-1/us] hello 1", "Chat <- [us-east-1/us] hello 3", "status OK"]),
    (0, ["from plane eu-west-1 (region eu)", "environment prod-eu, deployment v3", "status OK"]),
    (1, ["status UNAVAILABLE: this gateway does not serve region 'eu'", "x-baseten-request-id "]),
]


def test_demo_prints_calls_that_answer_as_printed(tmp_path: Path) -> None:
    """Start `gateway demo`, run every command it prints, check each answers as its caption says."""
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["planes"]["us-east-1"]["url"] = f"http://127.0.0.1:{free_port()}"
    doc["planes"]["eu-west-1"]["url"] = f"http://127.0.0.1:{free_port()}"
    doc["planes"]["us-east-1"]["grpc"] = f"127.0.0.1:{free_port()}"
    doc["planes"]["eu-west-1"]["grpc"] = f"127.0.0.1:{free_port()}"
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump(doc))
    port, admin = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "demo", "--config", str(config), "--port", str(port),
         "--admin-port", str(admin), "--grpc-port", str(free_port())],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        lines: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("curl -sS http://127.0.0.1") and "/v1/routing" in line:
                break
        commands = [(lines[i - 1], line) for i, line in enumerate(lines) if line.startswith(("curl ", sys.executable))]
        http_calls = [(title, cmd) for title, cmd in commands if "[HTTP" in cmd]
        assert len(http_calls) == len(EXPECTED_DEMO_STATUS)
        for (title, cmd), expected in zip(http_calls, EXPECTED_DEMO_STATUS):
            out = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=30)
            assert f"[HTTP {expected}]" in out.stdout, f"{title}: {cmd}\n{out.stdout}{out.stderr}"
            if "streaming" in title:
                assert out.stdout.count("data: ") == 9 and "[DONE]" in out.stdout
            if "regional host: prod-us" in title:
                assert '"region": "us"' in out.stdout
            if title.startswith("async: the status"):
                assert '"status":"SUCCEEDED"' in out.stdout
            if "the environment and its promotion" in title:
                assert '"candidate_deployment": {' in out.stdout and '"percent_traffic_to_new_version"' in out.stdout
        grpc_calls = [(title, cmd) for title, cmd in commands if "gateway.demo.grpc_client" in cmd]
        assert len(grpc_calls) == len(EXPECTED_DEMO_GRPC)
        for (title, cmd), (code, texts) in zip(grpc_calls, EXPECTED_DEMO_GRPC):
            out = subprocess.run(shlex.split(cmd), capture_output=True, text=True, timeout=30)
            assert out.returncode == code, f"{title}: {cmd}\n{out.stdout}{out.stderr}"
            for text in texts:
                assert text in out.stdout, f"{title}: {cmd}\n{out.stdout}{out.stderr}"
        ws_calls = [(title, cmd) for title, cmd in commands if "gateway.demo.ws_client" in cmd]
        assert len(ws_calls) == 2
        ok = subprocess.run(shlex.split(ws_calls[0][1]), capture_output=True, text=True, timeout=30)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "received: echo from v1 on us-east-1 (us): hello over WebSocket" in ok.stdout
        assert "closed: 1000" in ok.stdout
        refused = subprocess.run(shlex.split(ws_calls[1][1]), capture_output=True, text=True, timeout=30)
        assert refused.returncode == 1 and "421 Misdirected Request" in refused.stdout
        others = [
            cmd for _, cmd in commands if "[HTTP" not in cmd and "gateway.demo.grpc_client" not in cmd
            and "gateway.demo.ws_client" not in cmd
        ]  # fmt: skip
        explain_cmd = next(cmd for cmd in others if " explain " in cmd)
        explain = subprocess.run(shlex.split(explain_cmd), capture_output=True, text=True, timeout=30)
        assert explain.returncode == 0 and "pinned to us" in explain.stdout
        metrics_cmd = next(cmd for cmd in others if "/metrics" in cmd)
        metrics = subprocess.run(metrics_cmd, shell=True, capture_output=True, text=True, timeout=30)
        assert 'code="421"' in metrics.stdout and 'model="llm7"' in metrics.stdout
        assert 'protocol="grpc",code="OK"' in metrics.stdout
        assert 'protocol="websocket",code="101"' in metrics.stdout
    finally:
        interrupt(proc)
