"""One ASGI HTTP call, seen by the public handler as a connection of the native server.

The scope becomes the same `Request` the HTTP/1.1 server parses (`server.read_fields` reads its
header fields), `receive()` feeds its `Body`, and what the handler writes (HTTP/1.1 bytes, as it writes
to a socket) is decoded back into `http.response.*` messages by httptools, so routing, auth,
holds, backpressure, canary, shadow, retries and error bodies are the native server's own code.
Flow control maps onto the same switches: a paused `Body` stops calling `receive()`, and a client
that does not take what `send()` offers pauses the plane's connection.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import httptools

from gateway.errors import GatewayError
from gateway.http.server import Handler, HttpConnection, Request, read_fields

HIGH_WATER = 256 * 1024  # bytes offered to send() and not yet taken: pause the plane's connection
LOW_WATER = 64 * 1024
SCHEMES = {"ws": "http", "wss": "https"}  # the plane's x-forwarded-proto for a WebSocket scope
# Framing is the ASGI server's; these never go into an http.response.start.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"proxy-connection", b"upgrade"})
BODYLESS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "TRACE"})


class ResponseAborted(Exception):
    """Raised to the ASGI server after the response started: the client must see a truncated answer."""


class ResponseDecoder:
    """HTTP/1.1 response bytes in, `http.response.*` messages out (httptools callbacks)."""

    def __init__(self, emit: Callable[[dict], None], head_only: bool) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.emit = emit
        self.head_only = head_only
        self.headers: list[tuple[bytes, bytes]] = []
        self.started = self.complete = False

    def feed(self, data: bytes) -> None:
        if not self.complete:
            self.parser.feed_data(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name not in HOP_BY_HOP:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        self.started = True
        self.emit({"type": "http.response.start", "status": status, "headers": self.headers})
        if self.head_only:  # no body follows a HEAD answer, whatever its Content-Length says
            self.on_message_complete()

    def on_body(self, body: bytes) -> None:
        self.emit({"type": "http.response.body", "body": body, "more_body": True})

    def on_message_complete(self) -> None:
        if not self.complete:
            self.complete = True
            self.emit({"type": "http.response.body", "body": b"", "more_body": False})


def request_of(conn: HttpConnection, scope: MutableMapping[str, Any]) -> Request:
    """The native `Request` of an ASGI scope (raises GatewayError for a head the server would refuse)."""
    req = Request(conn)
    conn.req = req
    req.method = scope.get("method", "GET")
    path = scope.get("raw_path") or scope["path"].encode()
    root = scope.get("root_path", "").encode()
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in (b"", b"/"):
        path = path[len(root) :] or b"/"  # mounted under a prefix (Starlette Mount): route what follows it
    query = scope.get("query_string", b"")
    req.target = (path + b"?" + query if query else path).decode("latin-1")
    req.headers = [(bytes(name).lower(), bytes(value)) for name, value in scope.get("headers", ())]
    read_fields(req)
    if scope.get("http_version") == "2" and req.content_length is None and req.method not in BODYLESS:
        req.chunked = True  # an HTTP/2 body has no framing header: stream it to the plane chunked
    return req


class AsgiConnection(HttpConnection):
    """The connection the handler answers one ASGI HTTP call on."""

    def __init__(
        self, scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[dict]],
        send: Callable[[dict], Awaitable[None]], handler: Handler, tracker: set | None,
    ) -> None:  # fmt: skip
        scheme = scope.get("scheme", "http")
        super().__init__(handler, scheme=SCHEMES.get(scheme, scheme), tracker=tracker)
        self.scope, self.receive, self.send = scope, receive, send
        client = scope.get("client")
        self.peer = client[0] if client else ""  # x-forwarded-for (SPEC §4)
        self.outbox: collections.deque[dict] = collections.deque()
        self.queued = 0  # body bytes in the outbox
        self.write_paused = False
        self.wakeup = asyncio.Event()
        self.reading = asyncio.Event()
        self.reading.set()
        self.pump: asyncio.Task | None = None
        self.ended = self.aborted = False
        self.closed_by_client = False  # receive() said the client went away
        self.refused: GatewayError | None = None
        self.decoder: Any = None
        if tracker is not None:
            tracker.add(self)

    def __repr__(self) -> str:
        return f"<AsgiConnection {self.req!r} queued={self.queued} ended={self.ended}>"

    def refuse(self, error: GatewayError) -> None:
        """Answer `error` instead of handing the call to the handler."""
        self.refused = error

    # -- the call --------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            req = self.begin()
            if req is not None and not req.expect_continue:  # with Expect, our first receive() sends 100
                # The first body message before the handler: a small body is then complete and goes to
                # the plane in one write with the head, as natively after one read.
                if req.has_body and not self.take(await self.receive()):
                    return
                self._ensure_pump()
            if req is not None and not self.closed_by_client:
                self._start(req)  # the native lifecycle: the handler answers now or later, then `finish`
            await self.deliver()
        finally:
            if self.pump is not None:
                self.pump.cancel()
            if self.tracker is not None:
                self.tracker.discard(self)
        if self.truncated():
            raise ResponseAborted("the plane's answer broke off: the client must not take it as complete")

    def truncated(self) -> bool:
        """The answer started and will not be complete (the native server aborts the connection)."""
        if self.closed_by_client:
            return False
        return self.aborted or (self.decoder.started and not self.decoder.complete)

    def new_decoder(self, req: Request) -> Any:
        return ResponseDecoder(self._push, req.method == "HEAD")

    def begin(self) -> Request | None:
        try:
            req = request_of(self, self.scope)
        except GatewayError as error:
            self.refused = self.refused or error
            req = self.req = Request(self)
        self.decoder = self.new_decoder(req)
        if self.refused is not None:
            self.current = req
            self.send_error(self.refused)
            self.finish(req)
            return None
        if not req.has_body:
            req.body.feed_eof()  # as the native parser does before the handler sees a bodyless request
        return req

    async def deliver(self) -> None:
        """Hand the outbox to send() until the call has ended and everything was taken."""
        while True:
            while self.outbox:
                message = self.outbox.popleft()
                self._taken(message)
                try:
                    await self.send(message)
                except OSError:  # the client is gone (servers raise on a send after disconnect)
                    self.connection_lost(None)
                    return
            if self.ended or self.closed_by_client:
                return
            self.wakeup.clear()
            await self.wakeup.wait()

    def _push(self, message: dict) -> None:
        self.outbox.append(message)
        self.queued += len(message.get("body") or message.get("bytes") or message.get("text") or b"")
        if self.queued > HIGH_WATER and not self.write_paused:
            self.write_paused = True
            self.paused_write(True)  # the client is not reading: throttle the plane (native: pause_writing)
        self.wakeup.set()

    def _taken(self, message: dict) -> None:
        self.queued -= len(message.get("body") or message.get("bytes") or message.get("text") or b"")
        if self.write_paused and self.queued <= LOW_WATER:
            self.write_paused = False
            self.paused_write(False)

    # -- receive(): the request body ----------------------------------------------------------

    def _ensure_pump(self) -> None:
        if self.pump is None:
            self.pump = self.loop.create_task(self._read())

    async def _read(self) -> None:
        while True:
            if self.paused:
                await self.reading.wait()
            message = await self.receive()
            if not self.take(message):
                return

    def take(self, message: dict) -> bool:
        """One message from receive(); False once the client is gone."""
        kind = message["type"]
        if kind == "http.request":
            req = self.req
            if not req.body.complete:
                body = message.get("body", b"")
                if body:
                    self.on_body(body)
                # A Content-Length body is whole at its length, as the native parser says: granian sends
                # `more_body: False` only in an empty message after it, which may come after the answer.
                if not message.get("more_body", False) or req.body.received == req.content_length:
                    self.on_message_complete()
            return True
        self.client_gone()
        return False

    def client_gone(self) -> None:
        self.closed_by_client = True
        self.connection_lost(None)  # the native path: on_lost cancels the plane call or leaves the hold
        self.wakeup.set()

    # -- what HttpConnection does with its transport ----------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.decoder.feed(data)

    def writelines(self, data: list[bytes]) -> None:
        if not self.closed:
            self.decoder.feed(b"".join(data))

    def send_continue(self) -> None:
        self._ensure_pump()  # the ASGI server answers 100 Continue to our first receive()

    def pause_reading(self, reason: int) -> None:
        self.paused |= reason
        self.reading.clear()

    def resume_reading(self, reason: int) -> None:
        self._ensure_pump()
        self.paused &= ~reason
        if not self.paused:
            self.reading.set()

    def finish(self, req: Request) -> None:
        if self.current is req:
            super().finish(req)
            self.ended = True
            self.wakeup.set()

    def linger(self, seconds: float = 0.0) -> None:
        self.close()  # the ASGI server discards what is left of the body

    def close(self) -> None:
        self.closed = True
        self.ended = True
        self.wakeup.set()

    def abort(self) -> None:
        self.aborted = True
        self.close()
