"""The gRPC listener's app: route each call by its `:authority` and metadata, relay its frames to the plane.

Per call: the table is taken once (`state.table`), `resolve_grpc` decides, and a stream is opened
to the plane. From then on the call only forwards: request DATA to the plane as it arrives, the
plane's response HEADERS, DATA and trailers back, unchanged but for the fields SPEC §4/§9 set or
drop, without decoding a message (no protobuf, no decompression). Data is acknowledged to its
sender only once the other side has taken it, so both directions keep HTTP/2 backpressure. A call
keeps its route and its plane connection to the end, whatever reloads happen meanwhile.
Everything runs in the HTTP/2 protocols' callbacks: no task per call.
"""

from __future__ import annotations

import asyncio
import logging

from gateway.calls.admission import RETRY_AFTER_FULL
from gateway.calls.holds import Released
from gateway.calls.info import CallInfo
from gateway.calls.pipeline import CallRecord, Go, Pipeline
from gateway.calls.ratelimit import Permit
from gateway.errors import GatewayError, MisdirectedRequest, RateLimited, UpstreamBroken, UpstreamTimeout
from gateway.grpc.framing import (
    CANCELLED,
    HTTP_STATUS,
    INTERNAL,
    RST_STATUS,
    UNKNOWN,
    CallHead,
    MessageScanner,
    error_trailers,
    format_timeout,
    grpc_status,
    read_head,
    response_fields,
    trailers,
)
from gateway.grpc.h2server import DISCARD, H2Connection, Handler, Headers, ServerStream
from gateway.grpc.hold import HeldCall
from gateway.grpc.upstream import PlaneAddress, PlaneConnection, Planes, PlaneStream
from gateway.headers import forwarded_value, misdirected
from gateway.http.proxy import TRACE_FIELDS, new_request_id
from gateway.metrics import Metrics
from gateway.routing.resolve import Route, resolve_grpc
from gateway.state import TableState

log = logging.getLogger("gateway.grpc")

UNROUTED = ("", "", "", "", "grpc")
ERROR_HEAD = [(b":status", b"200"), (b"content-type", b"application/grpc")]
# gRPC status names (grpc/status.h), for the `code` label of gateway_requests_total.
STATUS_NAMES = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
    "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
)  # fmt: skip


def status_name(code: int) -> str:
    return STATUS_NAMES[code] if 0 <= code < len(STATUS_NAMES) else str(code)


