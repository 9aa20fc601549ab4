"""OpenTelemetry tracing (issue 13): spans from the SDK's in-memory exporter.

A real data plane (`runner.DataPlane`, listeners on 127.0.0.1 in the test's loop, so the exporter
is the test's) in front of real planes that record the `traceparent` they received: an aiohttp
plane, raw HTTP/1.1 replicas (one killed mid-call, for the retry after a reset) and a grpcio
plane. Nothing here is a stand-in for the gateway or the SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
import yaml
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from gateway.metrics import Metrics
from gateway.runner import DataPlane, ServeOptions
from gateway.state import TableState
from tests.planes import LoggingPlane, Plane
from tests.support import EXAMPLE, KEY_HEADER, REPO, GatewayProcess, write_table
from tests.test_grpc import HOST as GRPC_HOST
from tests.test_grpc import OPTIONS, GrpcPlane

STD = "model-abc123.api.example.com"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def table(tmp_path: Path, url: str, *, endpoints: list[str] | None = None, grpc_address: str = "") -> Path:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["planes"]["us-east-1"]["url"] = url
    doc["planes"]["eu-west-1"]["url"] = url
    if grpc_address:
        doc["planes"]["us-east-1"]["grpc"] = grpc_address
    if endpoints:
        doc["models"]["abc123"]["deployments"]["v1"]["endpoints"] = endpoints
    return write_table(tmp_path / "t.yaml", doc)


@contextlib.asynccontextmanager
async def gateway(
    config: Path, exporter: InMemorySpanExporter | None, *, ratio: float = 1.0, grpc: bool = False,
    access_log: str | None = None,
) -> AsyncIterator[DataPlane]:  # fmt: skip
    opts = ServeOptions(
        config=str(config), port=0, admin_port=None, grpc_port=0 if grpc else None, otel=exporter is not None,
        otel_sample_ratio=ratio, queue_store=str(config.parent), access_log=access_log,
    )  # fmt: skip
    metrics = Metrics()
    data = DataPlane(opts, TableState(opts.config, metrics), metrics)
    data.span_exporter = exporter
    await data.start()
    try:
        yield data
    finally:
        await data.drain(2.0)
        data.close()


async def post(port: int, path: str = "/production/predict", body: bytes = b"{}", **headers: str) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"http://127.0.0.1:{port}{path}", data=body, headers={"Host": STD, **KEY_HEADER, **headers}
        ) as resp:  # fmt: skip
            await resp.read()
            return resp.status


def by_kind(exporter: InMemorySpanExporter, kind: SpanKind) -> list:
    return [s for s in exporter.get_finished_spans() if s.kind == kind]


def traceparent(span) -> str:
    """The version, trace id and span id a traceparent naming `span` starts with (the flags follow)."""
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}"


def ids(header: str) -> str:
    return header[:52]  # W3C: flags 01 (sampled), 03 with the level 2 random-trace-id bit, ...


def test_a_call_has_a_server_span_under_the_clients_traceparent_and_the_plane_gets_the_client_span(
    tmp_path: Path,
) -> None:
    exporter = InMemorySpanExporter()

    async def scenario() -> tuple[int, Plane]:
        async with Plane() as plane, gateway(table(tmp_path, plane.url), exporter) as gw:
            status = await post(
                gw.public_port, traceparent=f"00-{TRACE_ID}-{PARENT_ID}-01", tracestate="vendor=abc"
            )  # fmt: skip
        return status, plane

    status, plane = asyncio.run(scenario())
    assert status == 200
    [server] = by_kind(exporter, SpanKind.SERVER)
    [client] = by_kind(exporter, SpanKind.CLIENT)
    assert server.name == "POST /{target}/predict"
    assert f"{server.context.trace_id:032x}" == TRACE_ID and f"{server.parent.span_id:016x}" == PARENT_ID
    assert server.parent.is_remote
    attrs = dict(server.attributes)
    assert attrs["http.request.method"] == "POST" and attrs["http.response.status_code"] == 200
    assert attrs["url.path"] == "/production/predict" and attrs["server.address"] == STD
    assert attrs["http.route"] == "/{target}/predict"
    assert (attrs["baseten.model_id"], attrs["baseten.environment"], attrs["baseten.deployment_id"]) == (
        "abc123", "production", "v1",
    )  # fmt: skip
    assert attrs["baseten.region"] == "us" and attrs["baseten.side"] == "primary"
    assert client.parent.span_id == server.context.span_id and client.context.trace_id == server.context.trace_id
    assert dict(client.attributes)["server.port"] == plane.port
    assert client.start_time >= server.start_time and client.end_time <= server.end_time
    [seen] = plane.seen
    assert ids(seen["headers"]["traceparent"]) == traceparent(client)  # the plane's parent is the client span
    assert seen["headers"]["tracestate"] == "vendor=abc"  # the client's tracestate goes on


def test_without_a_traceparent_the_call_starts_a_trace(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()

    async def scenario() -> Plane:
        async with Plane() as plane, gateway(table(tmp_path, plane.url), exporter) as gw:
            assert await post(gw.public_port, "/production/nope") == 404  # not admitted: a server span still
            assert await post(gw.public_port, "/environments/staging/sync/v1/models") == 200
        return plane

    plane = asyncio.run(scenario())
    missing, sync = sorted(by_kind(exporter, SpanKind.SERVER), key=lambda s: s.start_time)
    assert missing.parent is None and missing.name == "POST" and missing.status.status_code == StatusCode.UNSET
    assert dict(missing.attributes)["http.response.status_code"] == 404
    assert sync.parent is None and sync.name == "POST /{target}/sync/{path}"
    [client] = by_kind(exporter, SpanKind.CLIENT)
    assert client.parent.span_id == sync.context.span_id
    assert ids(plane.seen[-1]["headers"]["traceparent"]) == traceparent(client)


class Replica(LoggingPlane):
    """A raw HTTP/1.1 replica that records each request's traceparent, then answers or drops the
    connection without a byte (killed mid-call)."""

    def __init__(self, answers: bool) -> None:
        super().__init__()
        self.answers = answers
        self.traceparents: list[str] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                fields = dict(line.split(b": ", 1) for line in head.lower().split(b"\r\n")[1:] if b": " in line)
                await LoggingPlane._body(reader, head)
                self.traceparents.append(ids(fields[b"traceparent"].decode()))
                if not self.answers:
                    writer.transport.abort()
                    return
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def test_a_retry_after_a_reset_is_a_second_client_span(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()

    async def scenario() -> tuple[list[int], Replica, Replica]:
        async with Replica(answers=False) as dying, Replica(answers=True) as healthy:
            config = table(tmp_path, healthy.url, endpoints=[dying.url, healthy.url])
            async with gateway(config, exporter) as gw:
                statuses = [await post(gw.public_port) for _ in range(20)]
        return statuses, dying, healthy

    statuses, dying, healthy = asyncio.run(scenario())
    assert statuses == [200] * 20
    assert dying.traceparents, "p2c over 20 calls lands on the dying replica at least once"
    servers = by_kind(exporter, SpanKind.SERVER)
    clients = by_kind(exporter, SpanKind.CLIENT)
    assert len(servers) == 20 and len(clients) == 20 + len(dying.traceparents)
    by_header = {traceparent(c): c for c in clients}
    for header in dying.traceparents:  # each broken attempt, and the retry of the same call after it
        failed = by_header[header]
        assert failed.status.status_code == StatusCode.ERROR
        assert dict(failed.attributes)["error.type"] == "ConnectionReset"
        [retry] = [c for c in clients if c.parent.span_id == failed.parent.span_id and c is not failed]
        assert dict(retry.attributes)["http.request.resend_count"] == 1
        assert traceparent(retry) in healthy.traceparents and retry.status.status_code == StatusCode.UNSET
    assert sorted(healthy.traceparents) == sorted(
        traceparent(c) for c in clients if c.status.status_code != StatusCode.ERROR
    )  # fmt: skip


def test_grpc_calls_are_traced_and_the_plane_gets_the_client_span(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    grpc_plane = GrpcPlane("us-east-1")

    def who(port: int) -> dict:
        options = [*OPTIONS, ("grpc.default_authority", GRPC_HOST)]
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as ch:
            metadata = (
                ("authorization", KEY_HEADER["Authorization"]),
                ("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),
            )
            return json.loads(ch.unary_unary("/t.Plane/Who")(b"", metadata=metadata, timeout=10))

    async def scenario() -> dict:
        async with Plane() as plane:
            config = table(tmp_path, plane.url, grpc_address=grpc_plane.address)
            async with gateway(config, exporter, grpc=True) as gw:
                return await asyncio.to_thread(who, gw.grpc_port)

    try:
        answer = asyncio.run(scenario())
    finally:
        grpc_plane.stop()
    [server] = by_kind(exporter, SpanKind.SERVER)
    [client] = by_kind(exporter, SpanKind.CLIENT)
    assert server.name == "t.Plane/Who" and f"{server.parent.span_id:016x}" == PARENT_ID
    attrs = dict(server.attributes)
    assert attrs["rpc.system"] == "grpc" and attrs["rpc.service"] == "t.Plane" and attrs["rpc.method"] == "Who"
    assert attrs["rpc.response.status_code"] == "OK" and attrs["baseten.deployment_id"] == "v1"
    assert client.parent.span_id == server.context.span_id
    received = [ids(v) for k, v in answer["metadata"] if k == "traceparent"]
    assert received == [traceparent(client)]  # the client's own was replaced, not doubled


def test_sampling_ratio_zero_records_nothing_but_follows_the_clients_flag(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    unsampled = f"00-{TRACE_ID}-{PARENT_ID}-00"

    async def scenario() -> Plane:
        async with Plane() as plane, gateway(table(tmp_path, plane.url), exporter, ratio=0.0) as gw:
            for _ in range(5):
                assert await post(gw.public_port) == 200
            assert await post(gw.public_port, traceparent=unsampled) == 200
            assert exporter.get_finished_spans() == ()
            assert await post(gw.public_port, traceparent=f"00-{TRACE_ID}-{PARENT_ID}-01") == 200
        return plane

    plane = asyncio.run(scenario())
    [server] = by_kind(exporter, SpanKind.SERVER)  # the client's sampled flag is followed
    assert f"{server.parent.span_id:016x}" == PARENT_ID
    assert all("traceparent" not in s["headers"] for s in plane.seen[:5])  # not traced: nothing added
    assert plane.seen[5]["headers"]["traceparent"] == unsampled  # the client's passes through unchanged
    assert ids(plane.seen[6]["headers"]["traceparent"]) != f"00-{TRACE_ID}-{PARENT_ID}"  # the client span's


def test_without_tracing_the_clients_traceparent_passes_through_unchanged(tmp_path: Path) -> None:
    header = f"00-{TRACE_ID}-{PARENT_ID}-01"

    async def scenario() -> Plane:
        # The access log on, tracing off: an observer that must not touch trace headers (SPEC §4).
        async with Plane() as plane:
            async with gateway(table(tmp_path, plane.url), None, access_log=str(tmp_path / "a.log")) as gw:
                assert await post(gw.public_port, traceparent=header, tracestate="v=1") == 200
        return plane

    plane = asyncio.run(scenario())
    [seen] = plane.seen
    assert seen["headers"]["traceparent"] == header and seen["headers"]["tracestate"] == "v=1"


def test_an_async_run_is_traced_and_its_plane_request_carries_the_client_span(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()

    def run_spans() -> list:
        return [s for s in by_kind(exporter, SpanKind.SERVER) if dict(s.attributes)["baseten.protocol"] == "async"]

    async def scenario() -> Plane:
        async with Plane() as plane, gateway(table(tmp_path, plane.url), exporter) as gw:
            assert await post(gw.public_port, "/production/async_predict", b'{"model_input": {}}') == 201
            async with asyncio.timeout(20):
                while not run_spans():
                    await asyncio.sleep(0.05)
        return plane

    plane = asyncio.run(scenario())
    [run] = run_spans()
    assert (
        run.name == "POST /predict" and dict(run.attributes)["http.response.status_code"] == 200
    )  # the run is regional
    [client] = [c for c in by_kind(exporter, SpanKind.CLIENT) if c.parent.span_id == run.context.span_id]
    [seen] = [s for s in plane.seen if s["path"] == "/predict"]
    assert ids(seen["headers"]["traceparent"]) == traceparent(client)


def test_opentelemetry_is_not_imported_when_tracing_is_off() -> None:
    code = (
        "import sys, gateway.cli, gateway.runner, gateway.obs.setup\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("header", "fields"),
    [
        (f"00-{TRACE_ID}-{PARENT_ID}-01", (int(TRACE_ID, 16), int(PARENT_ID, 16), 1)),
        (f"00-{TRACE_ID}-{PARENT_ID}-00", (int(TRACE_ID, 16), int(PARENT_ID, 16), 0)),
        (f" 01-{TRACE_ID}-{PARENT_ID}-03-later-fields", (int(TRACE_ID, 16), int(PARENT_ID, 16), 3)),
        (f"00-{TRACE_ID}-{PARENT_ID}-01-extra", None),  # version 00 has exactly four fields
        (f"ff-{TRACE_ID}-{PARENT_ID}-01", None),  # version ff is invalid
        (f"00-{'0' * 32}-{PARENT_ID}-01", None),  # all-zero ids are invalid
        (f"00-{TRACE_ID}-{'0' * 16}-01", None),
        (f"00-{TRACE_ID.upper()}-{PARENT_ID}-01", None),  # lowercase hex only
        (f"00-{TRACE_ID}-{PARENT_ID}", None),
        ("", None),
    ],
)
def test_traceparent_parsing_follows_w3c(header: str, fields: tuple | None) -> None:
    from gateway.obs.tracing import parse_traceparent

    assert parse_traceparent(header) == fields


class Collector(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP collector that keeps what it receives (protobuf ExportTraceServiceRequest)."""

    bodies: list[bytes] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        Collector.bodies.append(self.rfile.read(int(self.headers.get("content-length") or 0)))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_spans_reach_an_otlp_collector_from_a_gateway_process(tmp_path: Path) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    collector = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.server_address[1]}",
           "OTEL_SERVICE_NAME": "gw-test"}  # fmt: skip

    async def scenario() -> Plane:
        async with Plane() as plane:
            gw = GatewayProcess(table(tmp_path, plane.url), "--otel", env=env).start()
            try:
                assert await post(gw.port, traceparent=f"00-{TRACE_ID}-{PARENT_ID}-01", tracestate="v=1") == 200
            finally:
                assert gw.stop() == 0  # the drain exports what is batched
        return plane

    try:
        plane = asyncio.run(scenario())
    finally:
        collector.shutdown()
        collector.server_close()
    spans, services = [], set()
    for body in Collector.bodies:
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            services |= {a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"}
            spans += [span for scope in resource_spans.scope_spans for span in scope.spans]
    assert services == {"gw-test"}
    [server] = [s for s in spans if s.kind == s.SPAN_KIND_SERVER]
    [client] = [s for s in spans if s.kind == s.SPAN_KIND_CLIENT]
    assert server.name == "POST /{target}/predict" and server.trace_id.hex() == TRACE_ID
    assert server.parent_span_id.hex() == PARENT_ID and client.parent_span_id == server.span_id
    assert server.trace_state == "v=1" and client.trace_id.hex() == TRACE_ID
    assert {a.key: a.value.int_value for a in server.attributes}["http.response.status_code"] == 200
    assert server.start_time_unix_nano <= client.start_time_unix_nano <= client.end_time_unix_nano
    assert client.end_time_unix_nano <= server.end_time_unix_nano
    [seen] = plane.seen
    assert seen["headers"]["traceparent"] == f"00-{TRACE_ID}-{client.span_id.hex()}-01"
    assert seen["headers"]["tracestate"] == "v=1"
