"""OpenTelemetry tracing of calls (issue 13; the optional `[otel]` extra, `--otel`).

Per call a SERVER span named per the HTTP semantic conventions (`POST /{target}/predict`; a gRPC
call: `package.Service/Method`), whose parent is the client's W3C `traceparent` when it sent one;
per attempt on a plane a CLIENT span, child of the server span (a retry after a reset or a connect
failure is a second client span with `http.request.resend_count`). The plane receives a
`traceparent` naming the client span (and the client's `tracestate`), in place of the client's.

Sampling (`--otel-sample-ratio`): a client's traceparent is followed (sampled flag set: traced;
not set: not traced); a call without one is traced at the ratio. The decision is the gateway's, made
before anything of the SDK is touched: a call not traced costs one random draw, creates no span, and
its traceparent, if the client sent one, passes through unchanged as without tracing (SPEC §4).

A traced call's spans are written, not driven: the ids are drawn here (as the SDK's
`RandomIdGenerator` does), the W3C fields formatted here (`traceparent`, and the client's
`tracestate` as the SDK's propagator would re-emit it), the attributes kept in a plain dict, and at
each span's end one finished `ReadableSpan` is handed to the SDK's span processor, which batches
and exports it. (Measured, `benchmarks/calls_per_call.py --variant otel-all`: the SDK's tracer,
context and propagator cost ~430 Python calls on the loop per traced call, on top of its
exporter's; asking it for non-recording spans cost ~100 µs of CPU per call at 1 %.) Spans go to
the OTLP/HTTP exporter, which reads the standard `OTEL_EXPORTER_OTLP_*` variables (endpoint,
headers, timeout); `OTEL_SERVICE_NAME` names the service (default `gateway`). The SDK is imported
only here, and this module only when tracing is on: without `--otel` the gateway never imports
opentelemetry.
"""

from __future__ import annotations

import os
import random
import re
import time
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from gateway.calls.info import CallInfo

# W3C Trace Context §3.2: version-traceid-parentid-flags, lowercase hex; a version other than 00
# may append fields. An all-zero id is invalid (then the call starts a trace of its own).
TRACEPARENT = re.compile(r"[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?[ \t]*\Z")
SAMPLED = TraceFlags(TraceFlags.SAMPLED)
OK = Status(StatusCode.UNSET)
ERROR = Status(StatusCode.ERROR)
STANDARD_ROUTES = {"sync": "/{target}/sync/{path}"}  # http.route: low-cardinality templates (semconv)
REGIONAL_ROUTES = {"sync": "/sync/{path}"}


def route_template(info: CallInfo) -> str:
    route = info.route
    if route is None:
        return ""
    endpoint = route.endpoint
    if route.region is None:
        return STANDARD_ROUTES.get(endpoint) or f"/{{target}}/{endpoint}"
    return REGIONAL_ROUTES.get(endpoint) or f"/{endpoint}"


def parse_traceparent(value: str) -> tuple[int, int, int] | None:
    """(trace id, parent id, flags) of a valid W3C traceparent, else None."""
    m = TRACEPARENT.match(value)
    if m is None:
        return None
    version, trace_id, parent_id, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest) or int(trace_id, 16) == 0 or int(parent_id, 16) == 0:
        return None
    return int(trace_id, 16), int(parent_id, 16), int(flags, 16)


class Open:
    """A span in flight: what its `ReadableSpan` will hold."""

    __slots__ = ("name", "kind", "context", "parent", "attributes", "start")

    def __init__(
        self, name: str, kind: SpanKind, context: SpanContext, parent: SpanContext | None, attributes: dict,
        start: int,
    ) -> None:  # fmt: skip
        self.name, self.kind, self.context, self.parent = name, kind, context, parent
        self.attributes, self.start = attributes, start


