"""The gRPC listener's ASGI app: route each call by its `:authority` and metadata, relay it to the plane.

Per call: the table is taken once (`state.table`), `resolve_grpc` decides, and the call is relayed
message by message in both directions, without the protobuf schema (SPEC §9). Request messages
are streamed to the plane as they arrive; response messages are written to the client as they
arrive. A call keeps its route and its channel to the end, whatever reloads happen meanwhile.
"""

from __future__ import annotations

import asyncio
import logging

from gateway.errors import GatewayError, ModelUnavailable, UpstreamTimeout
from gateway.grpc.framing import ACCEPT_ENCODING, CallHead, MessageReader, error_trailers, frame, read_head, trailers
from gateway.grpc.framing import metadata_headers as plane_headers
from gateway.grpc.upstream import Channels, PlaneCall
from gateway.http.proxy import new_request_id
from gateway.metrics import Metrics
from gateway.routing.resolve import Route, resolve_grpc
from gateway.state import TableState

log = logging.getLogger("gateway.grpc")

UNROUTED = ("", "", "", "", "grpc")
GRPC_HEADERS = [(b"content-type", b"application/grpc"), (b"grpc-accept-encoding", ACCEPT_ENCODING)]
# gRPC status names (grpc/status.h), for the `code` label of gateway_requests_total.
STATUS_NAMES = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
    "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
)  # fmt: skip
CANCELLED = 1


def status_name(code: int) -> str:
    return STATUS_NAMES[code] if 0 <= code < len(STATUS_NAMES) else str(code)


class GrpcRelay:
    """ASGI app: one call per `http` scope."""

    def __init__(self, state: TableState, metrics: Metrics, channels: Channels) -> None:
        self.state = state
        self.metrics = metrics
        self.channels = channels
        self.loop = asyncio.get_running_loop()

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] != "http":
            return
        started = self.loop.time()
        request_id = new_request_id()
        try:
            head = read_head(scope["raw_path"], scope["headers"], scope["method"])
            route = resolve_grpc(self.state.table, head.call)
        except GatewayError as error:
            await answer(send, error_trailers(error, request_id))
            self._observe(UNROUTED, error.grpc_status, started)
            return
        dep = route.deployment
        labels = (route.model.id, route.environment, dep.id, dep.region, "grpc")
        self.metrics.inflight.inc(labels)
        code = CANCELLED
        try:
            code = await RelayedCall(self, scope, receive, send, head, route, request_id, labels).run()
        finally:
            self.metrics.inflight.dec(labels)
            self._observe(labels, code, started)

    def _observe(self, labels: tuple, code: int, started: float) -> None:
        self.metrics.requests.inc(labels + (status_name(code),))
        self.metrics.duration.observe(labels, self.loop.time() - started)


