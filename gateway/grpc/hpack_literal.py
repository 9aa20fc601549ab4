"""An HPACK encoder without the dynamic table and without Huffman coding, for both HTTP/2 sides of the relay.

hpack's own encoder Huffman-codes every string in pure Python, which profiling showed as one of the
largest costs per relayed call (request ids and paths are new strings on every call). RFC 7541
lets an encoder choose: here a field is the static table entry when one matches exactly (§6.1),
else a literal without indexing, with the static table's name when there is one (§6.2.2), and raw
string octets (H=0, §5.2). The peer's decoder needs no state from us; its dynamic table is set to
size 0 at the start of the first header block and after every SETTINGS_HEADER_TABLE_SIZE change
(§4.2, §6.3), so it never has to hold anything for us whatever size it advertises.
"""

from __future__ import annotations

from collections.abc import Iterable

from hpack.table import HeaderTable

MAX_NAMES = 512  # distinct encoded names kept; names come from clients' metadata keys
MAX_FIELDS = 1024  # encoded fields kept: those that repeat (content-type, identity, grpc-status: 0)
VOLATILE = frozenset({b"x-baseten-request-id", b"grpc-timeout"})  # new on every call: never kept
TABLE_SIZE_ZERO = b"\x20"  # Dynamic Table Size Update to 0 (RFC 7541 §6.3)


def encode_integer(value: int, prefix_bits: int, flags: int) -> bytes:
    """RFC 7541 §5.1."""
    top = (1 << prefix_bits) - 1
    if value < top:
        return bytes((flags | value,))
    out = bytearray((flags | top,))
    value -= top
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_string(data: bytes) -> bytes:
    n = len(data)
    return (bytes((n,)) if n < 0x7F else encode_integer(n, 7, 0)) + data


def _static_tables() -> tuple[dict[tuple[bytes, bytes], bytes], dict[bytes, bytes]]:
    fields: dict[tuple[bytes, bytes], bytes] = {}
    names: dict[bytes, bytes] = {}
    for index, (name, value) in enumerate(HeaderTable.STATIC_TABLE, start=1):
        fields.setdefault((name, value), encode_integer(index, 7, 0x80))  # §6.1 indexed field
        names.setdefault(name, encode_integer(index, 4, 0x00))  # §6.2.2 literal, indexed name
    return fields, names


STATIC_FIELDS, STATIC_NAMES = _static_tables()


class LiteralEncoder:
    """Drop-in for `hpack.Encoder` as h2 uses it: `encode(headers)` and the `header_table_size` setter."""

    __slots__ = ("names", "fields", "update")

    def __init__(self) -> None:
        self.names = dict(STATIC_NAMES)
        self.fields = dict(STATIC_FIELDS)
        self.update = TABLE_SIZE_ZERO

    @property
    def header_table_size(self) -> int:
        return 0

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        self.update = TABLE_SIZE_ZERO  # the peer changed the limit: say again that we use none of it

    def encode(self, headers: Iterable[tuple[bytes, bytes]], huffman: bool = True) -> bytes:
        parts = [self.update]
        self.update = b""
        names = self.names
        fields = self.fields
        for pair in headers:
            field = fields.get(pair)
            if field is not None:
                parts.append(field)
                continue
            name, value = pair
            prefix = names.get(name)
            if prefix is None:
                prefix = b"\x00" + encode_string(name)
                if len(names) < MAX_NAMES:
                    names[name] = prefix
            n = len(value)
            field = prefix + (bytes((n,)) if n < 0x7F else encode_integer(n, 7, 0)) + value
            if len(fields) < MAX_FIELDS and name not in VOLATILE:
                fields[pair] = field
            parts.append(field)
        return b"".join(parts)