class Tracing:
    """The span processor of one worker; `exporter` (tests: the SDK's in-memory one) is exported
    to synchronously, the OTLP exporter in batches from the SDK's thread."""

    def __init__(self, ratio: float, exporter: SpanExporter | None = None) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"--otel-sample-ratio must be between 0 and 1, not {ratio}")
        self.resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or "gateway"})
        self.scope = InstrumentationScope("gateway")
        self.ratio = ratio
        self.random = random.random
        self.bits = random.getrandbits
        self.processor: SpanProcessor
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            self.processor = BatchSpanProcessor(OTLPSpanExporter())
        else:
            self.processor = SimpleSpanProcessor(exporter)

    def close(self) -> None:
        self.processor.shutdown()  # exports what is batched

    def sampled(self, parent: str) -> bool:
        """Whether to trace a call whose client sent `parent`: its sampled flag when it is a valid
        traceparent, else a draw at the ratio."""
        if parent:
            fields = parse_traceparent(parent)
            if fields is not None:
                return bool(fields[2] & TraceFlags.SAMPLED)
        return self.random() < self.ratio  # none, or malformed (the propagator ignores it too)

    def server(self, info: CallInfo, labels: tuple, started_ns: int) -> None:
        if not info.traced:
            return  # no span; no attempt spans; the client's trace fields pass through
        fields = parse_traceparent(info.parent) if info.parent else None
        parent = None
        state = TraceState()
        if fields is not None:
            if info.parent_state:
                state = TraceState.from_header([info.parent_state])
            parent = SpanContext(fields[0], fields[1], True, TraceFlags(fields[2]), state)
        trace_id = fields[0] if fields is not None else self.bits(128) or 1
        model, environment, deployment, region = labels[:4]
        if info.protocol == "grpc":
            service, _, method = info.target.lstrip("/").partition("/")
            name = info.target.lstrip("/") or "grpc"
            attributes: dict[str, Any] = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
        else:
            template = route_template(info)
            name = f"{info.method} {template}" if template else info.method
            attributes = {"http.request.method": info.method, "url.path": info.target.partition("?")[0]}
            if template:
                attributes["http.route"] = template
        attributes.update({
            "server.address": info.host, "client.address": info.client, "baseten.request_id": info.request_id,
            "baseten.protocol": info.protocol,
        })  # fmt: skip
        if model:
            attributes.update({
                "baseten.model_id": model, "baseten.environment": environment, "baseten.deployment_id": deployment,
                "baseten.region": region, "baseten.side": info.side,
            })  # fmt: skip
        context = SpanContext(trace_id, self.bits(64) or 1, False, SAMPLED, state)
        info.span = Open(name, SpanKind.SERVER, context, parent, attributes, started_ns)

    def attempt(self, info: CallInfo) -> None:
        """A CLIENT span for the attempt on `info.upstream`; `info.trace` carries it to the plane."""
        server = info.span
        if server is None:
            return
        host, _, port = info.upstream.rpartition(":")
        attributes: dict[str, Any] = {"server.address": host or info.upstream, "baseten.attempt": info.attempts}
        if port.isdigit():
            attributes["server.port"] = int(port)
        if info.attempts > 1:
            attributes["http.request.resend_count"] = info.attempts - 1
        if info.protocol != "grpc":
            attributes["http.request.method"] = info.method
        up = server.context
        context = SpanContext(up.trace_id, self.bits(64) or 1, False, SAMPLED, up.trace_state)
        name = info.method if info.protocol != "grpc" else info.target.lstrip("/")
        info.attempt = Open(name, SpanKind.CLIENT, context, up, attributes, time.time_ns())
        trace = [(b"traceparent", b"00-%032x-%016x-01" % (context.trace_id, context.span_id))]
        if up.trace_state:
            trace.append((b"tracestate", up.trace_state.to_header().encode()))
        info.trace = tuple(trace)

    def attempt_ended(self, info: CallInfo, code: str, error_type: str | None, ended_ns: int | None = None) -> None:
        span, info.attempt = info.attempt, None
        if span is not None:
            self._end(span, info.protocol, code, error_type, ended_ns or time.time_ns(), client=True)

    def ended(self, info: CallInfo, code: str, error_type: str | None, ended_ns: int) -> None:
        self.attempt_ended(info, code, error_type, ended_ns)  # the same instant: the client span ends within
        span = info.span
        if span is not None:
            self._end(span, info.protocol, code, error_type, ended_ns, client=False)

    def _end(
        self, span: Open, protocol: str, code: str, error_type: str | None, ended_ns: int, *, client: bool
    ) -> None:
        status = _finish(span.attributes, protocol, code, error_type, client=client)
        self.processor.on_end(ReadableSpan(
            span.name, span.context, span.parent, self.resource, span.attributes, kind=span.kind, status=status,
            start_time=span.start, end_time=ended_ns, instrumentation_scope=self.scope,
        ))  # fmt: skip


def _finish(attributes: dict, protocol: str, code: str, error_type: str | None, *, client: bool) -> Status:
    """The status attributes and the status (semconv: a server span is an error from 500, a client span from 400)."""
    if protocol == "grpc":
        attributes["rpc.response.status_code"] = code
        failed = code not in ("OK", "CANCELLED") and not (client and code == "")
    else:
        status = int(code) if code.isdigit() else 0
        if status:
            attributes["http.response.status_code"] = status
        failed = status >= (400 if client else 500) or (status == 0 and error_type is not None)
    if error_type is not None:
        attributes["error.type"] = error_type
    return ERROR if failed or error_type is not None else OK
