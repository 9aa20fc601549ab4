"""The one place that opens connections to planes (SPEC §8, issue 10).

Every protocol comes here: HTTP and WebSocket calls, gRPC, shadow copies, wakes, health probes
and smoke calls. A connection is opened only after:

1. the plane host is resolved by the table's resolver (`gateway.dns.nameservers`), never the
   system's `getaddrinfo` (an IP literal is its own answer);
2. every resolved address lies inside the region's `networks` (one outside address fails the
   plane closed, `Resolver.resolve_in_region`);
3. then TCP (and TLS, verifying the plane's own host name whatever address it was reached at)
   is opened to one of those addresses, the first two tried in turn.

OSError, SSLError and connect timeouts become `ConnectFailed` (503, blame "upstream", kind
"connect") here and nowhere else. `still_current` tells a pool whether a connection's address is
still in its host's answer, so a DNS change retires warm connections (issue 10).

Async webhooks (SPEC §10) reach hosts outside every plane; they come here too, through
`open_checked`: their caller's address rule in place of a region's networks, then `open` itself.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any, cast

from gateway.dns import Resolver
from gateway.errors import ConnectFailed, GatewayError
from gateway.metrics import Metrics
from gateway.routing.model import Plane, Region, Table

MAX_ADDRESSES_TRIED = 2  # of a host's resolved addresses, per connection attempt
STREAM_LIMIT = 64 * 1024  # asyncio's default StreamReader buffer limit


class Connector:
    """Region-checked connections for one worker; follows the table's resolver settings across swaps."""

    def __init__(
        self, nameservers: tuple[str, ...] = (), metrics: Metrics | None = None, *, resolver: Resolver | None = None
    ) -> None:  # fmt: skip
        self.metrics = metrics
        self.nameservers = nameservers
        self.resolver = resolver or Resolver(nameservers, metrics=metrics)
        self.ssl_contexts: dict[str, ssl.SSLContext] = {}
        self.opened = 0

    def __repr__(self) -> str:
        return f"<Connector {self.opened} opened | {self.resolver!r}>"

    def table_swapped(self, table: Table) -> None:
        self.ssl_contexts = {}  # a plane's CA or client certificate may have changed
        if table.gateway.dns_nameservers != self.nameservers:
            self.resolver.close()
            self.nameservers = table.gateway.dns_nameservers
            self.resolver = Resolver(self.nameservers, metrics=self.metrics)

    def close(self) -> None:
        self.resolver.close()

    def ssl_for(self, plane: Plane) -> ssl.SSLContext:
        """The client TLS context for an https plane: its CA, and its client certificate (mTLS)."""
        ctx = self.ssl_contexts.get(plane.name)
        if ctx is None:
            tls = plane.tls
            ctx = ssl.create_default_context(cafile=tls.ca if tls else None)
            if tls and tls.cert:
                ctx.load_cert_chain(tls.cert, tls.key)
            self.ssl_contexts[plane.name] = ctx
        return ctx

    async def addresses(self, host: str, region: Region) -> tuple[str, ...]:
        """Every address of `host`, all inside `region`'s networks, or ModelUnavailable (fail closed)."""
        return await self.resolver.resolve_in_region(host, region.name, region.networks)

    def still_current(self, host: str, address: str) -> bool:
        """False once `address` left `host`'s answer (a connection to it takes no new call)."""
        answer = self.resolver.peek(host)
        return answer is None or address in answer

    async def open(
        self, host: str, port: int, region: Region, factory: Callable[[], asyncio.BaseProtocol], *, timeout: float,
        tls: ssl.SSLContext | None = None,
    ) -> tuple[asyncio.BaseTransport, Any, str]:  # fmt: skip
        """A new connection to `host:port` in `region`: (transport, protocol, the address it went to)."""
        addresses = await self.addresses(host, region)
        loop = asyncio.get_running_loop()
        error: GatewayError | None = None
        for address in addresses[:MAX_ADDRESSES_TRIED]:
            try:
                async with asyncio.timeout(timeout):
                    transport, protocol = await loop.create_connection(
                        factory, address, port, ssl=tls, server_hostname=host if tls is not None else None
                    )
            except TimeoutError:
                error = ConnectFailed(f"could not connect to the plane within {timeout:g} s")
                continue
            except (OSError, ssl.SSLError) as exc:
                error = ConnectFailed(f"could not connect to the plane: {getattr(exc, 'strerror', None) or exc}")
                continue
            self.opened += 1
            return transport, protocol, address
        raise error or ConnectFailed(f"no address to connect to for {host!r}")

    async def open_checked(
        self, host: str, port: int, check: Callable[[tuple[str, ...]], None],
        factory: Callable[[], asyncio.BaseProtocol], *, timeout: float, tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> tuple[asyncio.BaseTransport, Any, str]:  # fmt: skip
        """`open` for a host outside every plane (async webhooks, SPEC §10): the caller's rule, not a region's.

        `host` is resolved by the table's resolver (NoAddress when it does not resolve); `check` sees the
        whole answer and raises a GatewayError to refuse it: one refused address refuses the host (fail
        closed, as `resolve_in_region`) and nothing is dialled. Each checked address is then dialled by
        `open` as an IP literal (no second DNS answer that could differ from the checked one); with
        `tls`, TLS is started over that connection verifying `server_hostname` (default `host`), and the
        returned transport is the TLS one: write through it (the protocol's `connection_made` saw the
        TCP transport). Returns (transport, protocol, address); failures are ConnectFailed.
        """
        addresses = await self.resolver.resolve(host)
        check(addresses)
        loop = asyncio.get_running_loop()
        error: ConnectFailed | None = None
        for address in addresses[:MAX_ADDRESSES_TRIED]:
            where = repr(host) if host == address else f"{host!r} at {address}"
            try:
                transport, protocol, _ = await self.open(address, port, Region(host, ()), factory, timeout=timeout)
            except ConnectFailed as failed:
                error = ConnectFailed(failed.message.replace("the plane", where))
                continue
            if tls is None:
                return transport, protocol, address
            tcp = cast(asyncio.Transport, transport)  # what create_connection gives
            try:
                async with asyncio.timeout(timeout):
                    secured = await loop.start_tls(tcp, protocol, tls, server_hostname=server_hostname or host)
            except TimeoutError:
                error = ConnectFailed(f"no TLS handshake with {where} within {timeout:g} s")
            except (OSError, ssl.SSLError) as exc:  # start_tls closed the connection
                error = ConnectFailed(f"TLS with {where} failed: {getattr(exc, 'verify_message', None) or exc}")
            else:
                if secured is not None:
                    return secured, protocol, address
                error = ConnectFailed(f"TLS with {where} failed: the connection closed")
            tcp.abort()
        raise error or ConnectFailed(f"no address to connect to for {host!r}")

    async def open_stream(
        self, host: str, port: int, region: Region, *, timeout: float, tls: ssl.SSLContext | None = None,
        limit: int = STREAM_LIMIT,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:  # fmt: skip
        """`open` as asyncio streams, for the short exchanges of probes, wakes and smoke calls."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        transport, protocol, _ = await self.open(
            host, port, region, lambda: asyncio.StreamReaderProtocol(reader, loop=loop), timeout=timeout, tls=tls
        )
        return reader, asyncio.StreamWriter(transport, protocol, reader, loop)  # type: ignore[arg-type]
