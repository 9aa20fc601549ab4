"""Keep-alive HTTP/1.1 connections to planes, pooled per (scheme, host, port).

An `UpstreamConnection` parses the plane's response with httptools and hands each
event to the `Exchange` currently using it (`on_response_head`, `on_response_body`,
`on_response_complete`, `on_upstream_lost`, and `flush` once per read) so a chunk is
relayed in the same loop iteration it arrives in. Connections are opened by the one
region-checked connector (`gateway.upstream.connect`); the pool lends them again only when their
last exchange was framed completely both ways (`UpstreamConnection.clean`, issue 9).
"""

from __future__ import annotations

import asyncio
import collections
import socket
import time
from collections.abc import Callable, Hashable
from typing import Protocol

import httptools

from gateway.errors import ConnectionReset, GatewayError, UpstreamBroken
from gateway.routing.model import Upstream

IDLE_EXPIRY_SECONDS = 4.0  # below the usual 5 s keep-alive timeout of Python plane servers
MAX_AGE_SECONDS = 30.0  # then a new connection, so a DNS change reaches even a busy pool
MAX_IDLE_PER_HOST = 256


class Exchange(Protocol):
    def on_response_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None: ...
    def on_response_body(self, data: bytes) -> None: ...
    def on_response_complete(self) -> None: ...
    def on_upstream_lost(self, error: GatewayError) -> None: ...
    def flush(self) -> None: ...
    def upstream_write_paused(self, paused: bool) -> None: ...
    def on_upgrade(self, tail: bytes) -> None: ...
    def on_tunnel_data(self, data: bytes) -> None: ...
    def on_tunnel_closed(self) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    def __init__(self, pool: Pool, key: tuple) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.reason = b""
        self.reusable = False
        self.closed = False
        self.head_only = False  # response to HEAD: no body follows the head
        self.body_delimited = False  # Content-Length or chunked; otherwise ends at EOF
        self.message_done = False
        self.upgrade_requested = False
        self.upgraded = False  # the plane answered 101: raw bytes from here on
        self.request_complete = True  # every byte of the current request is written (issue 9)
        self.idle_since = 0.0
        self.born = time.monotonic()
        self.eof = False
        self.requests = 0
        self.address = ""  # the resolved address it was opened to (the host's answer may move on)

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("active" if self.exchange else "idle")
        return f"<UpstreamConnection {self.key[1]}:{self.key[2]} {state}, {self.requests} requests>"

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            # Bytes on an idle connection are a protocol error by the plane: drop it.
            self.close()
            return
        if self.upgraded:
            exchange.on_tunnel_data(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            if not self.upgraded:
                self._lost(UpstreamBroken("plane switched protocols without being asked to"))
                return
            exchange.flush()  # the 101 head first, then whatever followed it
            exchange.on_upgrade(data[upgrade.args[0] :])
            return
        except httptools.HttpParserError as exc:
            self._lost(UpstreamBroken(f"plane sent a malformed response: {exc}"))
            return
        exchange.flush()

    def eof_received(self) -> bool | None:
        # The plane closed its side: never lend this connection again, even in this loop turn
        # (connection_lost, which sets `closed`, only runs on the next one).
        self.eof = True
        self.pool.forget(self)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.upgraded and self.exchange is not None:
            exchange, self.exchange = self.exchange, None
            exchange.on_tunnel_closed()
            return
        if self.exchange is not None:
            if self.headers_done and not self.body_delimited and not self.message_done:
                self.on_message_complete()  # close-delimited body ends at EOF (RFC 9112 §6.3)
                if self.exchange is not None:
                    self.exchange.flush()
                return
            self._lost(ConnectionReset("plane closed the connection mid-call"))

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_write_paused(True)

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_write_paused(False)

    # -- httptools callbacks ----------------------------------------------------------------

    headers_done = False

    def on_message_begin(self) -> None:
        self.headers = []
        self.connection_tokens: frozenset[bytes] = frozenset()
        self.reason = b""
        self.headers_done = False
        self.body_delimited = False
        self.message_done = False

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length" or (name == b"transfer-encoding" and b"chunked" in value.lower()):
            self.body_delimited = True
        elif name == b"connection":
            self.connection_tokens |= {t.strip().lower() for t in value.split(b",")}
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status == 101:
            if not self.upgrade_requested:
                self._lost(UpstreamBroken("plane switched protocols without being asked to"))
                return
            self.upgraded = True
            self.reusable = False
        elif 100 <= status < 200:
            self.headers = []  # interim response (e.g. 100 Continue): not relayed
            return
        self.headers_done = True
        if status in (204, 304):
            self.body_delimited = True
        if self.exchange is not None:
            self.exchange.on_response_head(status, self.reason, self.headers)
        if self.head_only:
            self.reusable = False  # the parser would wait for a body that never comes
            self.body_delimited = True
            self.on_message_complete()

    def on_body(self, body: bytes) -> None:
        if self.exchange is not None:
            self.exchange.on_response_body(body)

    def on_message_complete(self) -> None:
        if not self.headers_done or self.message_done or self.upgraded:
            return  # after a 101 the connection carries the tunnel, not another response
        self.message_done = True
        self.reusable = self.reusable and self.parser.should_keep_alive() and self.body_delimited
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.on_response_complete()

    # -- use by an exchange -----------------------------------------------------------------

    def start(
        self, exchange: Exchange, head: list[bytes], *, head_only: bool = False, upgrade: bool = False,
        body_pending: bool = False,
    ) -> None:  # fmt: skip
        """Send a request head (with its whole body, unless `body_pending`: then `request_done` follows).

        An upgrade request never leaves its connection reusable: answered 101 it carries the tunnel,
        and refused, the plane's idea of where the request ended need not match ours (RFC 9110 §7.8
        lets it ignore Upgrade; issue 9: a refused upgrade with a body smuggled the next caller's
        request into it).
        """
        self.exchange = exchange
        self.head_only = head_only
        self.upgrade_requested = upgrade
        self.reusable = not upgrade
        self.request_complete = not body_pending
        self.requests += 1
        self.transport.writelines(head)  # type: ignore[union-attr]

    def request_done(self) -> None:
        """The last byte of the current request's body is written."""
        self.request_complete = True

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)  # type: ignore[union-attr]

    def writelines(self, data: list[bytes]) -> None:
        if not self.closed:
            self.transport.writelines(data)  # type: ignore[union-attr]

    def pause_reading(self, paused: bool) -> None:
        if self.closed:
            return
        if paused:
            self.transport.pause_reading()  # type: ignore[union-attr]
        else:
            self.transport.resume_reading()  # type: ignore[union-attr]

    @property
    def clean(self) -> bool:
        """Safe to carry another caller's request: unused, or its last exchange framed completely both ways.

        The pool's invariant (issue 9): a connection whose request was not fully written, whose
        response did not end at a delimited boundary, or which carried an upgrade request is never
        reused, since the plane would read the next request as part of the last one.
        """
        if self.closed or self.eof or self.exchange is not None:
            return False
        if self.requests == 0:
            return True
        return self.reusable and self.message_done and self.request_complete

    def release(self) -> None:
        """Back to the pool if the last exchange left it clean; closed otherwise."""
        if self.clean:
            self.pool.park(self)
        else:
            self.close()

    def close(self) -> None:
        self.exchange = None
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()
            self.pool.forget(self)

    def _lost(self, error: GatewayError) -> None:
        exchange, self.exchange = self.exchange, None
        self.close()
        if exchange is not None:
            exchange.on_upstream_lost(error)


