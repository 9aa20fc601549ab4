"""gRPC over HTTP/2, the wire details, pure: message prefixes, grpc-timeout, grpc-message, which fields pass.

Everything here follows https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md and is
unit-tested without sockets (tests/test_grpc_framing.py). The relay forwards messages and
metadata as the bytes they are: nothing here decodes a message.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from collections.abc import Iterable
from typing import NamedTuple

from gateway.errors import GRPC_INTERNAL, ClientError, GatewayError, PayloadTooLarge
from gateway.headers import dropped
from gateway.routing.resolve import GrpcCall

MAX_MESSAGE_BYTES = 100 * 1024 * 1024  # per message, both ways (as WebSocket messages, SPEC §7)
PREFIX = struct.Struct(">BI")  # Length-Prefixed-Message: Compressed-Flag, Message-Length (big-endian)

# Request fields never forwarded as metadata: the HTTP/2 and transport fields here, and what
# `gateway.headers.dropped` says for every protocol (credentials, what the gateway sets itself per
# SPEC §4/§9, client proxy fields, their underscore look-alikes). `grpc-*` keys are reserved for
# gRPC: grpc-timeout is set by the gateway (capped), grpc-encoding and grpc-accept-encoding go with
# the transport fields, the others are dropped. (Connection-specific fields never get here: h2server
# resets such a request as malformed, RFC 9113 §8.2.2; they are listed in case one does.)
DROPPED = frozenset(
    {
        "host", "te", "content-type", "content-length", "user-agent", "connection", "keep-alive",
        "proxy-connection", "transfer-encoding", "upgrade",
    }
)  # fmt: skip
CREDENTIALS = ("authorization", "baseten-authorization")  # SPEC §5: either carries the API key
# Request fields forwarded to the plane unchanged, next to the metadata: what the messages are.
TRANSPORT = frozenset({"content-type", "grpc-encoding", "grpc-accept-encoding", "user-agent"})
# Plane response fields the gateway does not copy to the client: connection-specific ones (RFC 9113
# §8.2.2), the plane's own server identity, and the request id the gateway sets itself.
RESPONSE_DROPPED = frozenset(
    {
        b"content-length", b"te", b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
        b"upgrade", b"date", b"server", b"x-baseten-request-id", b"x-baseten-deployment-id",
    }
)  # fmt: skip
METADATA_KEY = re.compile(rb"[0-9a-z_.\-]+\Z")
PRINTABLE = re.compile(rb"[\x20-\x7e]*\Z")
PATH = re.compile(rb"/[\x21-\x7e]*\Z")
TIMEOUT = re.compile(r"(\d{1,8})([HMSmun])\Z")
TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}

# gRPC status codes of what a plane does instead of answering with a status (PROTOCOL-HTTP2.md
# "Errors", http-grpc-status-mapping.md): RST_STREAM error codes, and HTTP statuses other than 200.
OK, CANCELLED, UNKNOWN, INTERNAL, UNAVAILABLE = 0, 1, 2, 13, 14
RST_STATUS = {0: INTERNAL, 7: UNAVAILABLE, 8: CANCELLED, 11: 8, 12: 7}  # NO_ERROR before a status is INTERNAL
HTTP_STATUS = {400: INTERNAL, 401: 16, 403: 7, 404: 12, 429: UNAVAILABLE, 502: UNAVAILABLE, 503: UNAVAILABLE,
               504: UNAVAILABLE}  # fmt: skip

Fields = tuple[tuple[bytes, bytes], ...]


class GrpcFramingError(ClientError):
    """A request stream that is not a sequence of gRPC messages (truncated, bad compressed flag)."""

    grpc_status = GRPC_INTERNAL  # what grpc servers answer for malformed framing


class CallHead(NamedTuple):
    """What the request headers of a gRPC call say."""

    call: GrpcCall  # the routing inputs
    path: bytes
    timeout: float | None  # grpc-timeout, seconds
    encoding: str | None  # grpc-encoding, None for identity
    transport: Fields  # content-type, grpc-encoding, grpc-accept-encoding, user-agent: for the plane, as sent
    metadata: Fields  # forwarded to the plane as sent (before the gateway's identity keys are added)
    authority: str


def frame(message: bytes) -> bytes:
    """One uncompressed Length-Prefixed-Message."""
    return PREFIX.pack(0, len(message)) + message


class MessageScanner:
    """Follows the message prefixes of a request stream passing through, without copying or decoding it.

    Messages are forwarded as they are (compressed ones too: the plane decompresses them); the
    gateway only refuses a message whose prefix says more than `limit` bytes, before any of it is
    forwarded, a prefix that is not one, and a stream that ends inside a message.
    """

    __slots__ = ("encoding", "limit", "remaining", "partial")

    def __init__(self, encoding: str | None, limit: int = MAX_MESSAGE_BYTES) -> None:
        self.encoding = encoding
        self.limit = limit
        self.remaining = 0  # bytes of the current message still to come
        self.partial = b""  # the start of a prefix cut by a chunk boundary

    def scan(self, data: bytes | memoryview) -> None:
        pos, size = 0, len(data)
        while True:
            if self.remaining:
                step = min(self.remaining, size - pos)
                self.remaining -= step
                pos += step
            if pos >= size:
                return
            if self.partial or size - pos < PREFIX.size:
                take = PREFIX.size - len(self.partial)
                self.partial += bytes(data[pos : pos + take])
                pos += take
                if len(self.partial) < PREFIX.size:
                    return
                flag, length = PREFIX.unpack(self.partial)
                self.partial = b""
            else:
                flag, length = PREFIX.unpack_from(data, pos)
                pos += PREFIX.size
            if length > self.limit:
                raise PayloadTooLarge(f"request message of {length} bytes is over the {self.limit} byte limit")
            if flag != 0:
                if flag != 1:
                    raise GrpcFramingError(f"invalid compressed flag {flag} in a message prefix")
                if self.encoding is None:
                    raise GrpcFramingError("compressed message without a grpc-encoding header")
            self.remaining = length

    def end(self) -> None:
        """The request stream ended: anything left over is a truncated message."""
        if self.remaining or self.partial:
            left = self.remaining or PREFIX.size - len(self.partial)
            raise GrpcFramingError(f"request stream ended inside a message ({left} bytes missing)")


def parse_timeout(value: str) -> float:
    """`grpc-timeout` (1-8 digits and a unit: H M S m u n) -> seconds."""
    m = TIMEOUT.match(value)
    if m is None:
        raise ClientError(f"malformed grpc-timeout {value[:20]!r}: expected 1-8 digits and one of H M S m u n")
    return int(m.group(1)) * TIMEOUT_UNITS[m.group(2)]


def format_timeout(seconds: float) -> bytes:
    """Seconds -> `grpc-timeout`, in the finest unit that fits 8 digits (rounded up: never shorter)."""
    micros = -int(-seconds * 1_000_000 // 1)
    if micros < 100_000_000:
        return b"%du" % max(micros, 1)
    millis = -(-micros // 1000)
    if millis < 100_000_000:
        return b"%dm" % millis
    return b"%dS" % min(-(-millis // 1000), 99_999_999)


def encode_message(text: str) -> bytes:
    """`grpc-message`: UTF-8, then percent-encoding of everything outside 0x20-0x7E and of '%'."""
    raw = text.encode("utf-8", "replace")
    if all(0x20 <= b <= 0x7E and b != 0x25 for b in raw):
        return raw
    return b"".join(bytes((b,)) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in raw)


def read_head(headers: Iterable[tuple[bytes, bytes]]) -> CallHead:
    """The routing inputs, deadline, encoding and forwardable fields of a call's HTTP/2 request header
    fields (pseudo-fields included); ClientError if malformed."""
    authority = content_type = authorization = environment = deployment = routing_key = None
    timeout = encoding = None
    method = path = b""
    transport: list[tuple[bytes, bytes]] = []
    forwarded: list[tuple[bytes, bytes]] = []
    for raw_name, raw_value in headers:
        if raw_name[:1] == b":":
            if raw_name == b":path":
                path = raw_value
            elif raw_name == b":authority":
                if not PRINTABLE.match(raw_value):
                    raise ClientError(":authority must be printable ASCII")
                authority = raw_value.decode("latin-1")
            elif raw_name == b":method":
                method = raw_value
            continue
        name = raw_name.decode("latin-1")
        if name in TRANSPORT:
            if not PRINTABLE.match(raw_value):
                raise ClientError(f"'{name}' must be printable ASCII")
            transport.append((raw_name, raw_value))
            if name == "content-type":
                content_type = raw_value
            elif name == "grpc-encoding":
                encoding = raw_value.decode("latin-1").strip().lower()
            continue
        if name == "host":
            authority = authority or raw_value.decode("latin-1")
        elif name in CREDENTIALS:
            if authorization is None:
                authorization = raw_value.decode("latin-1")
            elif authorization != raw_value.decode("latin-1"):
                # Which one would a plane or a log trust? None: the call is refused (never echoing either).
                raise ClientError("two different credentials (authorization / baseten-authorization): send one")
        elif name == "x-baseten-environment":
            environment = raw_value.decode("latin-1")
        elif name == "x-baseten-deployment":
            deployment = raw_value.decode("latin-1")
        elif name == "grpc-timeout":
            timeout = parse_timeout(raw_value.decode("latin-1"))
        elif name == "x-baseten-routing-key":
            routing_key = raw_value.decode("latin-1")
        if name in DROPPED or name.startswith("grpc-") or dropped(raw_name):
            continue
        _check_metadata(raw_name, raw_value)
        forwarded.append((raw_name, raw_value))
    if method != b"POST":
        raise ClientError(f"gRPC calls are POST requests, not {method[:16].decode('latin-1')}")
    if not PATH.match(path):
        raise ClientError("the :path of a gRPC call is /<service>/<method> in printable ASCII")
    if content_type is None or not (content_type == b"application/grpc" or content_type.startswith(b"application/grpc+")
                                    or content_type.startswith(b"application/grpc;")):  # fmt: skip
        raise ClientError("content-type must be application/grpc")
    call = GrpcCall(authority, path.decode("latin-1"), authorization, environment, deployment, routing_key)
    return CallHead(
        call,
        path,
        timeout,
        None if encoding in (None, "identity") else encoding,
        tuple(transport),
        tuple(forwarded),
        authority or "",
    )


def _check_metadata(name: bytes, value: bytes) -> None:
    if not METADATA_KEY.match(name):
        raise ClientError(f"invalid metadata key {name[:64].decode('latin-1')!r}")
    if name.endswith(b"-bin"):
        try:  # binary metadata travels base64-encoded, padded or not
            base64.b64decode(value + b"=" * (-len(value) % 4), validate=True)
        except binascii.Error:
            raise ClientError(f"metadata '{name.decode()}' is not valid base64") from None
    elif not PRINTABLE.match(value):
        raise ClientError(f"metadata '{name.decode()}' must be printable ASCII (or use a -bin key)")


def response_fields(headers: Iterable[tuple[bytes, bytes]], request_id: bytes | None) -> tuple[bytes, Fields]:
    """A plane's response header or trailer fields for the client: (its :status, the fields to send).

    Everything passes as sent (metadata, grpc-status, grpc-message, grpc-encoding, ...) but the
    connection-specific fields; with `request_id`, x-baseten-request-id is set to it.
    """
    status = b""
    out: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        if name == b":status":
            status = value
        elif name not in RESPONSE_DROPPED and name[:1] != b":":
            out.append((name, value))
    if request_id is not None:
        out.append((b"x-baseten-request-id", request_id))
    return status, tuple(out)


def grpc_status(fields: Iterable[tuple[bytes, bytes]]) -> int:
    """The grpc-status in trailer fields (UNKNOWN when missing or malformed)."""
    for name, value in fields:
        if name == b"grpc-status":
            return int(value) if value.isdigit() and len(value) < 4 else UNKNOWN
    return UNKNOWN


def trailers(code: int, message: str, request_id: str) -> list[tuple[bytes, bytes]]:
    fields = [(b"grpc-status", b"%d" % code)]
    if message:
        fields.append((b"grpc-message", encode_message(message)))
    fields.append((b"x-baseten-request-id", request_id.encode("ascii")))
    return fields


RETRY_FIELDS = ("retry-after", "ratelimit-policy", "ratelimit")  # an error's fields that gRPC answers carry too


def error_trailers(error: GatewayError, request_id: str) -> list[tuple[bytes, bytes]]:
    """The trailers of a call the gateway answers. A refusal's retry information (429s and their
    RESOURCE_EXHAUSTED: rate limits, backpressure) rides along as metadata: `retry-after` and the
    IETF RateLimit fields as in HTTP, and `grpc-retry-pushback-ms`, which gRPC clients with a retry
    policy obey (gRFC A6)."""
    fields = trailers(error.grpc_status, error.message, request_id)
    for name, value in error.headers:
        if name in RETRY_FIELDS:
            fields.append((name.encode(), value.encode()))
            if name == "retry-after" and value.isdigit():
                fields.append((b"grpc-retry-pushback-ms", b"%d" % (int(value) * 1000)))
    return fields