class GrpcRelay:
    """The app of the gRPC listener's HTTP/2 server: one `RelayedCall` per stream."""

    def __init__(self, state: TableState, metrics: Metrics, planes: Planes, pipeline: Pipeline) -> None:
        self.state = state
        self.metrics = metrics
        self.planes = planes
        self.pipeline = pipeline  # the worker's call pipeline, shared with HTTP (issue 10)
        self.loop = asyncio.get_running_loop()

    def open(self, stream: ServerStream, headers: Headers) -> Handler:
        started = self.loop.time()
        request_id = new_request_id()
        table = self.state.table
        head: CallHead | None = None
        try:
            head = read_head(headers)
            sni = stream.conn.sni
            if sni is not None and misdirected(sni, head.call.authority, table.domains):
                # RFC 9110 §15.5.20 (421), UNAVAILABLE in gRPC (SPEC §9): the client retries on a
                # connection of its own for that host instead of one coalesced for another.
                raise MisdirectedRequest(
                    f"this connection's TLS server name is another host ({sni[:100]}): "
                    f"open a connection for {head.authority[:100]}"
                )
            route = resolve_grpc(table, head.call)
            permit = self.pipeline.limit(route.api_key)  # the key's rate_limit, as for HTTP
        except GatewayError as error:
            stream.respond(ERROR_HEAD + error_trailers(error, request_id), end=True)
            self.observe(UNROUTED, error.grpc_status, started, stream, request_id, head)
            return DISCARD
        return self._dispatch(stream, head, route, request_id, started, None, permit)[1]

    def _dispatch(
        self, stream: ServerStream, head: CallHead, route: Route, request_id: str, started: float,
        held: HeldCall | None, permit: Permit,
    ) -> tuple[Released, Handler]:  # fmt: skip
        """Admit the call like any other (SPEC §6: backpressure, holds) and relay it, hold it or answer it.
        `permit` (the key's rate_limit slots) goes to the call's record or its hold, or is released here."""
        dep = route.deployment
        constants = self.pipeline.constants.of(route)  # once per call: the relayed call keeps its identity
        labels = constants.labels["grpc"]
        decision = self.pipeline.admit(route, released=held is not None, endpoint_needed=False)
        if isinstance(decision, GatewayError):
            permit.release()
            stream.respond(ERROR_HEAD + error_trailers(decision, request_id), end=True)
            self.observe(labels, decision.grpc_status, started, stream, request_id, head, route)
            return "answered", DISCARD
        if not isinstance(decision, Go):
            if held is None:
                held = HeldCall(self, stream, head, route, request_id, started,
                                self.state.table.gateway.hold_timeout_seconds)  # fmt: skip
            held.labels = labels
            held.permit = permit  # released when the held call ends (HeldCall._end)
            if not self.pipeline.hold(held, route, labels, decision, held.deadline):
                self.pipeline.holds.finish(held)
                held.answer(RateLimited(
                    f"too many calls are waiting for deployment '{dep.id}'; retry later",
                    headers=(("retry-after", RETRY_AFTER_FULL),),
                ))  # fmt: skip
                return "answered", DISCARD
            return "held", held
        info = self._info(stream, request_id, head, route) if self.pipeline.observer is not None else None
        record = self.pipeline.begin(
            labels, decision, started, info, permit=permit, attempt=False
        )  # the plane's gRPC address
        return "sent", RelayedCall(self, stream, head, route, request_id, started, record, constants.grpc_identity)

    def release_held(self, held: HeldCall) -> Released:
        """A held call goes on: resolved again against the serving table, replaying what it kept."""
        try:
            route = resolve_grpc(self.state.table, held.head.call)
        except GatewayError as error:
            held.answer(error)
            return "answered"
        outcome, handler = self._dispatch(
            held.stream, held.head, route, held.request_id, held.started, held, held.permit
        )
        if outcome == "sent":
            held.stream.handler = handler
            data, ended = held.take_data()
            for chunk, flow in data:
                handler.client_data(chunk, flow)
            if ended:
                handler.client_end()
        return outcome

    def held_dropped(self, held: HeldCall) -> None:
        self.pipeline.holds.drop(held)

    def observe(
        self, labels: tuple, code: int, started: float, stream: ServerStream, request_id: str,
        head: CallHead | None, route: Route | None = None,
    ) -> None:  # fmt: skip
        """Count a call the pipeline never admitted (refused, answered from the hold)."""
        info = self._info(stream, request_id, head, route) if self.pipeline.observer is not None else None
        self.pipeline.unadmitted(labels, status_name(code), started, info)

    def _info(
        self, stream: ServerStream, request_id: str, head: CallHead | None, route: Route | None
    ) -> CallInfo | None:  # fmt: skip
        """What the access log and tracing record of a gRPC call (an observer is on); None when
        neither wants it (tracing only, and the call is not traced)."""
        fields = dict(head.metadata + head.transport) if head is not None else {}
        text = lambda name: fields.get(name, b"").decode("latin-1")
        traced = self.pipeline.observer.wanted(text(b"traceparent"))  # type: ignore[union-attr]
        if traced is None:
            return None
        client = stream.client
        return CallInfo(
            request_id, client[0] if client else "", head.authority if head else "", "POST",
            head.path.decode("latin-1") if head else "", "grpc", route, text(b"user-agent"), "",
            text(b"traceparent"), text(b"tracestate"), traced,
        )  # fmt: skip


FORWARDING_KEPT = 16  # authorities per client connection whose forwarding fields are kept
FORWARDING_AUTHORITY_MAX = 256  # longer ones are built per call


