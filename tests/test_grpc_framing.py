"""gRPC wire details, pure (gateway/grpc/framing.py): message framing, grpc-timeout, grpc-message, metadata."""

from __future__ import annotations

import gzip
import struct
import urllib.parse
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import ClientError, PayloadTooLarge
from gateway.grpc.framing import (
    GrpcFramingError,
    MessageScanner,
    encode_message,
    format_timeout,
    frame,
    grpc_status,
    parse_timeout,
    read_head,
    response_fields,
    trailers,
)
from gateway.grpc.relay import FORWARDING_AUTHORITY_MAX, FORWARDING_KEPT, forwarding
from gateway.headers import forwarded_value


def prefixed(message: bytes, compressed: bool = False) -> bytes:
    return struct.pack(">BI", int(compressed), len(message)) + message


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


def scan(scanner: MessageScanner, chunks: list[bytes]) -> None:
    for chunk in chunks:
        scanner.scan(chunk)
    scanner.end()


@given(st.lists(st.binary(max_size=300), max_size=8), st.lists(st.integers(min_value=0), max_size=12))
def test_a_stream_of_messages_passes_however_it_is_cut(messages: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(frame(m) for m in messages)
    scan(MessageScanner(None), splits(stream, cuts))


@given(st.lists(st.binary(max_size=200), min_size=1, max_size=5), st.lists(st.integers(min_value=0), max_size=8),
       st.sampled_from(["gzip", "deflate", "snappy"]))  # fmt: skip
def test_compressed_messages_pass_unchanged(messages: list[bytes], cuts: list[int], encoding: str) -> None:
    """The plane decompresses them: the gateway only follows the prefixes (any grpc-encoding)."""
    stream = b"".join(prefixed(gzip.compress(m), compressed=True) for m in messages)
    scan(MessageScanner(encoding), splits(stream, cuts))


@given(st.integers(min_value=0, max_value=4))
def test_a_message_over_the_limit_is_refused_from_its_prefix_alone(cut: int) -> None:
    scanner = MessageScanner(None, limit=1000)
    prefix = struct.pack(">BI", 0, 1001)  # nothing of the message itself has arrived
    with pytest.raises(PayloadTooLarge):
        scan(scanner, [prefix[:cut], prefix[cut:]])
    scan(MessageScanner(None, limit=1000), [prefixed(b"x" * 1000)])


@pytest.mark.parametrize(
    ("encoding", "data"),
    [
        (None, prefixed(b"abc", compressed=True)),  # compressed flag without grpc-encoding
        (None, b"\x02\x00\x00\x00\x01x"),  # flag is 0 or 1
        ("gzip", b"\x02\x00\x00\x00\x01x"),
    ],
)
def test_malformed_prefixes(encoding: str | None, data: bytes) -> None:
    with pytest.raises(GrpcFramingError):
        MessageScanner(encoding).scan(data)


@pytest.mark.parametrize("tail", [b"\x00", b"\x00\x00\x00\x00\x05abc"])
def test_a_stream_ending_inside_a_message_is_an_error(tail: bytes) -> None:
    scanner = MessageScanner(None)
    scanner.scan(frame(b"ok") + tail)
    with pytest.raises(GrpcFramingError):
        scanner.end()


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("1H", 3600.0), ("2M", 120.0), ("3S", 3.0), ("250m", 0.25), ("99999999u", 99.999999), ("1000000n", 0.001)],
)
def test_grpc_timeout(value: str, seconds: float) -> None:
    assert parse_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "1", "S", "123456789S", "1s", "1.5S", "-1S", "1 S"])
def test_malformed_grpc_timeout(value: str) -> None:
    with pytest.raises(ClientError):
        parse_timeout(value)


@given(st.text(max_size=50))
def test_grpc_message_is_percent_encoded_and_decodes_back(text: str) -> None:
    encoded = encode_message(text)
    assert all(0x20 <= b <= 0x7E for b in encoded)
    assert urllib.parse.unquote(encoded.decode("ascii"), errors="replace") == text.encode("utf-8", "replace").decode(
        "utf-8", "replace"
    )


def test_grpc_message_examples() -> None:
    assert encode_message("plain text") == b"plain text"
    assert encode_message("100% ünï\n") == b"100%25 %C3%BCn%C3%AF%0A"


