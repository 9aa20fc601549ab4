"""Real upstream planes for gateway tests, served in the test's own event loop on 127.0.0.1 port 0.

`Plane` is an aiohttp.web server whose routes are the behaviours a test needs from a workload plane.
Any path not listed below echoes the request as JSON, so the gateway's upstream path rewriting is
visible (`/production/sync/v1/models` reaches the plane as `/v1/models` and is echoed):

    /sse?n=N         N server-sent events; event i+1 is written only after the test sets
                     `plane.gate("sse", N)[i]` (it does so once it has *received* event i)
    /stream?n=N      N server-sent events written back to back (no handshake)
    /sse-gone        one event, then one event every 20 ms until a write fails; the outcome lands
                     in `plane.gone` (the disconnect of the client must reach the plane)
    /upload          reads the body; `plane.progress(sizes)[i]` is set once chunk i is fully received
    /sink            reads the body (setting `plane.progress` events too), answers {"length", "sha256"};
                     the read's outcome lands in `plane.sink_outcome`: ("eof" or the exception's name,
                     bytes received).
                     `?stall=1`: after the first MiB, stops reading until `plane.stall_release` is
                     set or STALL_SECONDS pass (`plane.stall_ended_by` says which)
    /huge?size=N     N bytes in 256 KiB chunks (chunked encoding), sha256 of what was sent in
                     `plane.huge_sha256`; `plane.huge_done` is set when everything was written
    /status/<code>   answers <code> with `x-plane: yes` and body `plane body <code>` (text/plain)
    /slow            answers 200 after 3 s (or at shutdown)
    /wake            answers 202; the request's headers are appended to `plane.wakes` and `plane.woken` is set
    (Upgrade: websocket on any path) a WebSocket echo (text and binary)

Every request's method, raw path and lowercased headers are appended to `plane.seen`. Options:
`Plane(blocking=True)` makes every request but /wake wait, after setting `plane.arrived`, until the
test sets `plane.release` or `block_seconds` pass; `Plane(fixed_status=500)` answers every request
but /wake with that status (after blocking, if both), keeping the bodies in `plane.bodies`.

`RawPlane` is a bare TCP server driven by one coroutine per connection, for planes that misbehave
at the byte level (accept and close, close mid-body).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable

from aiohttp import web

HANDSHAKE_TIMEOUT = 5.0  # a gateway that buffers fails the test instead of hanging it
STALL_SECONDS = 1.5  # how long a memory test stops reading to let a buffering gateway show itself
CHUNK = 256 * 1024
_BLOCK = bytes(range(256)) * (CHUNK // 256)


def huge_chunk(i: int, size: int) -> bytes:
    """Chunk `i` of the /huge body: numbered, so reordered or repeated chunks change the digest."""
    block = _BLOCK if size <= CHUNK else _BLOCK * -(-size // CHUNK)
    return (i.to_bytes(8, "big") + block[8:size])[:size]


class Plane:
    """An aiohttp.web plane on 127.0.0.1:0 in the running loop; `await start()`, `await close()`."""

    def __init__(self, *, blocking: bool = False, block_seconds: float = 2.0, fixed_status: int | None = None) -> None:
        self.requests: list[tuple[str, str]] = []  # (method, raw path) of every request received
        self.bodies: list[bytes] = []  # request bodies read by a `fixed_status` plane
        self.seen: list[dict] = []  # {"method", "path", "headers": {lowercased name: value}} per request
        self.wakes: list[dict[str, str]] = []  # headers of each POST /wake
        self.woken = asyncio.Event()
        self.blocking = blocking
        self.block_seconds = block_seconds
        self.fixed_status = fixed_status
        self.arrived = asyncio.Event()  # a request reached a blocking plane
        self.release = asyncio.Event()  # lets a blocking plane's requests go on
        self.gates: dict[str, list[asyncio.Event]] = {}
        self.progress_events: list[tuple[int, asyncio.Event]] = []
        self.stopping = asyncio.Event()
        self.gone: asyncio.Future = asyncio.get_running_loop().create_future()
        self.sink_outcome: asyncio.Future = asyncio.get_running_loop().create_future()
        self.stall_release = asyncio.Event()
        self.stall_ended_by = ""  # "release" (the test let go) or "timeout"
        self.huge_done = asyncio.Event()
        self.huge_sha256 = ""
        self.huge_sent = 0
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Plane:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.dispatch)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def close(self) -> None:
        self.stopping.set()
        if self.runner is not None:
            await self.runner.cleanup()

    async def __aenter__(self) -> Plane:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def gate(self, name: str, n: int) -> list[asyncio.Event]:
        """Events the test sets to let a handshaking stream continue; created on first use."""
        if name not in self.gates:
            self.gates[name] = [asyncio.Event() for _ in range(n)]
        return self.gates[name]

    def progress(self, sizes: list[int]) -> list[asyncio.Event]:
        """Events set by /upload once the body has reached the end of each chunk of `sizes`."""
        total, self.progress_events = 0, []
        for size in sizes:
            total += size
            self.progress_events.append((total, asyncio.Event()))
        return [event for _, event in self.progress_events]

    def _progressed(self, received: int) -> None:
        for boundary, event in self.progress_events:
            if received >= boundary:
                event.set()

    # -- routes ---------------------------------------------------------------------------

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.raw_path))
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.seen.append({"method": request.method, "path": request.raw_path, "headers": headers})
        path = request.path
        if path == "/wake":
            self.wakes.append(headers)
            self.woken.set()
            return web.Response(status=202, text="waking")
        if self.blocking:
            self.arrived.set()
            try:
                await asyncio.wait_for(self.release.wait(), self.block_seconds)
            except TimeoutError:
                pass
        if self.fixed_status is not None:
            self.bodies.append(await request.read())
            return web.Response(status=self.fixed_status, text=f"plane status {self.fixed_status}")
        if headers.get("upgrade", "").lower() == "websocket":
            return await self.websocket(request)
        if path.startswith("/status/"):
            code = int(path.rsplit("/", 1)[1])
            return web.Response(status=code, text=f"plane body {code}", headers={"x-plane": "yes"})
        handler = {
            "/sse": self.sse,
            "/stream": self.stream,
            "/sse-gone": self.sse_gone,
            "/upload": self.upload,
            "/sink": self.sink,
            "/huge": self.huge,
            "/slow": self.slow,
        }.get(path, self.echo)
        return await handler(request)

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type == web.WSMsgType.TEXT:
                await ws.send_str(message.data)
            elif message.type == web.WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        return ws

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.content.read()
        doc = {
            "method": request.method,
            "path": request.raw_path,
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
            "body": body.decode("latin-1"),
        }
        return web.Response(body=json.dumps(doc).encode(), content_type="application/json")

    async def _event_stream(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
        await resp.prepare(request)
        return resp

    async def sse(self, request: web.Request) -> web.StreamResponse:
        n = int(request.query.get("n", "3"))
        gates = self.gate("sse", n)
        resp = await self._event_stream(request)
        for i in range(n):
            await resp.write(b"data: %d\n\n" % i)
            try:
                await asyncio.wait_for(gates[i].wait(), HANDSHAKE_TIMEOUT)
            except TimeoutError:
                return resp  # the client never saw event i: end short, the test fails on its side
        await resp.write_eof()
        return resp

    async def stream(self, request: web.Request) -> web.StreamResponse:
        resp = await self._event_stream(request)
        for i in range(int(request.query.get("n", "3"))):
            await resp.write(b"data: %d\n\n" % i)
        await resp.write_eof()
        return resp

    async def sse_gone(self, request: web.Request) -> web.StreamResponse:
        resp = await self._event_stream(request)
        try:
            await resp.write(b"data: 0\n\n")
            for _ in range(int(HANDSHAKE_TIMEOUT / 0.02)):
                await asyncio.sleep(0.02)
                await resp.write(b"data: tick\n\n")
        except (ConnectionError, asyncio.CancelledError) as exc:
            if not self.gone.done():
                self.gone.set_result(type(exc).__name__)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return resp
        if not self.gone.done():
            self.gone.set_result("still connected")
        return resp

    async def upload(self, request: web.Request) -> web.Response:
        received = 0
        async for data in request.content.iter_any():
            received += len(data)
            self._progressed(received)
        return web.json_response({"length": received})

    async def sink(self, request: web.Request) -> web.Response:
        digest, received = hashlib.sha256(), 0
        stall = request.query.get("stall") == "1"
        try:
            while True:
                data = await request.content.readany()
                if not data:
                    break
                digest.update(data)
                received += len(data)
                self._progressed(received)
                if stall and received >= 1024 * 1024:
                    stall = False
                    try:
                        await asyncio.wait_for(self.stall_release.wait(), STALL_SECONDS)
                        self.stall_ended_by = "release"
                    except TimeoutError:
                        self.stall_ended_by = "timeout"
        except (Exception, asyncio.CancelledError) as exc:
            if not self.sink_outcome.done():
                self.sink_outcome.set_result((type(exc).__name__, received))
            if isinstance(exc, asyncio.CancelledError):
                raise
            return web.Response(status=400, text="request body broken")
        if not self.sink_outcome.done():
            self.sink_outcome.set_result(("eof", received))
        return web.json_response({"length": received, "sha256": digest.hexdigest()})

    async def huge(self, request: web.Request) -> web.StreamResponse:
        size = int(request.query["size"])
        resp = web.StreamResponse(headers={"content-type": "application/octet-stream"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        digest, i, sent = hashlib.sha256(), 0, 0
        while sent < size:
            chunk = huge_chunk(i, min(CHUNK, size - sent))
            digest.update(chunk)
            await resp.write(chunk)
            sent += len(chunk)
            self.huge_sent = sent
            i += 1
        await resp.write_eof()
        self.huge_sha256 = digest.hexdigest()
        self.huge_done.set()
        return resp

    async def slow(self, request: web.Request) -> web.Response:
        try:
            await asyncio.wait_for(self.stopping.wait(), 3)
        except TimeoutError:
            pass
        return web.Response(text="slow answer")


ConnectionScript = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawPlane:
    """A TCP server that runs `script(reader, writer)` per connection, then closes it."""

    def __init__(self, script: ConnectionScript) -> None:
        self.script = script
        self.server: asyncio.base_events.Server | None = None
        self.connections = 0
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> RawPlane:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def read_head(reader: asyncio.StreamReader) -> bytes:
    """The request head (through the blank line) a RawPlane script received."""
    return await reader.readuntil(b"\r\n\r\n")


class LoggingPlane:
    """Answers each request by `behaviour` for upgrades and 200 JSON otherwise; logs (connection, head, body)."""

    def __init__(self, behaviour: str = "400-keep-alive") -> None:
        self.behaviour = behaviour  # "400-keep-alive" | "200-ignores-upgrade" | "close"
        self.log: list[tuple[int, bytes, bytes]] = []
        self.connections = 0
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> LoggingPlane:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = self.connections
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                body = await self._body(reader, head)
                self.log.append((conn, head, body))
                if b"\r\nupgrade: websocket" in head.lower():
                    if self.behaviour == "close":
                        break
                    status = b"400 Bad Request" if self.behaviour == "400-keep-alive" else b"200 OK"
                else:
                    status = b"200 OK"
                answer = json.dumps({"connection": conn, "n": len(self.log)}).encode()
                writer.write(b"HTTP/1.1 %s\r\ncontent-length: %d\r\n\r\n%s" % (status, len(answer), answer))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _body(reader: asyncio.StreamReader, head: bytes) -> bytes:
        fields = dict(
            line.split(b":", 1) for line in head.lower().split(b"\r\n")[1:] if b":" in line
        )  # fmt: skip
        if b"content-length" in fields:
            return await reader.readexactly(int(fields[b"content-length"]))
        if b"chunked" in fields.get(b"transfer-encoding", b""):
            body = b""
            while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
                body += (await reader.readexactly(size + 2))[:-2]
            await reader.readuntil(b"\r\n")
            return body
        return b""

    def heads_on(self, conn: int) -> list[bytes]:
        return [head for c, head, _ in self.log if c == conn]
