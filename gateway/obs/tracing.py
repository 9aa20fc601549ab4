"""OpenTelemetry tracing of calls (issue 13; the optional `[otel]` extra, `--otel`).

Per call a SERVER span named per the HTTP semantic conventions (`POST /{target}/predict`; a gRPC
call: `package.Service/Method`), whose parent is the client's W3C `traceparent` when it sent one;
per attempt on a plane a CLIENT span, child of the server span (a retry after a reset or a connect
failure is a second client span with `http.request.resend_count`). The plane receives a
`traceparent` naming the client span (and the client's `tracestate`), in place of the client's.

Sampling (`--otel-sample-ratio`): a client's traceparent is followed (sampled flag set: traced;
not set: not traced); a call without one is traced at the ratio. The decision is the gateway's, made
before the SDK is called: a call not traced costs one random draw, creates no span, and its
traceparent, if the client sent one, passes through unchanged as without tracing (SPEC §4); the
SDK's sampler is then `ParentBased(ALWAYS_ON)` for the calls decided traced. (Measured: asking the
SDK for non-recording spans cost ~100 µs of CPU per call at 1 %, `benchmarks/run_obs.py`.) Spans go to the OTLP/HTTP exporter, which reads
the standard `OTEL_EXPORTER_OTLP_*` variables (endpoint, headers, timeout); `OTEL_SERVICE_NAME`
names the service (default `gateway`). The SDK is imported only here, and this module only when
tracing is on: without `--otel` the gateway never imports opentelemetry.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.calls.info import CallInfo

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


class Tracing:
    """The tracer and propagator of one worker; `exporter` (tests: the SDK's in-memory one) is
    exported to synchronously, the OTLP exporter in batches from the SDK's thread."""

    def __init__(self, ratio: float, exporter: SpanExporter | None = None) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"--otel-sample-ratio must be between 0 and 1, not {ratio}")
        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or "gateway"})
        self.ratio = ratio
        self.random = random.random
        self.provider = TracerProvider(sampler=ParentBased(ALWAYS_ON), resource=resource)
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        else:
            self.provider.add_span_processor(SimpleSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("gateway")
        self.propagator = TraceContextTextMapPropagator()

    def close(self) -> None:
        self.provider.shutdown()  # exports what is batched

    def sampled(self, parent: str) -> bool:
        """Whether to trace a call whose client sent `parent`: its sampled flag when it is a valid
        traceparent (W3C: `00-<32 hex>-<16 hex>-<2 hex flags>`), else a draw at the ratio."""
        if len(parent) >= 55 and parent[2] == "-" and parent[35] == "-" and parent[52] == "-":
            flags = parent[53:55]
            if all(c in "0123456789abcdef" for c in flags):
                return bool(int(flags, 16) & 1)
        return self.random() < self.ratio  # none, or malformed (the propagator ignores it too)

    def server(self, info: CallInfo, labels: tuple, started_ns: int) -> None:
        if not info.traced:
            return  # no span; no attempt spans; the client's trace fields pass through
        carrier = {}
        if info.parent:
            carrier["traceparent"] = info.parent
            if info.parent_state:
                carrier["tracestate"] = info.parent_state
        parent = self.propagator.extract(carrier) if carrier else None
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
        info.span = self.tracer.start_span(
            name, context=parent, kind=SpanKind.SERVER, attributes=attributes, start_time=started_ns
        )

    def attempt(self, info: CallInfo) -> None:
        """A CLIENT span for the attempt on `info.upstream`; `info.trace` carries it to the plane."""
        if info.span is None:
            return
        context = trace.set_span_in_context(info.span)
        host, _, port = info.upstream.rpartition(":")
        attributes: dict[str, Any] = {"server.address": host or info.upstream, "baseten.attempt": info.attempts}
        if port.isdigit():
            attributes["server.port"] = int(port)
        if info.attempts > 1:
            attributes["http.request.resend_count"] = info.attempts - 1
        if info.protocol != "grpc":
            attributes["http.request.method"] = info.method
        span = info.attempt = self.tracer.start_span(
            info.method if info.protocol != "grpc" else info.target.lstrip("/"), context=context,
            kind=SpanKind.CLIENT, attributes=attributes,
        )  # fmt: skip
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier, context=trace.set_span_in_context(span))
        info.trace = tuple((k.encode(), v.encode()) for k, v in carrier.items())

    def attempt_ended(self, info: CallInfo, code: str, error_type: str | None, ended_ns: int | None = None) -> None:
        span, info.attempt = info.attempt, None
        if span is None:
            return
        _finish(span, info.protocol, code, error_type, client=True)
        span.end(end_time=ended_ns)

    def ended(self, info: CallInfo, code: str, error_type: str | None, ended_ns: int) -> None:
        self.attempt_ended(info, code, error_type, ended_ns)  # the same instant: the client span ends within
        span = info.span
        if span is not None:
            _finish(span, info.protocol, code, error_type, client=False)
            span.end(end_time=ended_ns)


def _finish(span: Any, protocol: str, code: str, error_type: str | None, *, client: bool) -> None:
    """The status attributes (semconv: a server span is an error from 500, a client span from 400)."""
    if protocol == "grpc":
        span.set_attribute("rpc.response.status_code", code)
        failed = code not in ("OK", "CANCELLED") and not (client and code == "")
    else:
        status = int(code) if code.isdigit() else 0
        if status:
            span.set_attribute("http.response.status_code", status)
        failed = status >= (400 if client else 500) or (status == 0 and error_type is not None)
    if error_type is not None:
        span.set_attribute("error.type", error_type)
    if failed or error_type is not None:
        span.set_status(Status(StatusCode.ERROR))


def now_ns() -> int:
    return time.time_ns()
