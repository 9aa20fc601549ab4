"""One-off calls from the admin side to a plane: a promotion's wake and smoke-check requests.

Not the hot path (that is `gateway.http` with its pool): one connection per call, closed after
it. The address goes through the same in-region resolution as every call (SPEC §8), so a
promotion's requests never leave the deployment's region either.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import NamedTuple

import httptools

from gateway.errors import GatewayError, UpstreamBroken, UpstreamTimeout
from gateway.http.proxy import new_request_id
from gateway.metrics import Metrics
from gateway.routing.model import Deployment, Table, Upstream
from gateway.upstream.connect import Connector

MAX_ANSWER_BYTES = 1024 * 1024  # kept of an answer's body (for the error message); the rest is read and dropped


class Answer(NamedTuple):
    status: int
    body: bytes
    request_id: str
    truncated: bool = False  # the body passed `max_answer_bytes`: `body` is its first part


class PlaneCaller:
    """Makes single HTTP/1.1 calls to a deployment through a region-checked connector that follows
    the table's nameservers (`gateway.upstream.connect`, the one place plane connections open)."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics
        self.connector: Connector | None = None

    def close(self) -> None:
        if self.connector is not None:
            self.connector.close()
            self.connector = None

    def _connector(self, table: Table) -> Connector:
        if self.connector is None:
            self.connector = Connector(table.gateway.dns_nameservers, self.metrics)
        else:
            self.connector.table_swapped(table)  # a no-op unless the nameservers changed
        return self.connector

    async def call(
        self,
        table: Table,
        dep: Deployment,
        environment: str,
        method: str,
        path: str,
        body: bytes = b"",
        *,
        to_plane: bool = False,
        timeout: float = 30.0,
        request_id: str | None = None,
        upstream: Upstream | None = None,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
        extra: bytes = b"",
    ) -> Answer:
        """`method path` on the deployment (`upstream`, else its first replica, or its plane's url
        with `to_plane`).

        Carries the identity headers of SPEC §4, and `extra` header lines (a traced run's traceparent). Raises a GatewayError when the plane cannot be
        reached, breaks the call or does not answer within `timeout`.
        """
        up: Upstream = upstream or (dep.plane.url if to_plane or not dep.endpoints else dep.endpoints[0])
        region = table.regions[dep.plane.region]
        request_id = request_id or new_request_id()
        head = (
            (
                f"{method} {path} HTTP/1.1\r\nhost: {up.authority}\r\nx-baseten-model-id: {dep.model_id}\r\n"
                f"x-baseten-environment: {environment}\r\nx-baseten-deployment-id: {dep.id}\r\n"
                f"x-baseten-request-id: {request_id}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n"
            ).encode()
            + extra
            + b"\r\n"
        )
        try:
            async with asyncio.timeout(timeout):
                connector = self._connector(table)
                ctx = connector.ssl_for(dep.plane) if up.scheme == "https" else None
                reader, writer = await connector.open_stream(up.host, up.port, region, timeout=timeout, tls=ctx)
                try:
                    writer.write(head + body)
                    status, answer, truncated = await _read_answer(reader, max_answer_bytes)
                finally:
                    writer.close()
                    with contextlib.suppress(Exception):
                        await writer.wait_closed()
        except TimeoutError:
            raise UpstreamTimeout(f"{up.authority} did not answer {method} {path} within {timeout:g}s") from None
        return Answer(status, answer, request_id, truncated)


class _Response:
    def __init__(self, limit: int) -> None:
        self.body = bytearray()
        self.limit = limit
        self.truncated = False
        self.complete = False

    def on_body(self, data: bytes) -> None:
        room = self.limit - len(self.body)
        if len(data) > room:
            self.truncated = True
        if room > 0:
            self.body += data[:room]

    def on_message_complete(self) -> None:
        self.complete = True


async def _read_answer(reader: asyncio.StreamReader, limit: int) -> tuple[int, bytes, bool]:
    response = _Response(limit)
    parser = httptools.HttpResponseParser(response)
    try:
        while not response.complete:
            data = await reader.read(65536)
            if not data:
                parser.feed_data(b"")  # EOF ends a body without a length; otherwise it's a broken answer
                if not response.complete:
                    raise UpstreamBroken("the plane closed the connection before answering completely")
                break
            parser.feed_data(data)
    except httptools.HttpParserError as exc:
        raise UpstreamBroken(f"the plane broke the HTTP protocol: {exc}") from None
    except (OSError, ssl.SSLError) as exc:
        raise UpstreamBroken(f"the connection to the plane failed: {exc}") from None
    except GatewayError:
        raise
    return parser.get_status_code(), bytes(response.body), response.truncated