async def answer(send, fields: list, started: bool = False) -> None:
    """End a call with trailers (after a response head, or with a head of its own)."""
    if not started:
        await send({"type": "http.response.start", "status": 200, "headers": GRPC_HEADERS, "trailers": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    await send({"type": "http.response.trailers", "headers": fields, "more_trailers": False})


class RelayedCall:
    """One call between a client stream and a plane call."""

    __slots__ = (
        "relay", "scope", "receive", "send", "head", "route", "request_id", "labels", "plane", "failure", "gone",
        "answered", "started",
    )  # fmt: skip

    def __init__(
        self, relay: GrpcRelay, scope: dict, receive, send, head: CallHead, route: Route, request_id: str, labels: tuple
    ) -> None:
        self.relay = relay
        self.scope = scope
        self.receive = receive
        self.send = send
        self.head = head
        self.route = route
        self.request_id = request_id
        self.labels = labels
        self.plane: PlaneCall | None = None
        self.failure: GatewayError | None = None  # a request stream the gateway refused mid-call
        self.gone = False  # the client went away
        self.answered = False
        self.started = False

    async def run(self) -> int:
        stream = self.scope["extensions"].get("gateway.stream") or {}
        closed: asyncio.Future | None = stream.get("closed")
        reader = MessageReader(self.head.encoding)
        pending: list[bytes] = []
        more_body = True
        if stream and stream["body_complete"]():
            # The whole request is here (unary and server-streaming calls, usually): read it now, and
            # when it is one message, send it with the call itself.
            event = await self.receive()
            if event["type"] == "http.disconnect":
                return CANCELLED
            more_body = event.get("more_body", False)
            try:
                pending = reader.feed(event.get("body", b""))
                if not more_body:
                    reader.end()
            except GatewayError as error:
                await answer(self.send, error_trailers(error, self.request_id))
                return error.grpc_status
        first = pending[0] if not more_body and len(pending) == 1 else None
        relay = self.relay
        channel = relay.channels.acquire(self.route.deployment.plane.grpc or "")
        pump: asyncio.Task | None = None
        try:
            plane = self.plane = PlaneCall(
                channel, self.route.upstream_target, self._metadata(), self._timeout(), self.head.encoding, first
            )
            if closed is not None:  # the client resetting the stream cancels the plane call, whatever is pending
                closed.add_done_callback(self._stream_closed)
            if first is None:  # the request goes on streaming, or came as several messages: relay it as it comes
                pump = relay.loop.create_task(self._pump(reader, pending, more_body, watch=closed is None))
            return await self._respond(plane)
        except GatewayError as error:
            if isinstance(error, ModelUnavailable | UpstreamTimeout):  # raised by PlaneCall.status()
                kind = "timeout" if isinstance(error, UpstreamTimeout) else "connect"
                relay.metrics.upstream_errors.inc(self.labels + (kind,))
            self.answered = True
            await answer(self.send, error_trailers(error, self.request_id), self.started)
            return error.grpc_status
        finally:
            if pump is not None and not pump.done():
                pump.cancel()
            relay.channels.release(channel)

    async def _respond(self, plane: PlaneCall) -> int:
        send = self.send
        metadata = await plane.initial_metadata()
        if self.gone:
            return CANCELLED
        if self.failure is None:
            await send(
                {"type": "http.response.start", "status": 200, "headers": GRPC_HEADERS + plane_headers(metadata),
                 "trailers": True}
            )  # fmt: skip
            self.started = True
            while (message := await plane.read()) is not None:
                await send({"type": "http.response.body", "body": frame(message), "more_body": True})
        if self.gone:
            return CANCELLED
        if self.failure is not None:
            raise self.failure
        code, details, trailing = await plane.status()
        self.answered = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        await send({"type": "http.response.trailers", "headers": trailers(code, details, trailing, self.request_id)})
        return code

    async def _pump(self, reader: MessageReader, pending: list[bytes], more_body: bool, watch: bool) -> None:
        """Client -> plane: messages as they complete, then half-close; refuse a malformed stream."""
        plane = self.plane
        if plane is None:
            return
        try:
            for message in pending:
                if not await plane.write(message):
                    return
            while more_body:
                event = await self.receive()
                if event["type"] == "http.disconnect":
                    self._client_gone()
                    return
                more_body = event.get("more_body", False)
                for message in reader.feed(event.get("body", b"")):
                    if not await plane.write(message):
                        return
            reader.end()
            await plane.done_writing()
        except GatewayError as error:
            self.failure = error
            plane.cancel()
            return
        # Without the server's `closed` future, a client that goes away is seen as http.disconnect.
        while watch:
            if (await self.receive())["type"] == "http.disconnect":
                self._client_gone()
                return

    def _stream_closed(self, _: asyncio.Future) -> None:
        self._client_gone()

    def _client_gone(self) -> None:
        if not self.answered:
            self.gone = True
            if self.plane is not None:
                self.plane.cancel()

    def _metadata(self) -> tuple:
        route = self.route
        scope = self.scope
        client = scope.get("client")
        return self.head.metadata + (
            ("x-baseten-model-id", route.model.id),
            ("x-baseten-environment", route.environment),
            ("x-baseten-deployment-id", route.deployment.id),
            ("x-baseten-request-id", self.request_id),
            ("x-forwarded-for", client[0] if client else ""),
            ("x-forwarded-proto", scope.get("scheme", "http")),
            ("x-forwarded-host", self.head.authority),
        )

    def _timeout(self) -> float:
        """The client's grpc-timeout, capped by the deployment's total call limit (SPEC §12 timeouts)."""
        total = self.route.deployment.timeouts.total_seconds
        return total if self.head.timeout is None else min(self.head.timeout, total)
