"""The streaming relay end to end (SPEC §2, §4, §5, §8, error body): a real gateway process between a
client and real plane servers on 127.0.0.1.

One gateway serves the module; each test starts its planes in its own event loop on port 0, points the
table at them and reloads it through the admin API. The memory tests start a fresh gateway so earlier
tests' allocations do not hide theirs. Nothing here asserts on time: streaming is shown by handshakes
(the plane sends event i+1 only once the client has received event i), buffering by bounded stalls
whose outcome must not depend on how long they last.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import psutil
import pytest

from tests.planes import HANDSHAKE_TIMEOUT, STALL_SECONDS, Plane, RawPlane, huge_chunk, read_head
from tests.support import (
    GatewayProcess,
    example_doc,
    free_port,
    parse_response,
    raw_request,
    running_gateway,
    write_table,
)

STD = "model-abc123.api.example.com"
REGIONAL_US = "model-abc123-prod-us.api.example.com"
KEY = "demo-key-acme"
AUTH = f"Api-Key {KEY}"
MiB = 1024 * 1024
LIMIT = 100 * MiB  # SPEC §4
RSS_BOUND = 64 * MiB


# -- raw HTTP/1.1 client ------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]  # names lowercased, in order
    body: bytes
    complete: bool  # the body ended where its framing said it would (not cut by a closed connection)
    chunked: bool

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name]
        assert len(values) <= 1, f"{name} sent {len(values)} times: {values}"
        return values[0] if values else None

    def json(self) -> dict:
        return json.loads(self.body)


def http_request(
    method: str, path: str, *, host: str | None = STD, auth: str | None = AUTH, body: bytes | None = None,
    headers: tuple[tuple[str, str], ...] = (), version: str = "1.1",
) -> bytes:  # fmt: skip
    lines = [f"{method} {path} HTTP/{version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    if auth is not None:
        lines.append(f"Authorization: {auth}")
    lines += [f"{k}: {v}" for k, v in headers]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


async def read_response(reader: asyncio.StreamReader, *, method: str = "POST") -> Response:
    """One response, framed by its headers; a cut body gives `complete=False` instead of raising."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = [(k.strip().lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:] if line)]
    names = dict(headers)
    chunked = "chunked" in names.get("transfer-encoding", "").lower()
    body, complete = bytearray(), True
    try:
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            pass
        elif chunked:
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                        pass
                    break
                body += await reader.readexactly(size)
                if await reader.readexactly(2) != b"\r\n":
                    raise AssertionError("chunk not followed by CRLF")
        elif "content-length" in names:
            body += await reader.readexactly(int(names["content-length"]))
        else:
            body += await reader.read()  # close-delimited
    except asyncio.IncompleteReadError as exc:
        body += exc.partial
        complete = False
    except ConnectionResetError:
        complete = False
    return Response(status, headers, bytes(body), complete, chunked)


@contextlib.asynccontextmanager
async def connect(port: int):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def call(port: int, data: bytes, *, method: str = "POST", timeout: float = 10) -> Response:
    async with connect(port) as (reader, writer):
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            return await read_response(reader, method=method)


def echo_headers(resp: Response) -> dict[str, list[str]]:
    """The request headers the plane received (from its echo), lowercased name -> values."""
    seen: dict[str, list[str]] = {}
    for name, value in resp.json()["headers"]:
        seen.setdefault(name.lower(), []).append(value)
    return seen


# -- tables and the shared gateway --------------------------------------------------------------


def table(
    us: Plane | RawPlane, eu: Plane | RawPlane | None = None, *, deployments: dict | None = None,
    timeouts: dict | None = None,
) -> dict:  # fmt: skip
    """The example table on these planes; `deployments` adds deployments of abc123 (e.g. with endpoints)."""
    doc = example_doc(us.url, (eu or us).url)
    doc["models"]["abc123"]["deployments"].update(deployments or {})
    if timeouts:
        doc["gateway"]["timeouts"] = timeouts
    return doc


def raw_deployment(plane: Plane, raw: RawPlane) -> dict:
    """The table with an extra deployment `raw` of abc123 whose replica is `raw` (call /deployment/raw/...)."""
    return table(plane, deployments={"raw": {"plane": "us-east-1", "endpoints": [raw.url]}})


def serve(gw: GatewayProcess, doc: dict) -> None:
    """Make the running gateway serve `doc` (written, then reloaded through the admin API)."""
    write_table(gw.config, doc)
    status, body = gw.admin("POST", "/v1/routing/reload")
    assert status == 200 and body["ok"], body


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    dead = f"http://127.0.0.1:{free_port()}"
    config = write_table(tmp_path_factory.mktemp("proxy") / "table.yaml", example_doc(dead, dead))
    with running_gateway(config) as gateway:
        yield gateway


