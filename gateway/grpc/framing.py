"""gRPC over HTTP/2, the wire details, pure: message framing, grpc-timeout, grpc-message, metadata.

Everything here follows https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md and is
unit-tested without sockets (tests/test_grpc_framing.py).
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
import zlib
from collections.abc import Iterable
from typing import NamedTuple

from gateway.errors import GRPC_INTERNAL, GRPC_UNIMPLEMENTED, ClientError, GatewayError, PayloadTooLarge
from gateway.routing.resolve import GrpcCall

MAX_MESSAGE_BYTES = 100 * 1024 * 1024  # per message, both ways (as WebSocket messages, SPEC §7)
PREFIX = struct.Struct(">BI")  # Length-Prefixed-Message: Compressed-Flag, Message-Length (big-endian)

# grpc-encoding values the gateway can decompress; the plane call is made with the same one.
ENCODINGS = {"gzip": 31, "deflate": 15}  # zlib wbits: gzip wrapper, zlib wrapper (RFC 1950)
ACCEPT_ENCODING = b"identity,deflate,gzip"

# Request fields never forwarded as metadata: HTTP/2 and gRPC transport fields (grpc core sets its
# own), credentials, and what the gateway sets itself (SPEC §4, §9). `grpc-*` keys are reserved for
# gRPC and dropped too (grpc core would drop `grpc-trace-bin` anyway).
DROPPED = frozenset(
    {
        "host", "te", "content-type", "content-length", "user-agent", "connection", "keep-alive",
        "proxy-connection", "transfer-encoding", "upgrade",
        "authorization", "baseten-authorization", "proxy-authorization",
        "x-baseten-model-id", "x-baseten-environment", "x-baseten-deployment-id", "x-baseten-request-id",
        "x-baseten-deployment", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
    }
)  # fmt: skip
# Plane metadata the gateway does not copy into the client's headers / trailers: the transport's own.
RESPONSE_DROPPED = frozenset(
    {
        "content-type",
        "content-length",
        "te",
        "connection",
        "transfer-encoding",
        "date",
        "server",
        "x-baseten-request-id",
    }
)
METADATA_KEY = re.compile(rb"[0-9a-z_.\-]+\Z")
TIMEOUT = re.compile(r"(\d{1,8})([HMSmun])\Z")
TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}

Metadata = tuple[tuple[str, str | bytes], ...]


class GrpcFramingError(ClientError):
    """A request stream that is not a sequence of gRPC messages (truncated, bad compression)."""

    grpc_status = GRPC_INTERNAL  # what grpc servers answer for malformed framing


class UnsupportedEncoding(ClientError):
    """A compressed message in an encoding the gateway cannot read (the spec says UNIMPLEMENTED)."""

    status = 415
    grpc_status = GRPC_UNIMPLEMENTED


class CallHead(NamedTuple):
    """What the request headers of a gRPC call say."""

    call: GrpcCall  # the routing inputs
    timeout: float | None  # grpc-timeout, seconds
    encoding: str | None  # grpc-encoding, None for identity
    metadata: Metadata  # forwarded to the plane (before the gateway's identity keys are added)
    authority: str


def frame(message: bytes) -> bytes:
    """One uncompressed Length-Prefixed-Message."""
    return PREFIX.pack(0, len(message)) + message


class MessageReader:
    """Splits a request body stream into gRPC messages, decompressing compressed ones.

    `feed` returns the messages completed by a chunk; a message is buffered only until it is
    complete, and one whose length prefix says more than `limit` bytes is refused before any of
    it is buffered.
    """

    __slots__ = ("encoding", "limit", "buffer", "need")

    def __init__(self, encoding: str | None, limit: int = MAX_MESSAGE_BYTES) -> None:
        self.encoding = encoding
        self.limit = limit
        self.buffer = bytearray()
        self.need = PREFIX.size  # bytes the next step needs: a prefix, or prefix + message

    def feed(self, data: bytes) -> list[bytes]:
        if not self.buffer and len(data) >= PREFIX.size and len(data) == PREFIX.size + PREFIX.unpack_from(data)[1]:
            return [self._message(data)]  # the common case: a chunk that is exactly one message
        self.buffer += data
        messages = []
        while len(self.buffer) >= self.need:
            flag, length = PREFIX.unpack_from(self.buffer)
            if length > self.limit:
                raise PayloadTooLarge(f"request message of {length} bytes is over the {self.limit} byte limit")
            self.need = PREFIX.size + length
            if len(self.buffer) < self.need:
                break
            messages.append(self._message(bytes(self.buffer[: self.need])))
            del self.buffer[: self.need]
            self.need = PREFIX.size
        return messages

    def end(self) -> None:
        """The request stream ended: anything left over is a truncated message."""
        if self.buffer:
            raise GrpcFramingError(f"request stream ended inside a message ({len(self.buffer)} bytes left over)")

    def _message(self, data: bytes) -> bytes:
        flag, length = PREFIX.unpack_from(data)
        if length > self.limit:
            raise PayloadTooLarge(f"request message of {length} bytes is over the {self.limit} byte limit")
        if flag == 0:
            return data[PREFIX.size :]
        if flag != 1:
            raise GrpcFramingError(f"invalid compressed flag {flag} in a message prefix")
        return decompress(data[PREFIX.size :], self.encoding, self.limit)


def decompress(data: bytes, encoding: str | None, limit: int) -> bytes:
    if encoding is None:
        raise GrpcFramingError("compressed message without a grpc-encoding header")
    wbits = ENCODINGS.get(encoding)
    if wbits is None:
        raise UnsupportedEncoding(f"grpc-encoding '{encoding[:32]}' is not supported (identity, deflate, gzip)")
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(data, limit + 1)  # bounded: a small bomb never inflates past the limit
    except zlib.error as exc:
        raise GrpcFramingError(f"message is not valid {encoding}: {exc}") from None
    if len(out) > limit:
        raise PayloadTooLarge(f"decompressed request message is over the {limit} byte limit")
    if not inflater.eof:
        raise GrpcFramingError(f"message is truncated {encoding} data")
    return out


def parse_timeout(value: str) -> float:
    """`grpc-timeout` (1-8 digits and a unit: H M S m u n) -> seconds."""
    m = TIMEOUT.match(value)
    if m is None:
        raise ClientError(f"malformed grpc-timeout {value[:20]!r}: expected 1-8 digits and one of H M S m u n")
    return int(m.group(1)) * TIMEOUT_UNITS[m.group(2)]


def encode_message(text: str) -> bytes:
    """`grpc-message`: UTF-8, then percent-encoding of everything outside 0x20-0x7E and of '%'."""
    raw = text.encode("utf-8", "replace")
    if all(0x20 <= b <= 0x7E and b != 0x25 for b in raw):
        return raw
    return b"".join(bytes((b,)) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in raw)


def read_head(path: bytes, headers: Iterable[tuple[bytes, bytes]], method: str = "POST") -> CallHead:
    """The routing inputs, deadline, encoding and forwardable metadata of a call; ClientError if malformed."""
    if method != "POST":
        raise ClientError(f"gRPC calls are POST requests, not {method[:16]}")
    authority = content_type = authorization = environment = deployment = routing_key = None
    timeout = encoding = None
    forwarded: list[tuple[str, str | bytes]] = []
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1")
        if name == "host":
            authority = raw_value.decode("latin-1")
        elif name == "content-type":
            content_type = raw_value
        elif name in ("authorization", "baseten-authorization"):
            authorization = authorization or raw_value.decode("latin-1")
        elif name == "x-baseten-environment":
            environment = raw_value.decode("latin-1")
        elif name == "x-baseten-deployment":
            deployment = raw_value.decode("latin-1")
        elif name == "grpc-timeout":
            timeout = parse_timeout(raw_value.decode("latin-1"))
        elif name == "grpc-encoding":
            encoding = raw_value.decode("latin-1").strip().lower()
        if name == "x-baseten-routing-key":
            routing_key = raw_value.decode("latin-1")
        if name in DROPPED or name.startswith("grpc-"):
            continue
        forwarded.append((name, _metadata_value(raw_name, raw_value)))
    if content_type is None or not (content_type == b"application/grpc" or content_type.startswith(b"application/grpc+")
                                    or content_type.startswith(b"application/grpc;")):  # fmt: skip
        raise ClientError("content-type must be application/grpc")
    call = GrpcCall(authority, path.decode("latin-1"), authorization, environment, deployment, routing_key)
    return CallHead(
        call, timeout, None if encoding in (None, "identity") else encoding, tuple(forwarded), authority or ""
    )


def _metadata_value(name: bytes, value: bytes) -> str | bytes:
    if not METADATA_KEY.match(name):
        raise ClientError(f"invalid metadata key {name[:64].decode('latin-1')!r}")
    if name.endswith(b"-bin"):
        try:  # binary metadata travels base64-encoded, padded or not
            return base64.b64decode(value + b"=" * (-len(value) % 4), validate=True)
        except binascii.Error:
            raise ClientError(f"metadata '{name.decode()}' is not valid base64") from None
    if not all(0x20 <= b <= 0x7E for b in value):
        raise ClientError(f"metadata '{name.decode()}' must be printable ASCII (or use a -bin key)")
    return value.decode("ascii")


def metadata_headers(metadata: Iterable[tuple[str, str | bytes]]) -> list[tuple[bytes, bytes]]:
    """Plane metadata as HTTP/2 fields: `-bin` values base64-encoded (unpadded, as grpc does)."""
    out = []
    for key, value in metadata:
        if key in RESPONSE_DROPPED or key in ("grpc-status", "grpc-message") or key.startswith(":"):
            continue
        if isinstance(value, bytes):
            out.append((key.encode("ascii"), base64.b64encode(value).rstrip(b"=")))
        else:
            out.append((key.encode("ascii"), value.encode("latin-1")))
    return out


def trailers(code: int, message: str, metadata: Iterable[tuple[str, str | bytes]], request_id: str) -> list:
    fields = [(b"grpc-status", b"%d" % code)]
    if message:
        fields.append((b"grpc-message", encode_message(message)))
    fields.extend(metadata_headers(metadata))
    fields.append((b"x-baseten-request-id", request_id.encode("ascii")))
    return fields


def error_trailers(error: GatewayError, request_id: str) -> list:
    return trailers(error.grpc_status, error.message, (), request_id)