class Pool:
    """Idle connections per upstream; new connections when none is idle."""

    def __init__(self) -> None:
        self.idle: dict[tuple, collections.deque[UpstreamConnection]] = {}
        self.opened = 0

    def __repr__(self) -> str:
        idle = sum(len(d) for d in self.idle.values())
        return f"<Pool [{idle} idle | {self.opened} opened]>"

    @staticmethod
    def key(up: Upstream, tls: Hashable = None) -> tuple:
        """Connections are shared only between callers with the same address AND TLS identity:
        a connection made with one plane's client certificate must never carry another's calls."""
        return (up.scheme, up.host, up.port, tls if up.scheme == "https" else None)

    def take_idle(
        self, up: Upstream, tls: Hashable = None, current: Callable[[str, str], bool] | None = None
    ) -> UpstreamConnection | None:  # fmt: skip
        """The warmest idle connection to `up`, or None.

        With `current(host, address)`, a connection whose address left its host's DNS answer is
        closed instead of lent (issue 10: warm connections follow a DNS change); a literal address
        is its own answer.
        """
        conns = self.idle.get(self.key(up, tls))
        if not conns:
            return None
        now = time.monotonic()
        while conns:
            conn = conns.pop()  # most recently used first: warmest, least likely to be expired
            if (
                not conn.closed
                and not conn.eof
                and now - conn.idle_since < IDLE_EXPIRY_SECONDS
                and now - conn.born < MAX_AGE_SECONDS
                and (current is None or not conn.address or conn.address == up.host or current(up.host, conn.address))
            ):
                return conn
            conn.close()
        return None

    def put_idle(self, conn: UpstreamConnection) -> None:
        if conn.clean:
            self.park(conn)
        else:
            conn.close()

    def park(self, conn: UpstreamConnection) -> None:
        """Keep `conn`, known clean, for a later call (`put_idle` without the check)."""
        conns = self.idle.get(conn.key)
        if conns is None:
            conns = self.idle[conn.key] = collections.deque()
        if len(conns) >= MAX_IDLE_PER_HOST:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        conns.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        conns = self.idle.get(conn.key)
        if conns and conn in conns:
            conns.remove(conn)

    def close_idle(self) -> None:
        """Drop every idle connection (a new table may have moved planes or changed networks)."""
        self.close()

    def close(self) -> None:
        for conns in self.idle.values():
            for conn in list(conns):
                conn.close()
        self.idle.clear()