# -- §4 headers, paths, query, pass-through ------------------------------------------------------


def test_identity_and_forwarding_headers_replace_what_the_client_sent(gw: GatewayProcess) -> None:
    async def scenario() -> None:
        async with Plane() as plane:
            serve(gw, table(plane))
            forged = (
                ("X-Baseten-Model-Id", "forged"), ("X-Baseten-Environment", "forged"),
                ("X-Baseten-Deployment-Id", "forged"), ("X-Baseten-Request-Id", "forged"),
                ("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "evil.example"),
                ("Traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
                ("X-Baseten-Customer-Request-Id", "customer-42"),
                ("Connection", "keep-alive, X-Foo"), ("X-Foo", "1"), ("Keep-Alive", "timeout=5"), ("TE", "trailers"),
                ("Proxy-Connection", "keep-alive"), ("X-Custom", "kept as is"),
            )  # fmt: skip
            first = await call(gw.port, http_request("POST", "/production/predict", body=b"hello", headers=forged))
            second = await call(gw.port, http_request("POST", "/production/predict", body=b"again"))

        assert first.status == 200, first
        echo, seen = first.json(), echo_headers(first)
        assert echo["method"] == "POST" and echo["path"] == "/predict" and echo["body"] == "hello"
        assert seen["x-baseten-model-id"] == ["abc123"]
        assert seen["x-baseten-environment"] == ["production"]
        assert seen["x-baseten-deployment-id"] == ["v1"]
        [request_id] = seen["x-baseten-request-id"]
        assert request_id != "forged" and len(request_id) >= 16
        assert first.header("x-baseten-request-id") == request_id
        assert seen["x-forwarded-for"] == ["127.0.0.1"]
        assert seen["x-forwarded-proto"] == ["http"]
        assert seen["x-forwarded-host"] == [STD]
        assert "authorization" not in seen
        assert seen["traceparent"] == ["00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"]
        assert seen["x-baseten-customer-request-id"] == ["customer-42"]
        assert seen["x-custom"] == ["kept as is"]
        # RFC 9110 §7.6.1: hop-by-hop fields, and fields named by Connection, are not forwarded.
        for name in ("x-foo", "keep-alive", "te", "proxy-connection"):
            assert name not in seen, (name, seen[name])
        assert all("x-foo" not in v.lower() for v in seen.get("connection", []))
        assert seen["content-length"] == ["5"]

        assert second.status == 200
        [second_id] = echo_headers(second)["x-baseten-request-id"]
        assert second_id != request_id, "x-baseten-request-id must be fresh per call"
        assert second.header("x-baseten-request-id") == second_id

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("method", "host", "path", "upstream", "environment", "deployments"),
    [
        ("POST", STD, "/production/predict", "/predict", "production", {"v1"}),
        ("POST", STD, "/environments/staging/predict", "/predict", "staging", {"v1", "v2"}),  # v2: canary
        ("POST", STD, "/deployment/v2/predict", "/predict", "", {"v2"}),
        ("POST", STD, "/development/predict", "/predict", "", {"dev"}),
        ("GET", STD, "/production/sync/v1/models", "/v1/models", "production", {"v1"}),
        ("PUT", STD, "/environments/prod-us/sync/v1/chat/completions", "/v1/chat/completions", "prod-us", {"v1"}),
        ("POST", REGIONAL_US, "/predict", "/predict", "prod-us", {"v1"}),
        ("DELETE", REGIONAL_US, "/sync/x", "/x", "prod-us", {"v1"}),
        ("POST", "chain-pipeline1.api.example.com", "/production/run_remote", "/run_remote", "production", {"c1"}),
        ("POST", STD, "/production/predict?b=2&a=%2F%20x&&c", "/predict?b=2&a=%2F%20x&&c", "production", {"v1"}),
        ("GET", STD, "/production/sync/v1/models?q=%7E%2f&&x=1+2&", "/v1/models?q=%7E%2f&&x=1+2&", "production",
         {"v1"}),
        ("POST", "MODEL-ABC123.API.EXAMPLE.COM.:8080", "/production/predict", "/predict", "production", {"v1"}),
    ],
)  # fmt: skip
def test_upstream_path_query_and_identity(
    gw: GatewayProcess, method: str, host: str, path: str, upstream: str, environment: str, deployments: set
) -> None:
    async def scenario() -> Response:
        async with Plane() as plane:
            serve(gw, table(plane))
            return await call(gw.port, http_request(method, path, host=host, body=b"x"))

    resp = asyncio.run(scenario())
    assert resp.status == 200, resp
    echo, seen = resp.json(), echo_headers(resp)
    assert (echo["method"], echo["path"]) == (method, upstream)
    assert seen["x-baseten-environment"] == [environment]  # present and empty for deployment/development
    assert seen["x-baseten-deployment-id"][0] in deployments
    assert seen["x-forwarded-host"] == [host]
    assert resp.header("x-baseten-request-id") == seen["x-baseten-request-id"][0]


@pytest.mark.parametrize("code", [500, 404, 429, 201])
def test_plane_answer_is_passed_through_unchanged(gw: GatewayProcess, code: int) -> None:
    async def scenario() -> Response:
        async with Plane() as plane:
            serve(gw, table(plane))
            return await call(gw.port, http_request("POST", f"/production/sync/status/{code}", body=b""))

    resp = asyncio.run(scenario())
    assert resp.status == code
    assert resp.header("x-plane") == "yes"
    assert (resp.header("content-type") or "").startswith("text/plain")
    assert resp.body == b"plane body %d" % code, "a plane's own error must not become a gateway error"
    assert resp.header("x-baseten-request-id")


# -- §4 streaming ---------------------------------------------------------------------------------


def test_sse_response_is_relayed_event_by_event(gw: GatewayProcess) -> None:
    """Event i+1 leaves the plane only after the client has received event i: a buffering relay deadlocks."""
    n = 6

    async def scenario() -> None:
        async with Plane() as plane, aiohttp.ClientSession() as session:
            serve(gw, table(plane))
            gates = plane.gate("sse", n)
            headers = {"Host": STD, "Authorization": AUTH}
            async with session.post(f"{gw.url}/production/sync/sse?n={n}", headers=headers, data=b"{}") as resp:
                assert resp.status == 200
                assert resp.headers["content-type"] == "text/event-stream"
                assert resp.headers["x-baseten-request-id"]
                for i in range(n):
                    async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                        event = await resp.content.readuntil(b"\n\n")
                    assert event == b"data: %d\n\n" % i
                    gates[i].set()
                assert await resp.content.read() == b""

    asyncio.run(scenario())


def test_chunked_upload_is_relayed_chunk_by_chunk(gw: GatewayProcess) -> None:
    """The client sends chunk i+1 only once the plane has received chunk i."""
    sizes = [1, 10, 1000, 70_000, 5]

    async def scenario() -> None:
        async with Plane() as plane, aiohttp.ClientSession() as session:
            serve(gw, table(plane))
            received = plane.progress(sizes)

            async def body():
                for i, size in enumerate(sizes):
                    yield bytes([65 + i]) * size
                    async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                        await received[i].wait()

            headers = {"Host": STD, "Authorization": AUTH}
            async with session.post(f"{gw.url}/production/sync/upload", headers=headers, data=body()) as resp:
                assert resp.status == 200
                assert await resp.json() == {"length": sum(sizes)}

    asyncio.run(scenario())


# -- §4 bounded memory --------------------------------------------------------------------------


class PeakRss:
    """Samples a process's RSS every 50 ms while in use; `growth` is the peak over the first sample."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.baseline = self.peak = self.proc.memory_info().rss

    async def __aenter__(self) -> PeakRss:
        self.task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        self.peak = max(self.peak, self.proc.memory_info().rss)

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            await asyncio.sleep(0.05)

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


def test_200_mib_response_streams_in_bounded_memory(tmp_path: Path) -> None:
    size = 200 * MiB

    async def scenario() -> None:
        async with Plane() as plane:
            config = write_table(tmp_path / "table.yaml", table(plane))
            with running_gateway(config) as gateway:
                await call(gateway.port, http_request("POST", "/production/predict", body=b"warm up"))
                async with aiohttp.ClientSession() as session, PeakRss(gateway.proc.pid) as rss:
                    url = f"{gateway.url}/production/sync/huge?size={size}"
                    async with session.post(url, headers={"Host": STD, "Authorization": AUTH}) as resp:
                        assert resp.status == 200
                        digest, received, finished_while_stalled = hashlib.sha256(), 0, None
                        async for data in resp.content.iter_chunked(MiB):
                            digest.update(data)
                            received += len(data)
                            if finished_while_stalled is None and received >= MiB:
                                # Stop reading: a relay that buffers lets the plane write all 200 MiB now.
                                with contextlib.suppress(TimeoutError):
                                    await asyncio.wait_for(plane.huge_done.wait(), STALL_SECONDS)
                                finished_while_stalled = plane.huge_done.is_set()
        assert received == size
        assert digest.hexdigest() == plane.huge_sha256
        assert rss.growth < RSS_BOUND, f"gateway RSS grew by {rss.growth / MiB:.1f} MiB"
        assert not finished_while_stalled, "the plane wrote 200 MiB while the client read nothing: no backpressure"

    asyncio.run(scenario())


def test_90_mib_upload_streams_in_bounded_memory(tmp_path: Path) -> None:
    size = 90 * MiB

    async def scenario() -> None:
        async with Plane() as plane:
            config = write_table(tmp_path / "table.yaml", table(plane))
            with running_gateway(config) as gateway:
                await call(gateway.port, http_request("POST", "/production/predict", body=b"warm up"))
                async with PeakRss(gateway.proc.pid) as rss, connect(gateway.port) as (reader, writer):
                    head = http_request("POST", "/production/sync/sink?stall=1")[:-2]  # open the head ...
                    writer.write(head + b"Content-Length: %d\r\n\r\n" % size)  # ... and declare the length
                    digest, sent, i = hashlib.sha256(), 0, 0
                    while sent < size:
                        chunk = huge_chunk(i, min(MiB, size - sent))
                        digest.update(chunk)
                        writer.write(chunk)
                        await writer.drain()
                        sent, i = sent + len(chunk), i + 1
                    plane.stall_release.set()
                    async with asyncio.timeout(30):
                        resp = await read_response(reader)
        assert resp.status == 200, resp
        assert resp.json() == {"length": size, "sha256": digest.hexdigest()}
        assert rss.growth < RSS_BOUND, f"gateway RSS grew by {rss.growth / MiB:.1f} MiB"
        assert plane.stall_ended_by == "timeout", "the client sent 90 MiB while the plane read nothing: no backpressure"

    asyncio.run(scenario())


# -- §4 limits ------------------------------------------------------------------------------------


def test_declared_body_over_100_mib_is_refused_before_forwarding(gw: GatewayProcess) -> None:
    async def scenario() -> None:
        async with Plane() as plane:
            serve(gw, table(plane))
            head = http_request("POST", "/production/predict")[:-2] + b"Content-Length: %d\r\n\r\n" % (LIMIT + 1)
            refused = await call(gw.port, head + b"x" * 1024, timeout=5)  # answered without the body
            # Ordering, not time: once a later call has reached the plane, an earlier forward would have too.
            after = await call(gw.port, http_request("POST", "/production/predict", body=b"after"))
        assert refused.status == 413
        assert refused.json()["error_code"] == "payload_too_large"
        assert refused.header("x-baseten-request-id")
        assert after.status == 200
        assert plane.requests == [("POST", "/predict")], "the refused call must not reach the plane"

    asyncio.run(scenario())


def test_client_that_sends_its_body_before_reading_still_gets_the_413(gw: GatewayProcess) -> None:
    """The gateway lingers after an early answer, so the client's writes do not turn into a reset."""

    async def scenario() -> Response:
        async with Plane() as plane, connect(gw.port) as (reader, writer):
            serve(gw, table(plane))
            writer.write(http_request("POST", "/production/predict")[:-2] + b"Content-Length: %d\r\n\r\n" % (LIMIT + 1))
            for _ in range(8):  # 8 MiB written before reading anything, as a naive client does
                writer.write(b"x" * MiB)
                await writer.drain()
            async with asyncio.timeout(10):
                return await read_response(reader)

    resp = asyncio.run(scenario())
    assert resp.status == 413 and resp.json()["error_code"] == "payload_too_large"


def test_body_exactly_at_the_limit_is_accepted(gw: GatewayProcess) -> None:
    async def scenario() -> tuple[Response, str]:
        async with Plane() as plane, connect(gw.port) as (reader, writer):
            serve(gw, table(plane))
            writer.write(http_request("POST", "/production/sync/sink")[:-2] + b"Content-Length: %d\r\n\r\n" % LIMIT)
            digest = hashlib.sha256()
            for i in range(LIMIT // MiB):
                chunk = huge_chunk(i, MiB)
                digest.update(chunk)
                writer.write(chunk)
                await writer.drain()
            async with asyncio.timeout(30):
                return await read_response(reader), digest.hexdigest()

    resp, sha = asyncio.run(scenario())
    assert resp.status == 200, resp
    assert resp.json() == {"length": LIMIT, "sha256": sha}


def test_chunked_body_passing_100_mib_gets_413_and_aborts_the_plane_call(gw: GatewayProcess) -> None:
    async def scenario() -> None:
        async with Plane() as plane, connect(gw.port) as (reader, writer):
            serve(gw, table(plane))
            answer = asyncio.create_task(read_response(reader))
            writer.write(http_request("POST", "/production/sync/sink", headers=(("Transfer-Encoding", "chunked"),)))
            sent = 0
            with contextlib.suppress(ConnectionError):
                while sent <= LIMIT + 4 * MiB and not answer.done():
                    writer.write(b"%x\r\n%s\r\n" % (MiB, huge_chunk(sent // MiB, MiB)))
                    await writer.drain()
                    sent += MiB
                writer.write(b"0\r\n\r\n")
                await writer.drain()
            async with asyncio.timeout(10):
                try:
                    resp = await answer
                except ConnectionError:
                    # Hypercorn closes the connection as soon as the 413 is written, without reading
                    # what the client is still sending (no lingering close, RFC 9112 §9.6). The client's
                    # next write then fails, and asyncio drops the unread 413 with the transport. The
                    # gateway's own part is checked below: the plane call was aborted within the limit.
                    if getattr(gw, "server", None) != "hypercorn":
                        raise
                    resp = None
                outcome, received = await plane.sink_outcome
        if resp is not None:
            assert resp.status == 413, resp
            assert resp.json()["error_code"] == "payload_too_large"
            assert resp.header("x-baseten-request-id")
        assert outcome != "eof", f"the plane got a cleanly ended body of {received} bytes; the call was not aborted"
        assert received <= LIMIT

    asyncio.run(scenario())


# -- §4 disconnects -----------------------------------------------------------------------------


def test_client_disconnect_reaches_the_plane_and_the_gateway_keeps_serving(gw: GatewayProcess) -> None:
    async def scenario() -> None:
        async with Plane() as plane:
            serve(gw, table(plane))
            async with connect(gw.port) as (reader, writer):
                writer.write(http_request("POST", "/production/sync/sse-gone", body=b""))
                async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                    await reader.readuntil(b"data: 0\n\n")
            # The client socket is closed now; the plane's writes must start failing.
            async with asyncio.timeout(HANDSHAKE_TIMEOUT + 2):
                outcome = await plane.gone
            assert outcome != "still connected", "the plane kept streaming to a client that had gone"
            for i in range(3):  # the broken upstream connection must not be handed to the next calls
                resp = await call(gw.port, http_request("POST", "/production/predict", body=b"after %d" % i))
                assert resp.status == 200 and resp.json()["body"] == f"after {i}"

    asyncio.run(scenario())


def test_client_disconnect_mid_upload_aborts_the_plane_call(gw: GatewayProcess) -> None:
    async def scenario() -> None:
        async with Plane() as plane:
            serve(gw, table(plane))
            [got_first] = plane.progress([1000])
            async with connect(gw.port) as (reader, writer):
                writer.write(http_request("POST", "/production/sync/sink", headers=(("Transfer-Encoding", "chunked"),)))
                writer.write(b"3e8\r\n" + b"u" * 1000 + b"\r\n")
                async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                    await got_first.wait()
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                outcome, received = await plane.sink_outcome
            assert outcome != "eof", "the plane saw a cleanly ended body although the client went away mid-upload"
            assert received == 1000
            resp = await call(gw.port, http_request("POST", "/production/predict", body=b"after"))
            assert resp.status == 200 and resp.json()["body"] == "after"

    asyncio.run(scenario())


# -- §4 upstream failures -----------------------------------------------------------------------


def assert_gateway_error(resp: Response, status: int, code: str) -> None:
    assert resp.status == status, resp
    assert resp.header("content-type") == "application/json"
    body = resp.json()
    assert set(body) == {"error", "error_code"} and body["error"], body
    assert body["error_code"] == code, body
    assert resp.header("x-baseten-request-id")
    assert resp.complete


def test_plane_that_cannot_be_connected_to_gives_503(gw: GatewayProcess) -> None:
    async def scenario() -> Response:
        async with Plane() as plane:
            dead = {"dead": {"plane": "us-east-1", "endpoints": [f"http://127.0.0.1:{free_port()}"]}}
            serve(gw, table(plane, deployments=dead))
            return await call(gw.port, http_request("POST", "/deployment/dead/predict", body=b"{}"))

    assert_gateway_error(asyncio.run(scenario()), 503, "model_unavailable")


async def close_on_accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    pass


async def close_after_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_head(reader)


async def answer_garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_head(reader)
    writer.write(b"this is not HTTP\r\n\r\n")
    await writer.drain()
    await reader.read()  # until the gateway hangs up


async def answer_half_a_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_head(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
    await writer.drain()


@pytest.mark.parametrize("script", [close_on_accept, close_after_head, answer_garbage, answer_half_a_head])
def test_plane_that_breaks_the_call_before_answering_gives_502(gw: GatewayProcess, script) -> None:
    async def scenario() -> tuple[Response, int]:
        async with Plane() as plane, RawPlane(script) as broken:
            serve(gw, raw_deployment(plane, broken))
            resp = await call(gw.port, http_request("POST", "/deployment/raw/predict", body=b"{}"))
            after = await call(gw.port, http_request("POST", "/production/predict", body=b"after"))
            assert after.status == 200 and after.json()["body"] == "after"
            return resp, broken.connections

    resp, connections = asyncio.run(scenario())
    assert connections >= 1
    assert_gateway_error(resp, 502, "model_unavailable")


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
def test_plane_that_closes_mid_body_gives_a_truncated_response(gw: GatewayProcess, framing: str) -> None:
    async def half_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        await reader.readexactly(2)  # the request body
        if framing == "chunked":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello")
        await writer.drain()
        await client_got_part.wait()  # close only once the first part has made it through

    async def scenario() -> Response:
        async with Plane() as plane, RawPlane(half_answer) as broken, connect(gw.port) as (reader, writer):
            serve(gw, raw_deployment(plane, broken))
            writer.write(http_request("POST", "/deployment/raw/predict", body=b"{}"))
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
                prefix = await reader.readuntil(b"hello")
            client_got_part.set()
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                rest = b""
                with contextlib.suppress(ConnectionResetError):
                    rest = await reader.read()
            feed = asyncio.StreamReader()
            feed.feed_data(head + prefix + rest)
            feed.feed_eof()
            return await read_response(feed)

    client_got_part = asyncio.Event()
    resp = asyncio.run(scenario())
    assert resp.status == 200
    assert resp.body.startswith(b"hello")
    assert not resp.complete, "a response cut by the plane must not look complete to the client"


def test_response_start_timeout_gives_504(gw: GatewayProcess) -> None:
    async def scenario() -> Response:
        async with Plane() as plane:
            serve(gw, table(plane, timeouts={"response_start_seconds": 1}))
            return await call(gw.port, http_request("POST", "/production/sync/slow", body=b"{}"))

    assert_gateway_error(asyncio.run(scenario()), 504, "timeout")


def test_hop_by_hop_fields_of_the_plane_response_are_removed(gw: GatewayProcess) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Bar\r\nX-Bar: hop\r\nKeep-Alive: timeout=5\r\n"
            b"Proxy-Connection: keep-alive\r\nX-Plane: yes\r\nContent-Length: 2\r\n\r\nok"
        )
        await writer.drain()

    async def scenario() -> Response:
        async with Plane() as plane, RawPlane(answer) as raw:
            serve(gw, raw_deployment(plane, raw))
            return await call(gw.port, http_request("GET", "/deployment/raw/sync/a"), method="GET")

    resp = asyncio.run(scenario())
    assert resp.status == 200 and resp.body == b"ok" and resp.header("x-plane") == "yes"
    names = {k for k, _ in resp.headers}
    # RFC 9110 §7.6.1: a proxy removes the fields the Connection header names, in both directions.
    assert "x-bar" not in names, resp.headers
    assert "keep-alive" not in names and "proxy-connection" not in names, resp.headers


def test_close_delimited_plane_response_ends_cleanly(gw: GatewayProcess) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart one, ")
        await writer.drain()
        writer.write(b"part two")  # RFC 9112 §6.3: no length, no chunking: the body ends at EOF

    async def scenario() -> Response:
        async with Plane() as plane, RawPlane(answer) as raw:
            serve(gw, raw_deployment(plane, raw))
            return await call(gw.port, http_request("GET", "/deployment/raw/sync/a"), method="GET")

    resp = asyncio.run(scenario())
    assert resp.status == 200
    assert resp.body == b"part one, part two"
    assert resp.complete and resp.chunked, "an HTTP/1.1 client needs a framed end, not a dropped connection"


def test_plane_connection_marked_close_is_not_reused(gw: GatewayProcess) -> None:
    async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        with contextlib.suppress(TimeoutError):  # keep the socket open: reusing it would hang the next call
            await asyncio.wait_for(all_done.wait(), HANDSHAKE_TIMEOUT)

    async def scenario() -> tuple[list[Response], int]:
        async with Plane() as plane, RawPlane(answer_once) as raw:
            serve(gw, raw_deployment(plane, raw))
            calls = [
                await call(gw.port, http_request("GET", "/deployment/raw/sync/a"), method="GET", timeout=3)
                for _ in range(2)
            ]
            all_done.set()
            return calls, raw.connections

    all_done = asyncio.Event()
    calls, connections = asyncio.run(scenario())
    assert [(r.status, r.body) for r in calls] == [(200, b"ok"), (200, b"ok")]
    assert connections == 2


def test_head_response_has_no_body_and_keeps_the_connection_usable(gw: GatewayProcess) -> None:
    async def scenario() -> tuple[Response, Response]:
        async with Plane() as plane, connect(gw.port) as (reader, writer):
            serve(gw, table(plane))
            writer.write(http_request("HEAD", "/production/sync/v1/models"))
            async with asyncio.timeout(10):
                head = await read_response(reader, method="HEAD")
                writer.write(http_request("POST", "/production/predict", body=b"after head"))
                after = await read_response(reader)
            return head, after

    head, after = asyncio.run(scenario())
    assert head.status == 200 and head.body == b""
    assert int(head.header("content-length") or 0) > 0  # the length the GET would have had
    assert after.status == 200 and after.json()["body"] == "after head"


# -- gateway error bodies (SPEC "Error body", §1, §2, §5, §8) ------------------------------------

ERRORS = [
    ("POST", "model-abc123.api.example.org", "/production/predict", AUTH, 404, "model_does_not_exist"),
    ("POST", "model-abc123.api.example.com.evil.net", "/production/predict", AUTH, 404, "model_does_not_exist"),
    ("POST", "model-nosuch.api.example.com", "/production/predict", AUTH, 404, "model_does_not_exist"),
    ("POST", "model-abc123-prod-eu.api.example.com", "/predict", AUTH, 421, "client_error"),
    ("POST", REGIONAL_US, "/environments/prod-us/predict", AUTH, 400, "client_error"),
    ("POST", STD, "/production/nosuch", AUTH, 404, "client_error"),
    ("GET", STD, "/production/predict", AUTH, 405, "client_error"),
    ("POST", STD, "/production/async_predict", AUTH, 400, "client_error"),  # {"secret": 1}: unknown field
    ("POST", STD, "/production/predict", None, 401, "unauthorized"),
    ("POST", STD, "/production/predict", "Api-Key sk-not-a-real-key-1234", 401, "unauthorized"),
    ("POST", STD, "/production/predict", "Bearer sk-not-a-real-key-1234", 401, "unauthorized"),
    ("POST", STD, "/production/predict", "Api-Key demo-key-staging", 403, "unauthorized"),
    ("POST", STD, "/production/predict", "Api-Key demo-key-globex", 404, "model_does_not_exist"),
    ("POST", "model-xyz789.api.example.com", "/production/predict", AUTH, 404, "model_does_not_exist"),
]


@pytest.mark.parametrize(("method", "host", "path", "auth", "status", "code"), ERRORS)
def test_gateway_errors_are_json_and_forward_nothing(
    gw: GatewayProcess, method: str, host: str, path: str, auth: str | None, status: int, code: str
) -> None:
    async def scenario() -> tuple[Response, list]:
        async with Plane() as plane:
            serve(gw, table(plane))
            body = b'{"secret": 1}' if method == "POST" else None
            resp = await call(gw.port, http_request(method, path, host=host, auth=auth, body=body))
            return resp, plane.requests

    resp, forwarded = asyncio.run(scenario())
    assert_gateway_error(resp, status, code)
    assert forwarded == []
    if status == 405:
        assert resp.header("allow") == "POST"
    if auth is not None:
        secret = auth.split()[1].encode()
        everything = resp.body + "".join(f"{k}: {v}" for k, v in resp.headers).encode()
        assert secret not in everything, "errors must never echo the key back"


def test_async_body_over_256_kib_is_not_forwarded(gw: GatewayProcess) -> None:
    """§4, §10: async bodies over 256 KiB get 413 — never forwarded, never stored."""

    async def scenario() -> tuple[Response, list]:
        async with Plane() as plane:
            serve(gw, table(plane))
            body = b"{" + b" " * (256 * 1024) + b"}"
            return await call(gw.port, http_request("POST", "/production/async_predict", body=body)), plane.requests

    resp, forwarded = asyncio.run(scenario())
    assert resp.status == 413 and resp.json()["error_code"] == "payload_too_large", resp
    assert forwarded == []


# -- HTTP/1.1 connection handling ---------------------------------------------------------------


def test_pipelined_requests_are_answered_in_order_and_the_connection_is_kept(gw: GatewayProcess) -> None:
    async def scenario() -> None:
        async with Plane() as plane, connect(gw.port) as (reader, writer):
            serve(gw, table(plane))
            writer.write(
                http_request("POST", "/production/predict", body=b"first")
                + http_request("POST", "/production/predict", auth=None, body=b"second")
                + http_request("POST", "/production/sync/stream?n=2", body=b"")
                + http_request("POST", "/production/predict", body=b"fourth")
            )
            async with asyncio.timeout(10):
                first, second, third, fourth = [await read_response(reader) for _ in range(4)]
                writer.write(http_request("POST", "/production/predict", body=b"later"))  # same connection
                later = await read_response(reader)
        assert first.status == 200 and first.json()["body"] == "first"
        assert second.status == 401 and second.json()["error_code"] == "unauthorized"
        assert third.status == 200 and third.chunked and third.body == b"data: 0\n\ndata: 1\n\n"
        assert fourth.status == 200 and fourth.json()["body"] == "fourth"
        assert later.status == 200 and later.json()["body"] == "later"
        ids = [r.header("x-baseten-request-id") for r in (first, second, third, fourth, later)]
        assert len(set(ids)) == 5

    asyncio.run(scenario())


def test_http10_client_gets_a_response_it_can_read(gw: GatewayProcess) -> None:
    async def scenario() -> tuple[Response, Response]:
        async with Plane() as plane:
            serve(gw, table(plane))
            results = []
            for data in (
                http_request("POST", "/production/predict", body=b"old client", version="1.0"),
                http_request("POST", "/production/sync/stream?n=3", body=b"", version="1.0"),
            ):
                async with connect(gw.port) as (reader, writer):
                    writer.write(data)
                    async with asyncio.timeout(10):
                        results.append(await read_response(reader))
                        assert await reader.read() == b"", "nothing may follow the response"
            return results[0], results[1]

    echo, stream = asyncio.run(scenario())
    assert echo.status == 200 and echo.json()["body"] == "old client"
    assert stream.status == 200
    assert not stream.chunked, "HTTP/1.0 has no chunked encoding (RFC 9112 §6.1)"
    assert stream.body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"


def test_expect_100_continue_upload(gw: GatewayProcess) -> None:
    async def scenario() -> tuple[bytes, Response]:
        async with Plane() as plane, connect(gw.port) as (reader, writer):
            serve(gw, table(plane))
            writer.write(http_request("POST", "/production/predict", headers=(("Expect", "100-continue"),))[:-2])
            writer.write(b"Content-Length: 11\r\n\r\n")
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                interim = await reader.readuntil(b"\r\n\r\n")  # nothing of the body has been sent yet
                writer.write(b"hello world")
                return interim, await read_response(reader)

    interim, resp = asyncio.run(scenario())
    assert interim.startswith(b"HTTP/1.1 100 ")
    assert resp.status == 200 and resp.json()["body"] == "hello world"


# -- concurrency ----------------------------------------------------------------------------------


def test_200_concurrent_calls_get_their_own_answers(gw: GatewayProcess) -> None:
    ids: set[str] = set()

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        body = (f"call {i} " * (1 + i * 37)).encode()  # 8 bytes to ~60 KiB: several reads on some
        headers = {"Host": STD, "Authorization": AUTH}
        async with session.post(f"{gw.url}/production/predict", headers=headers, data=body) as resp:
            assert resp.status == 200
            echo = await resp.json()
        assert echo["body"].encode() == body, f"call {i} got another call's answer"
        [plane_id] = [v for k, v in echo["headers"] if k.lower() == "x-baseten-request-id"]
        assert resp.headers["x-baseten-request-id"] == plane_id
        ids.add(plane_id)

    async def scenario() -> None:
        async with Plane() as plane:
            serve(gw, table(plane))
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=50)) as session:
                await asyncio.gather(*(one(session, i) for i in range(200)))
            assert len(ids) == 200, "request ids must be fresh per call"
            assert len(plane.requests) == 200

    asyncio.run(scenario())


# -- absolute-form request targets (RFC 9112 §3.2.2, issue 13) -----------------------------------


def test_a_client_behind_an_http_proxy_setting_reaches_the_model(gw: GatewayProcess) -> None:
    async def scenario() -> None:
        async with Plane() as plane, aiohttp.ClientSession() as session:
            serve(gw, table(plane))
            # aiohttp with proxy= sends the absolute form, as curl -x and requests' proxies do.
            async with session.post(f"http://{STD}/production/predict?q=1", data=b'{"x": 1}', headers={"Authorization": AUTH},
                                    proxy=gw.url) as r:  # fmt: skip
                body = await r.read()
                assert r.status == 200, body
                assert r.headers["x-baseten-deployment-id"] == "v1"
            assert plane.requests[-1] == ("POST", "/predict?q=1")

            raw = await raw_request(
                gw.port,
                f"POST http://{STD}/production/predict HTTP/1.1\r\nHost: model-xyz789.api.example.com\r\n"
                f"Authorization: {AUTH}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}".encode(),
            )
            status, _, answer = parse_response(raw)
            assert status == 400 and "another host" in json.loads(answer)["error"]
            assert len(plane.requests) == 1  # nothing of the refused call was forwarded

    asyncio.run(scenario())