@pytest.mark.parametrize("seconds", [1e-9, 0.25, 1.5, 99.9, 1200.0, 259200.0, 5e7])
def test_format_timeout_round_trips_never_shorter(seconds: float) -> None:
    assert seconds - 1e-9 <= parse_timeout(format_timeout(seconds).decode()) <= seconds * 1.001 + 1e-6


HEADERS = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/demo.Echo/Say"),
    (b":authority", b"model-abc123.grpc.api.example.com"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
    (b"user-agent", b"grpc-python/1.85"),
    (b"grpc-timeout", b"250m"),
    (b"grpc-encoding", b"gzip"),
    (b"grpc-accept-encoding", b"identity,gzip"),
    (b"grpc-trace-bin", b"AAA"),
    (b"authorization", b"Api-Key k1"),
    (b"baseten-authorization", b"Api-Key k1"),  # the same key under both names: fine
    (b"x-baseten-environment", b"staging"),
    (b"x-baseten-routing-key", b"user-42"),
    (b"x-baseten-model-id", b"spoofed"),
    (b"x-custom", b"v"),
    (b"x-blob-bin", b"AP8"),  # b"\x00\xff", unpadded
    (b"x-custom", b"second"),
]
GRPC = [(b":method", b"POST"), (b":path", b"/a.B/C"), (b"content-type", b"application/grpc")]


def test_read_head_takes_routing_inputs_and_forwards_the_rest_as_sent() -> None:
    head = read_head(HEADERS)
    call = head.call
    assert (call.authority, call.method, call.authorization) == (HEADERS[3][1].decode(), "/demo.Echo/Say", "Api-Key k1")
    assert (call.environment, call.deployment, call.routing_key) == ("staging", None, "user-42")
    assert head.path == b"/demo.Echo/Say" and head.authority == call.authority
    assert head.timeout == pytest.approx(0.25) and head.encoding == "gzip"
    assert head.transport == (
        (b"content-type", b"application/grpc"),
        (b"user-agent", b"grpc-python/1.85"),
        (b"grpc-encoding", b"gzip"),
        (b"grpc-accept-encoding", b"identity,gzip"),
    )
    assert head.metadata == (
        (b"x-baseten-routing-key", b"user-42"),
        (b"x-custom", b"v"),
        (b"x-blob-bin", b"AP8"),
        (b"x-custom", b"second"),
    )


def test_baseten_authorization_is_used_when_authorization_is_absent() -> None:
    head = read_head([*GRPC[:2], (b"content-type", b"application/grpc+proto"), (b"baseten-authorization", b"Bearer k")])
    assert head.call.authorization == "Bearer k" and head.encoding is None
    assert read_head([*GRPC, (b"grpc-encoding", b"identity")]).encoding is None


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ([*GRPC[:2], (b"content-type", b"application/json")], "application/grpc"),
        (GRPC[:2], "application/grpc"),
        ([(b":method", b"GET"), *GRPC[1:]], "POST"),
        ([*GRPC, (b"x-bad", b"caf\xc3\xa9")], "printable ASCII"),
        ([*GRPC, (b"x-bad-bin", b"!!!")], "base64"),
        ([*GRPC, (b"X-Upper", b"v")], "invalid metadata key"),
        ([*GRPC, (b"grpc-timeout", b"soon")], "grpc-timeout"),
    ],
)
def test_read_head_refuses_malformed_calls(headers: list, message: str) -> None:
    with pytest.raises(ClientError) as info:
        read_head(headers)
    assert message in info.value.message


def test_plane_response_fields_pass_but_connection_specific_ones_and_the_request_id_is_the_gateways() -> None:
    plane = [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-encoding", b"gzip"),
             (b"x-a", b"1"), (b"connection", b"x"), (b"date", b"now"), (b"x-baseten-request-id", b"plane's")]  # fmt: skip
    status, fields = response_fields(plane, None)
    assert status == b"200"
    assert fields == ((b"content-type", b"application/grpc"), (b"grpc-encoding", b"gzip"), (b"x-a", b"1"))
    trailer = [(b"grpc-status", b"9"), (b"grpc-message", b"no%20"), (b"x-t-bin", b"AP8B")]
    status, fields = response_fields(trailer, b"f" * 32)
    assert status == b"" and fields == (*trailer, (b"x-baseten-request-id", b"f" * 32))
    assert grpc_status(fields) == 9


