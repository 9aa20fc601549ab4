"""One exception tree for every error the gateway itself produces.

Each class carries what every protocol needs to answer it: the HTTP status and
`error_code` of the JSON error body (SPEC "Error body"), the gRPC status code
(SPEC §9) and the WebSocket close code, so one renderer serves all protocols.

Each also carries what the call pipeline does with it (issue 10), the same for every protocol:
- `blame`: whose fault the call's failure was. Only "upstream" counts towards a replica's
  ejection and towards `gateway_upstream_errors_total`; "client" (a 413, a bad request, a client
  that went away) and "gateway" (a decision: inactive, no replica, outside the region) never do.
- `kind`: for upstream errors, what went wrong with the plane: "connect" (nothing was sent),
  "broken" (the connection or the protocol broke), "timeout"; the `kind` label of that metric.
"""

from __future__ import annotations

import json
from typing import Literal

Blame = Literal["client", "upstream", "gateway"]
UpstreamKind = Literal["connect", "broken", "timeout"]

# gRPC status codes (grpc/status.h), kept numeric so nothing here imports grpc.
GRPC_INVALID_ARGUMENT = 3
GRPC_DEADLINE_EXCEEDED = 4
GRPC_NOT_FOUND = 5
GRPC_PERMISSION_DENIED = 7
GRPC_RESOURCE_EXHAUSTED = 8
GRPC_UNIMPLEMENTED = 12
GRPC_INTERNAL = 13
GRPC_UNAVAILABLE = 14
GRPC_UNAUTHENTICATED = 16


class GatewayError(Exception):
    """An error answered by the gateway itself (never by a plane)."""

    status = 500
    error_code = "internal_error"
    grpc_status = GRPC_INTERNAL
    ws_close_code = 1011
    blame: Blame = "gateway"
    kind: UpstreamKind | None = None

    def __init__(self, message: str, *, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers

    def body(self) -> bytes:
        return json.dumps({"error": self.message, "error_code": self.error_code}).encode()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status} {self.error_code}: {self.message!r})"


class ClientError(GatewayError):
    status = 400
    error_code = "client_error"
    grpc_status = GRPC_INVALID_ARGUMENT
    ws_close_code = 1008
    blame: Blame = "client"


class EndpointNotFound(ClientError):
    status = 404
    grpc_status = GRPC_NOT_FOUND


class MethodNotAllowed(ClientError):
    status = 405
    grpc_status = GRPC_UNIMPLEMENTED

    def __init__(self, message: str, allow: tuple[str, ...]) -> None:
        super().__init__(message, headers=(("allow", ", ".join(allow)),))
        self.allow = allow


class Conflict(ClientError):
    """The admin call conflicts with the current state (an environment that exists, a running promotion)."""

    status = 409


class InvalidChange(ClientError):
    """An admin change the routing table's rules refuse; every problem is listed, by its path."""

    def __init__(self, message: str, problems: list[str]) -> None:
        super().__init__(message)
        self.problems = problems

    def body(self) -> bytes:
        return json.dumps({"error": self.message, "error_code": self.error_code, "problems": self.problems}).encode()


class UpgradeRequired(ClientError):
    """A plain request on the websocket endpoint (RFC 9110 §15.5.22)."""

    status = 426

    def __init__(self, message: str) -> None:
        super().__init__(message, headers=(("upgrade", "websocket"), ("connection", "upgrade")))


class MisdirectedRequest(ClientError):
    """A regional host of a region this gateway does not serve (SPEC §8), or a request whose host is
    not the one its TLS connection was opened for (RFC 9110 §15.5.20)."""

    status = 421
    grpc_status = GRPC_UNAVAILABLE


class NotImplementedYet(ClientError):
    status = 501
    grpc_status = GRPC_UNIMPLEMENTED


class UnsupportedTransferCoding(NotImplementedYet):
    """A request transfer coding other than chunked (RFC 9112 §6.1: 501)."""


class Unauthorized(GatewayError):
    status = 401
    error_code = "unauthorized"
    grpc_status = GRPC_UNAUTHENTICATED
    blame: Blame = "client"
    ws_close_code = 1008


class Forbidden(GatewayError):
    status = 403
    error_code = "unauthorized"
    grpc_status = GRPC_PERMISSION_DENIED
    blame: Blame = "client"
    ws_close_code = 1008


class ModelNotFound(GatewayError):
    status = 404
    error_code = "model_does_not_exist"
    grpc_status = GRPC_NOT_FOUND
    blame: Blame = "client"
    ws_close_code = 1008


class PayloadTooLarge(GatewayError):
    status = 413
    error_code = "payload_too_large"
    grpc_status = GRPC_RESOURCE_EXHAUSTED
    blame: Blame = "client"
    ws_close_code = 1009


class RateLimited(GatewayError):
    status = 429
    error_code = "rate_limited"
    grpc_status = GRPC_RESOURCE_EXHAUSTED
    ws_close_code = 1013


class ModelUnavailable(GatewayError):
    """The plane cannot be reached (503) or nothing may serve the call."""

    status = 503
    error_code = "model_unavailable"
    grpc_status = GRPC_UNAVAILABLE
    ws_close_code = 1013


class ConnectFailed(ModelUnavailable):
    """No connection to the plane could be opened (its host did not resolve, or resolved outside its
    region; refused, unreachable, TLS, connect timeout): nothing of the call was sent (SPEC §4: 503)."""

    blame: Blame = "upstream"
    kind: UpstreamKind | None = "connect"


class NoAddress(ConnectFailed):
    """The plane's host has no address to connect to: DNS failed or answered nothing, or an address
    lies outside the region's networks (SPEC §8, fail closed)."""


class UpstreamBroken(ModelUnavailable):
    """The plane broke the connection or the protocol mid-call (SPEC §4)."""

    status = 502
    blame: Blame = "upstream"
    kind: UpstreamKind | None = "broken"


class ConnectionReset(UpstreamBroken):
    """The plane's connection closed or reset before the answer was complete."""


class ModelNotReady(GatewayError):
    status = 503
    error_code = "model_not_ready"
    grpc_status = GRPC_UNAVAILABLE
    ws_close_code = 1013


class UpstreamTimeout(GatewayError):
    status = 504
    error_code = "timeout"
    grpc_status = GRPC_DEADLINE_EXCEEDED
    ws_close_code = 1011
    blame: Blame = "upstream"
    kind: UpstreamKind | None = "timeout"


class InternalError(GatewayError):
    pass