def forwarding(conn: H2Connection, authority: str) -> tuple[tuple[bytes, bytes], ...]:
    """X-Forwarded-For/-Proto/-Host and Forwarded (RFC 7239) for a call of `conn` to `authority`.

    The client's address and scheme are the connection's, and a channel calls one authority: built
    once per connection and authority rather than per call (two regex matches, five encodes).
    """
    kept = conn.forwarding
    fields = kept.get(authority)
    if fields is None:
        client = conn.client
        peer = client[0] if client else ""
        fields = (
            (b"x-forwarded-for", peer.encode()),
            (b"x-forwarded-proto", conn.scheme.encode()),
            (b"x-forwarded-host", authority.encode()),
            (b"forwarded", forwarded_value(peer, authority, conn.scheme)),  # RFC 7239, replacing the client's
        )
        if len(authority) <= FORWARDING_AUTHORITY_MAX:
            if len(kept) >= FORWARDING_KEPT:
                kept.clear()
            kept[authority] = fields
    return fields


class RelayedCall:
    """One call: the handler of its client stream (client_*) and of its plane stream (plane_*)."""

    __slots__ = (
        "relay", "stream", "head", "route", "request_id", "labels", "started", "timeout", "timer", "group",
        "plane", "scanner", "early", "early_flow", "client_ended", "up_owed", "down_owed", "responded", "done",
        "record", "error", "identity",
    )  # fmt: skip

    def __init__(
        self, relay: GrpcRelay, stream: ServerStream, head: CallHead, route: Route, request_id: str, started: float,
        record: CallRecord, identity: tuple[tuple[bytes, bytes], ...],
    ) -> None:  # fmt: skip
        self.relay = relay
        self.identity = identity  # x-baseten-model-id, -environment, -deployment-id (SPEC §4, §9)
        self.stream = stream
        self.head = head
        self.route = route
        self.request_id = request_id
        self.started = started
        dep = route.deployment
        self.labels = record.labels
        self.plane: PlaneStream | None = None
        self.scanner = MessageScanner(head.encoding)
        self.early: list[bytes] = []  # request data that came before the plane stream was open
        self.early_flow = 0
        self.client_ended = False
        self.up_owed = 0  # request bytes given to the plane stream but not yet written: not yet acknowledged
        self.down_owed = 0  # response bytes given to the client stream but not yet written
        self.responded = False  # response HEADERS sent to the client
        self.done = False
        self.record = record  # in-flight, metrics and the freed slot: the pipeline's accounting
        self.error: GatewayError | None = None  # the gateway's reason for ending the call, if any
        # The client's grpc-timeout, capped by the deployment's total call limit (SPEC §12 timeouts).
        total = dep.timeouts.total_seconds
        self.timeout = total if head.timeout is None else min(head.timeout, total)
        self.timer: asyncio.TimerHandle | None = relay.loop.call_at(started + self.timeout, self._deadline)
        table = relay.state.table
        self.group: PlaneAddress = relay.planes.acquire(dep.plane.grpc or "", table.regions[dep.plane.region])
        record.attempt_to(self.group.address)
        self.group.connect(self, dep.timeouts.connect_seconds)

    def __repr__(self) -> str:
        return f"<RelayedCall {self.head.call.method} {self.request_id}{' done' if self.done else ''} {self.plane}>"

    # -- the plane connection

    def plane_connected(self, conn: PlaneConnection) -> None:
        if self.done:
            return
        try:
            plane = self.plane = conn.open_stream(self._plane_headers(), self, False)
        except Exception as exc:  # h2 refused the stream (the connection just failed)
            log.warning("gRPC plane %s refused a new stream: %r", self.group.address, exc)
            self.plane_failed(UpstreamBroken(f"could not open a stream to the plane: {exc}"))
            return
        if self.early:
            early, self.early = self.early, []
            for data in early:
                plane.send_data(data)
            if self.client_ended:
                plane.end()
            if plane.blocked:
                self.up_owed += self.early_flow
            else:
                self.stream.ack(self.early_flow)
        elif self.client_ended:
            plane.end()

    def _plane_headers(self) -> Headers:
        head = self.head
        metadata, info = head.metadata, self.record.info
        if info is not None and info.trace:  # tracing: the gateway's traceparent replaces the client's (issue 13)
            metadata = tuple(f for f in metadata if f[0] not in TRACE_FIELDS) + info.trace
        return [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", head.path),
            (b":authority", self.group.authority),
            (b"te", b"trailers"),
            (b"grpc-timeout", format_timeout(self.timeout - (self.relay.loop.time() - self.started))),
            *head.transport,
            *metadata,
            *self.identity,
            (b"x-baseten-request-id", self.request_id.encode()),
            *forwarding(self.stream.conn, head.authority),
        ]

    # -- client -> plane

    def client_data(self, data: bytes, flow: int) -> None:
        if self.done:
            self.stream.ack(flow)
            return
        try:
            self.scanner.scan(data)
        except GatewayError as error:
            self.fail(error)
            return
        if self.record.info is not None:
            self.record.info.bytes_in += len(data)
        plane = self.plane
        if plane is None:
            self.early.append(data)
            self.early_flow += flow
        elif plane.send_data(data):
            self.stream.ack(flow)
        else:
            self.up_owed += flow

    def client_end(self) -> None:
        if self.done:
            return
        try:
            self.scanner.end()
        except GatewayError as error:
            self.fail(error)
            return
        self.client_ended = True
        if self.plane is not None:
            self.plane.end()

    def plane_drained(self) -> None:
        if self.up_owed:
            owed, self.up_owed = self.up_owed, 0
            self.stream.ack(owed)

    def client_reset(self) -> None:
        self._finish(CANCELLED)  # the plane stream is reset with CANCEL: the plane sees the call cancelled

    # -- plane -> client

    def plane_headers(self, headers: Headers, end: bool) -> None:
        if self.done:
            return
        status, fields = response_fields(headers, self.request_id.encode() if end else None)
        if self.record.info is not None:
            self.record.info.first_byte = self.relay.loop.time()
        if status != b"200":
            code = HTTP_STATUS.get(int(status) if status.isdigit() else 0, UNKNOWN)
            self._answer(code, f"the plane answered HTTP status {status.decode('latin-1')[:3]}")
            return
        # The deployment that answered (SPEC §6: canary and promotion callers see their side).
        self.stream.respond([(b":status", status), *fields, self.identity[2]], end)
        if end:  # trailers-only: the whole answer
            self._finish(grpc_status(fields))
        else:
            self.responded = True

    def plane_data(self, data: bytes, flow: int) -> None:
        if self.record.info is not None:
            self.record.info.bytes_out += len(data)
        if self.done or self.stream.send_data(data):
            if self.plane is not None:
                self.plane.ack(flow)
        else:
            self.down_owed += flow

    def client_drained(self) -> None:
        if self.down_owed and self.plane is not None:
            owed, self.down_owed = self.down_owed, 0
            self.plane.ack(owed)

    def plane_trailers(self, headers: Headers | None) -> None:
        if self.done:
            return
        if headers is None:
            self._answer(INTERNAL, "the plane ended the response without a gRPC status")
            return
        _, fields = response_fields(headers, self.request_id.encode())
        self.stream.send_trailers(list(fields))
        self._finish(grpc_status(fields))

    def plane_reset(self, code: int) -> None:
        if not self.done:
            self._answer(RST_STATUS.get(code, INTERNAL), f"the plane reset the stream (HTTP/2 error code {code})")

    def plane_failed(self, error: GatewayError) -> None:
        if self.done:
            return
        self.error = error
        self.fail(error)

    # -- the end

    def _deadline(self) -> None:
        self.timer = None
        if not self.done:
            self.error = UpstreamTimeout(f"the call did not finish within its deadline ({self.timeout:g} s)")
            self.fail(self.error)

    def fail(self, error: GatewayError) -> None:
        """Answer the client with the gateway's error; the plane stream, if any, is cancelled."""
        self._answer(error.grpc_status, error.message)

    def _answer(self, code: int, message: str) -> None:
        fields = trailers(code, message, self.request_id)
        if self.responded:
            self.stream.send_trailers(fields)
        else:
            self.stream.respond(ERROR_HEAD + fields, end=True)
        self._finish(code)

    def _finish(self, code: int) -> None:
        if self.done:
            return
        self.done = True
        if self.plane is not None:
            self.plane.cancel()  # a no-op once the plane stream is over
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.early = []
        relay = self.relay
        relay.planes.release(self.group)
        # gRPC goes to the plane's gRPC address, not the replica it was counted on: no verdict on it.
        self.record.end(status_name(code), error=self.error, judge=False)
