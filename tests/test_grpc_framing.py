"""gRPC wire details, pure (gateway/grpc/framing.py): message framing, grpc-timeout, grpc-message, metadata."""

from __future__ import annotations

import gzip
import struct
import urllib.parse
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import ClientError, PayloadTooLarge
from gateway.grpc.framing import (
    GrpcFramingError,
    MessageReader,
    UnsupportedEncoding,
    encode_message,
    frame,
    metadata_headers,
    parse_timeout,
    read_head,
    trailers,
)


def prefixed(message: bytes, compressed: bool = False) -> bytes:
    return struct.pack(">BI", int(compressed), len(message)) + message


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


@given(st.lists(st.binary(max_size=300), max_size=8), st.lists(st.integers(min_value=0), max_size=12))
def test_messages_come_out_whole_however_the_stream_is_cut(messages: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(frame(m) for m in messages)
    reader = MessageReader(None)
    out = [m for chunk in splits(stream, cuts) for m in reader.feed(chunk)]
    reader.end()
    assert out == messages


@given(st.lists(st.binary(max_size=200), min_size=1, max_size=5), st.lists(st.integers(min_value=0), max_size=8),
       st.sampled_from(["gzip", "deflate"]))  # fmt: skip
def test_compressed_messages_are_decompressed(messages: list[bytes], cuts: list[int], encoding: str) -> None:
    compress = gzip.compress if encoding == "gzip" else zlib.compress
    stream = b"".join(prefixed(compress(m), compressed=True) for m in messages)
    reader = MessageReader(encoding)
    assert [m for chunk in splits(stream, cuts) for m in reader.feed(chunk)] == messages


def test_a_message_over_the_limit_is_refused_from_its_prefix_alone() -> None:
    reader = MessageReader(None, limit=1000)
    with pytest.raises(PayloadTooLarge):
        reader.feed(struct.pack(">BI", 0, 1001))  # nothing of the message itself has arrived
    assert MessageReader(None, limit=1000).feed(prefixed(b"x" * 1000)) == [b"x" * 1000]


def test_decompression_is_bounded() -> None:
    bomb = gzip.compress(b"\0" * 10_000_000)  # about 10 KB that inflate to 10 MB
    with pytest.raises(PayloadTooLarge):
        MessageReader("gzip", limit=1_000_000).feed(prefixed(bomb, compressed=True))


@pytest.mark.parametrize(
    ("encoding", "data", "error"),
    [
        (None, prefixed(b"abc", compressed=True), GrpcFramingError),  # compressed flag without grpc-encoding
        ("snappy", prefixed(b"abc", compressed=True), UnsupportedEncoding),
        ("gzip", prefixed(b"not gzip", compressed=True), GrpcFramingError),
        ("gzip", prefixed(gzip.compress(b"abcdef")[:-6], compressed=True), GrpcFramingError),  # truncated
        (None, b"\x02\x00\x00\x00\x01x", GrpcFramingError),  # flag is 0 or 1
    ],
)
def test_malformed_messages(encoding: str | None, data: bytes, error: type) -> None:
    with pytest.raises(error):
        MessageReader(encoding).feed(data)


def test_unsupported_encoding_is_unimplemented_and_uncompressed_messages_still_pass() -> None:
    assert MessageReader("snappy").feed(prefixed(b"plain")) == [b"plain"]
    with pytest.raises(UnsupportedEncoding) as info:
        MessageReader("snappy").feed(prefixed(b"x", compressed=True))
    assert info.value.grpc_status == 12  # UNIMPLEMENTED


@pytest.mark.parametrize("tail", [b"\x00", b"\x00\x00\x00\x00\x05abc"])
def test_a_stream_ending_inside_a_message_is_an_error(tail: bytes) -> None:
    reader = MessageReader(None)
    assert reader.feed(frame(b"ok") + tail) == [b"ok"]
    with pytest.raises(GrpcFramingError):
        reader.end()


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


HEADERS = [
    (b"host", b"model-abc123.grpc.api.example.com"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
    (b"user-agent", b"grpc-python/1.85"),
    (b"grpc-timeout", b"250m"),
    (b"grpc-encoding", b"gzip"),
    (b"grpc-accept-encoding", b"identity,gzip"),
    (b"authorization", b"Api-Key k1"),
    (b"baseten-authorization", b"Api-Key k2"),
    (b"x-baseten-environment", b"staging"),
    (b"x-baseten-routing-key", b"user-42"),
    (b"x-baseten-model-id", b"spoofed"),
    (b"x-custom", b"v"),
    (b"x-blob-bin", b"AP8"),  # b"\x00\xff", unpadded
    (b"x-custom", b"second"),
]


def test_read_head_takes_routing_inputs_and_forwards_the_rest() -> None:
    head = read_head(b"/demo.Echo/Say", HEADERS)
    call = head.call
    assert (call.authority, call.method, call.authorization) == (HEADERS[0][1].decode(), "/demo.Echo/Say", "Api-Key k1")
    assert (call.environment, call.deployment, call.routing_key) == ("staging", None, "user-42")
    assert head.timeout == pytest.approx(0.25) and head.encoding == "gzip"
    assert head.metadata == (
        ("x-baseten-routing-key", "user-42"),
        ("x-custom", "v"),
        ("x-blob-bin", b"\x00\xff"),
        ("x-custom", "second"),
    )


def test_baseten_authorization_is_used_when_authorization_is_absent() -> None:
    head = read_head(b"/a.B/C", [(b"content-type", b"application/grpc+proto"), (b"baseten-authorization", b"Bearer k")])
    assert head.call.authorization == "Bearer k" and head.encoding is None


@pytest.mark.parametrize(
    ("headers", "method", "message"),
    [
        ([(b"content-type", b"application/json")], "POST", "application/grpc"),
        ([], "POST", "application/grpc"),
        ([(b"content-type", b"application/grpc")], "GET", "POST"),
        ([(b"content-type", b"application/grpc"), (b"x-bad", b"caf\xc3\xa9")], "POST", "printable ASCII"),
        ([(b"content-type", b"application/grpc"), (b"x-bad-bin", b"!!!")], "POST", "base64"),
        ([(b"content-type", b"application/grpc"), (b"grpc-timeout", b"soon")], "POST", "grpc-timeout"),
    ],
)
def test_read_head_refuses_malformed_calls(headers: list, method: str, message: str) -> None:
    with pytest.raises(ClientError) as info:
        read_head(b"/a.B/C", headers, method)
    assert message in info.value.message


def test_response_metadata_and_trailers() -> None:
    fields = metadata_headers([("x-a", "1"), ("x-b-bin", b"\x00\xff\x01"), ("content-type", "x"), ("grpc-status", "0")])
    assert fields == [(b"x-a", b"1"), (b"x-b-bin", b"AP8B")]
    assert trailers(9, "no 100%", [("x-t", "v"), ("x-baseten-request-id", "plane's")], "f" * 32) == [
        (b"grpc-status", b"9"),
        (b"grpc-message", b"no 100%25"),
        (b"x-t", b"v"),
        (b"x-baseten-request-id", b"f" * 32),
    ]
    assert trailers(0, "", [], "a" * 32) == [(b"grpc-status", b"0"), (b"x-baseten-request-id", b"a" * 32)]
