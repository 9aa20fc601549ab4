"""`gateway demo`: two sample planes (us, eu) and a gateway in front, in one process."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

from gateway.demo.grpc_plane import GrpcSamplePlane
from gateway.demo.planes import SamplePlane
from gateway.demo.pycalls import python_script
from gateway.demo.webhooks import DEMO_SECRET, DEMO_SECRET_ENV, WebhookReceiver
from gateway.ports import check_free
from gateway.routing.loader import TableInvalid, load_table
from gateway.runner import Gateway, ServeOptions, install_uvloop

DEMO_KEY = "demo-key-acme"
STAGING_KEY = "demo-key-staging"


def default_table() -> Path:
    for candidate in (Path.cwd() / "routing_config" / "example.yaml",
                      Path(__file__).resolve().parents[2] / "routing_config" / "example.yaml"):  # fmt: skip
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("routing_config/example.yaml not found; pass --config")


def curl(url: str, *, key: str | None = DEMO_KEY, data: str | None = None, stream: bool = False,
         headers: tuple[str, ...] = ()) -> str:  # fmt: skip
    parts = ["curl", "-sS"] + (["-N"] if stream else []) + ["-w", r"'\n[HTTP %{http_code}]\n'"]
    if key is not None:
        parts += ["-H", shlex.quote(f"Authorization: Api-Key {key}")]
    for header in headers:
        parts += ["-H", shlex.quote(header)]
    if data is not None:
        parts += ["-d", shlex.quote(data)]
    parts.append(shlex.quote(url))
    return " ".join(parts)


def grpc_client(grpc_port: int, authority: str, *args: str) -> str:
    return shlex.join([sys.executable, "-m", "gateway.demo.grpc_client", "--target", f"127.0.0.1:{grpc_port}",
                       "--authority", authority, *args])  # fmt: skip


def grpc_calls(grpc_port: int) -> list[tuple[str, str]]:
    """The gRPC model (demo.Echo) through the gateway's gRPC listener (SPEC §9)."""
    return [
        ("gRPC unary call demo.Echo/Say on the standard gRPC host (production)",
         grpc_client(grpc_port, "model-abc123.grpc.localhost")),
        ("gRPC bidirectional stream demo.Echo/Chat on the regional gRPC host prod-us",
         grpc_client(grpc_port, "model-abc123-prod-us.grpc.localhost", "--chat", "3")),
        ("gRPC: the environment from metadata on the standard gRPC host (prod-eu, plane in eu)",
         grpc_client(grpc_port, "model-abc123.grpc.localhost", "-H", "x-baseten-environment:prod-eu")),
        ("rejected gRPC call: this gateway serves region us only, so the eu regional gRPC host gets UNAVAILABLE",
         grpc_client(grpc_port, "model-abc123-prod-eu.grpc.localhost")),
    ]  # fmt: skip


def ws_client(url: str) -> str:
    return shlex.join([sys.executable, "-m", "gateway.demo.ws_client", url, "--key", DEMO_KEY,
                       "--message", "hello over WebSocket"])  # fmt: skip


def calls(
    port: int, admin_port: int, config: str, grpc_port: int | None = None, webhook_port: int | None = None
) -> list[tuple[str, str]]:
    """(what it shows, command) pairs printed by the demo; tests run each one."""
    g = f"localhost:{port}"
    admin = f"http://127.0.0.1:{admin_port}"
    body = '{"model_input": {"prompt": "hello"}}'
    hook = f"http://127.0.0.1:{webhook_port}"
    async_calls = (
        [
            (
                "async predict: stored (fsync'd) and answered 201; the demo's receiver checks the webhook's signatures",
                curl(
                    f"http://model-abc123.{g}/production/async_predict",
                    data=json.dumps({"model_input": {"prompt": "later"}, "webhook_endpoint": hook + "/webhook"}),
                ),
            ),
            (
                "async: the status of the request the receiver got last (SUCCEEDED); add /result for its kept answer",
                curl(f"http://model-abc123.{g}/async_request/$(curl -sS {hook}/last)")
                .replace("'http", '"http')
                .replace("last)'", 'last)"'),
            ),
            ("async: queue counts of the target", curl(f"http://model-abc123.{g}/production/async_queue_status")),
        ]
        if webhook_port is not None
        else []
    )
    return [
        ("JSON predict on the standard host (production)", curl(f"http://model-abc123.{g}/production/predict", data=body)),
        ("token streaming (SSE), relayed chunk by chunk",
         curl(f"http://model-llm7.{g}/production/predict", data='{"max_tokens": 8}', stream=True)),
        ("regional host: prod-us stays in region us", curl(f"http://model-abc123-prod-us.{g}/predict", data=body)),
        ("standard host reaching the eu environment (no residency guarantee)",
         curl(f"http://model-abc123.{g}/environments/prod-eu/predict", data=body)),
        ("rejected: this gateway serves region us only, so the eu regional host gets 421",
         curl(f"http://model-abc123-prod-eu.{g}/predict", data=body)),
        ("rejected: regional hosts take the environment from the hostname (400)",
         curl(f"http://model-abc123-prod-us.{g}/environments/staging/predict", data=body)),
        ("rejected: missing API key (401)", curl(f"http://model-abc123.{g}/production/predict", key=None, data=body)),
        ("rejected: a staging-only key calling production (403)",
         curl(f"http://model-abc123.{g}/production/predict", key=STAGING_KEY, data=body)),
        ("canary: staging sends 10% to v2, sticky per routing key",
         curl(f"http://model-abc123.{g}/environments/staging/predict", data=body,
              headers=("x-baseten-routing-key: user-42",))),
        ("sync pass-through to the model server's own route", curl(f"http://model-abc123.{g}/production/sync/v1/models")),
        ("chain run_remote", curl(f"http://chain-pipeline1.{g}/production/run_remote", data=body)),
        *async_calls,
        ("wake a deployment (202)", curl(f"http://model-abc123.{g}/deployment/v0/wake", data="")),
        ("admin API: promote v2 into staging, ramping its share up in 10 stages over 30 s (200: the promoted deployment)",
         curl(f"{admin}/v1/models/abc123/environments/staging/promote", key=None,
              data='{"deployment_id": "v2", "ramp_up_duration_seconds": 30}')),
        ("admin API: the environment and its promotion (status, percent_traffic_to_new_version)",
         curl(f"{admin}/v1/models/abc123/environments/staging", key=None)),
        ("WebSocket echo model through the regional host (frames relayed both ways)",
         ws_client(f"ws://model-abc123-prod-us.{g}/websocket")),
        ("WebSocket: refused before the upgrade (421: region eu is not served here)",
         ws_client(f"ws://model-abc123-prod-eu.{g}/websocket")),
        *(grpc_calls(grpc_port) if grpc_port is not None else []),
        ("the routing decision, without sending anything",
         f"{shlex.quote(sys.executable)} -m gateway explain --config {shlex.quote(config)} -H 'Authorization: Api-Key {DEMO_KEY}' "
         f"http://model-abc123-prod-us.api.example.com/predict"),
        ("metrics (Prometheus)", f"curl -sS http://127.0.0.1:{admin_port}/metrics | grep gateway_requests_total"),
        ("the serving table", f"curl -sS http://127.0.0.1:{admin_port}/v1/routing"),
    ]  # fmt: skip


