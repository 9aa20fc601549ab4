"""A small RFC 6455 frame codec: the ASGI front end's relay to planes (gateway/asgi/websocket.py),
and the demo's WebSocket echo model and client (so the demo needs no extra package).

The native relay never parses frames: it splices bytes after the 101 (`proxy.TunnelExchange`).
"""

from __future__ import annotations

import base64
import hashlib
import os
from typing import NamedTuple

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
TEXT, BINARY, CLOSE, PING, PONG, CONTINUATION = 0x1, 0x2, 0x8, 0x9, 0xA, 0x0


def accept_key(client_key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(client_key.strip() + GUID).digest())  # noqa: S324 - mandated by RFC 6455


def apply_mask(data: bytes, key: bytes) -> bytes:
    n = len(data)
    if not n:
        return data
    mask = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(mask, "big")).to_bytes(n, "big")


def encode(opcode: int, payload: bytes, *, mask: bool) -> bytes:
    """One final frame; clients must mask, servers must not (RFC 6455 §5.1)."""
    n = len(payload)
    head = bytearray([0x80 | opcode])
    bit = 0x80 if mask else 0
    if n < 126:
        head.append(bit | n)
    elif n < 65536:
        head.append(bit | 126)
        head += n.to_bytes(2, "big")
    else:
        head.append(bit | 127)
        head += n.to_bytes(8, "big")
    if mask:
        key = os.urandom(4)
        head += key
        payload = apply_mask(payload, key)
    return bytes(head) + payload


def close_payload(code: int, reason: str = "") -> bytes:
    return code.to_bytes(2, "big") + reason.encode()


class Message(NamedTuple):
    opcode: int
    payload: bytes


class FrameReader:
    """Bytes in, whole messages out (fragments joined; control frames delivered as they come)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.fragments: list[bytes] = []
        self.fragment_opcode = 0

    def feed(self, data: bytes) -> list[Message]:
        self.buf += data
        out = []
        while (frame := self._frame()) is not None:
            fin, opcode, payload = frame
            if opcode >= CLOSE:
                out.append(Message(opcode, payload))
                continue
            if opcode != CONTINUATION:
                self.fragment_opcode = opcode
            self.fragments.append(payload)
            if fin:
                out.append(Message(self.fragment_opcode, b"".join(self.fragments)))
                self.fragments = []
        return out

    def _frame(self) -> tuple[bool, int, bytes] | None:
        buf = self.buf
        if len(buf) < 2:
            return None
        fin, opcode = bool(buf[0] & 0x80), buf[0] & 0x0F
        masked, n, i = bool(buf[1] & 0x80), buf[1] & 0x7F, 2
        if n == 126:
            if len(buf) < 4:
                return None
            n, i = int.from_bytes(buf[2:4], "big"), 4
        elif n == 127:
            if len(buf) < 10:
                return None
            n, i = int.from_bytes(buf[2:10], "big"), 10
        key = bytes(buf[i : i + 4]) if masked else b""
        i += len(key)
        if len(buf) < i + n:
            return None
        payload = bytes(buf[i : i + n])
        del buf[: i + n]
        return fin, opcode, apply_mask(payload, key) if masked else payload