@pytest.mark.parametrize(("fields", "code"), [([], 2), ([(b"grpc-status", b"x")], 2), ([(b"grpc-status", b"16")], 16)])
def test_grpc_status_is_unknown_when_missing_or_malformed(fields: list, code: int) -> None:
    assert grpc_status(fields) == code


def test_gateway_trailers() -> None:
    assert trailers(9, "no 100%", "f" * 32) == [
        (b"grpc-status", b"9"),
        (b"grpc-message", b"no 100%25"),
        (b"x-baseten-request-id", b"f" * 32),
    ]
    assert trailers(0, "", "a" * 32) == [(b"grpc-status", b"0"), (b"x-baseten-request-id", b"a" * 32)]


def test_underscore_look_alikes_and_client_proxy_fields_are_not_forwarded() -> None:
    spoofed = [(b"x_baseten_model_id", b"s"), (b"x-baseten_environment", b"s"), (b"x_forwarded_for", b"1.2.3.4"),
               (b"forwarded", b"for=1.2.3.4"), (b"x-real-ip", b"1.2.3.4"), (b"x-forwarded-port", b"1"),
               (b"x-forwarded-prefix", b"/a"), (b"x-original-url", b"/a"), (b"x_custom", b"kept")]  # fmt: skip
    head = read_head([*GRPC, *spoofed])
    assert head.metadata == ((b"x_custom", b"kept"),)
    assert head.call.environment is None  # a look-alike is no routing input either


@pytest.mark.parametrize(
    ("credentials", "ok"),
    [
        ([(b"authorization", b"Api-Key a"), (b"authorization", b"Api-Key b")], False),
        ([(b"baseten-authorization", b"Api-Key a"), (b"baseten-authorization", b"Api-Key b")], False),
        ([(b"authorization", b"Api-Key a"), (b"baseten-authorization", b"Api-Key b")], False),
        ([(b"authorization", b"Api-Key a"), (b"baseten-authorization", b"Api-Key a")], True),
    ],
)
def test_two_different_credentials_are_refused_without_echoing_them(credentials: list, ok: bool) -> None:
    if ok:
        assert read_head([*GRPC, *credentials]).call.authorization == "Api-Key a"
        return
    with pytest.raises(ClientError) as info:
        read_head([*GRPC, *credentials])
    assert "two different credentials" in info.value.message and "Api-Key" not in info.value.message


# -- forwarding fields (relay.forwarding: kept per client connection and authority) ----------------


def client_connection(peer: str | None, scheme: str = "http") -> SimpleNamespace:
    """What `forwarding` reads of an h2server.H2Connection."""
    return SimpleNamespace(client=(peer, 5000) if peer is not None else None, scheme=scheme, forwarding={})


@pytest.mark.parametrize(
    ("peer", "scheme", "authority"),
    [("10.1.2.3", "http", "model-a.grpc.example"), ("::1", "https", "model-b.grpc.example:443"), (None, "http", "")],
)
def test_forwarding_fields_are_those_of_the_connection_and_the_authority(peer, scheme, authority) -> None:
    conn = client_connection(peer, scheme)
    first = forwarding(conn, authority)
    assert first == (
        (b"x-forwarded-for", (peer or "").encode()),
        (b"x-forwarded-proto", scheme.encode()),
        (b"x-forwarded-host", authority.encode()),
        (b"forwarded", forwarded_value(peer or "", authority, scheme)),
    )
    assert forwarding(conn, authority) is first  # kept: built once per connection and authority


def test_forwarding_fields_follow_each_calls_authority_and_stay_bounded() -> None:
    conn = client_connection("10.1.2.3")
    hosts = [f"model-{i}.grpc.example" for i in range(3 * FORWARDING_KEPT)]
    for host in hosts + hosts[::-1]:
        fields = dict(forwarding(conn, host))
        assert fields[b"x-forwarded-host"] == host.encode()
        assert fields[b"forwarded"] == b"for=10.1.2.3;host=" + host.encode() + b";proto=http"
        assert len(conn.forwarding) <= FORWARDING_KEPT
    long = "m" * (FORWARDING_AUTHORITY_MAX + 1)
    assert dict(forwarding(conn, long))[b"x-forwarded-host"] == long.encode()
    assert long not in conn.forwarding  # built per call, never kept