async def _run(args: argparse.Namespace, config: str) -> None:
    table = load_table(config)
    planes = []
    grpc_planes = []
    for plane in table.planes.values():
        sample = SamplePlane(plane.name, plane.region)
        await sample.start(plane.url.host, plane.url.port)
        planes.append(sample)
        if plane.grpc is not None:
            grpc_sample = GrpcSamplePlane(plane.name, plane.region)
            await grpc_sample.start(plane.grpc)
            grpc_planes.append(grpc_sample)
    os.environ.setdefault(DEMO_SECRET_ENV, DEMO_SECRET)  # the example table's webhook secret (never in the table)
    receiver = WebhookReceiver(os.environ[DEMO_SECRET_ENV])
    webhook_port = await receiver.start("127.0.0.1", 0)
    # The demo's admin changes and async queue go to a fresh directory that disappears with the demo,
    # not next to the example table.
    store = tempfile.TemporaryDirectory(prefix="gateway-demo-")
    gateway = Gateway(ServeOptions(config=config, store=str(Path(store.name) / "demo.admin.json"), port=args.port,
                                   admin_port=args.admin_port, grpc_port=args.grpc_port,
                                   queue_store=str(Path(store.name) / "queues")))  # fmt: skip
    await gateway.start()
    print(
        f"\nDemo gateway on http://127.0.0.1:{gateway.public_port} (admin on 127.0.0.1:{gateway.admin_port}, "
        f"gRPC on 127.0.0.1:{gateway.grpc_port}),"
    )
    print("planes: " + ", ".join(f"{p.name} ({p.region}) at {table.planes[p.name].url.base_url}" for p in planes))
    if grpc_planes:
        print("gRPC planes (demo.Echo): " + ", ".join(f"{p.name} at {table.planes[p.name].grpc}" for p in grpc_planes))
    print(f"table: {config}. Try these (Ctrl-C stops the demo):\n")
    print(f"webhook receiver (checks both signature schemes) on http://127.0.0.1:{webhook_port}/webhook")
    for title, command in calls(
        gateway.public_port, gateway.admin_port or args.admin_port, config, gateway.grpc_port, webhook_port
    ):
        print(f"# {title}\n{command}\n")
    if args.python:
        print(python_script(gateway.public_port, DEMO_KEY))
    sys.stdout.flush()
    try:
        await gateway.stopping.wait()
    finally:
        await gateway.drain()
        receiver.close()
        for sample in planes:
            sample.close()
        for grpc_sample in grpc_planes:
            await grpc_sample.stop()
        store.cleanup()


def run_demo(args: argparse.Namespace) -> int:
    try:
        config = str(args.config or default_table())
        table = load_table(config)
    except (FileNotFoundError, TableInvalid) as exc:
        print(f"gateway demo: {exc}", file=sys.stderr)
        return 2
    # Every port first, so that a busy one is a line naming it (cli.main prints it), not a half-started demo.
    for flag, port in (("--port", args.port), ("--admin-port", args.admin_port), ("--grpc-port", args.grpc_port)):
        check_free(flag, "127.0.0.1", port)
    for plane in table.planes.values():
        check_free(f"plane {plane.name}'s url in {config}", plane.url.host, plane.url.port)
    install_uvloop()
    try:
        asyncio.run(_run(args, config))
    except KeyboardInterrupt:
        pass
    return 0
