"""One ASGI WebSocket session relayed to the plane's WebSocket (SPEC §7).

The native relay splices bytes after the plane's 101 (`proxy.TunnelExchange`); here the same
exchange runs, on this connection, and the ASGI server owns the client's side of the protocol:
messages from `receive()` become masked frames to the plane, the plane's frames become
`websocket.send` / `websocket.close` messages, and the plane's pings are answered here (ASGI has
no ping message). The handshake's refusals (auth, routing, a plane's own non-101) are sent as the
ASGI denial response (`websocket.http.response`), so the client sees the same status and JSON
body as natively; a server without that extension gets a close code (1008, or 1011 for a 5xx).
"""

from __future__ import annotations

import os
from base64 import b64encode
from typing import Any

from gateway.asgi.connection import AsgiConnection, ResponseDecoder
from gateway.http import wsframes
from gateway.http.server import Request

DENIAL = "websocket.http.response"  # the ASGI extension for an HTTP answer instead of the upgrade
# The ASGI server negotiates its own extensions with the client and frames its side itself: the
# plane gets a plain RFC 6455 session (no permessage-deflate the relay would have to undo).
REQUEST_DROP = frozenset({b"sec-websocket-extensions"})
ACCEPT_DROP = frozenset(
    {b"sec-websocket-accept", b"sec-websocket-protocol", b"sec-websocket-extensions", b"upgrade", b"connection"}
)
PLANE_GONE = 1011  # the plane's connection ended without a close frame (natively the client sees the TCP close)


class AsgiWebSocket(AsgiConnection):
    """The connection the handler answers one ASGI WebSocket session on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.frames = wsframes.FrameReader()
        self.accepted = False
        self.close_sent = False  # websocket.close queued (or a denial answered)
        self.early: list[bytes] = []  # client frames before the tunnel is open (none in practice)

    def new_decoder(self, req: Request) -> ResponseDecoder:
        return ResponseDecoder(self._handshake, head_only=False)

    def truncated(self) -> bool:
        return False  # a session ends with a close, never with a half-sent answer

    def begin(self) -> Request | None:
        req = super().begin()
        if req is None:
            return None
        req.headers = [(name, value) for name, value in req.headers if name not in REQUEST_DROP]
        req.upgrade = req.upgrade or b"websocket"
        if b"upgrade" not in req.connection_tokens:
            req.connection_tokens += (b"upgrade",)
        if req.header(b"sec-websocket-key") is None:  # a WebSocket over HTTP/2 (RFC 8441) has none
            req.headers += [(b"sec-websocket-key", b64encode(os.urandom(16))), (b"sec-websocket-version", b"13")]
        return req

    async def run(self) -> None:
        message = await self.receive()  # websocket.connect
        if message["type"] != "websocket.connect":
            return
        await super().run()

    # -- the handshake: the handler's HTTP answer ---------------------------------------------------

    def _handshake(self, message: dict) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            if message["status"] == 101:
                self._accept(message["headers"])
            elif DENIAL in self.scope.get("extensions", {}):
                self._push({**message, "type": "websocket.http.response.start"})
            else:
                self._push({"type": "websocket.close", "code": 1011 if message["status"] >= 500 else 1008})
            self.close_sent = not self.accepted
        elif not self.accepted and DENIAL in self.scope.get("extensions", {}):
            self._push({**message, "type": "websocket.http.response.body"})

    def _accept(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.accepted = True
        subprotocol = next((v.decode("latin-1") for k, v in headers if k == b"sec-websocket-protocol"), None)
        kept = [(k, v) for k, v in headers if k not in ACCEPT_DROP]
        self._push({"type": "websocket.accept", "subprotocol": subprotocol, "headers": kept})

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        if not self.accepted:
            try:
                self.decoder.feed(data)
            except Exception:  # httptools stops at the 101 (HttpParserUpgrade): frames follow
                if not self.accepted:
                    raise
            return
        for frame in self.frames.feed(data):
            self._from_plane(frame)

    def writelines(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    # -- frames both ways -------------------------------------------------------------------------

    def _from_plane(self, frame: wsframes.Message) -> None:
        opcode, payload = frame
        if opcode == wsframes.TEXT:
            self._push({"type": "websocket.send", "text": payload.decode("utf-8", "replace")})
        elif opcode == wsframes.BINARY:
            self._push({"type": "websocket.send", "bytes": payload})
        elif opcode == wsframes.PING:
            self._to_plane(wsframes.PONG, payload)
        elif opcode == wsframes.CLOSE and not self.close_sent:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1000
            self._push({"type": "websocket.close", "code": code, "reason": payload[2:].decode("utf-8", "replace")})
            self.close_sent = True
            self._to_plane(wsframes.CLOSE, payload)  # RFC 6455 §5.5.1: answer the close

    def _to_plane(self, opcode: int, payload: bytes) -> None:
        frame = wsframes.encode(opcode, payload, mask=True)  # we are the plane's client: frames are masked
        if self.tunnel is not None:
            self.tunnel(frame)
        else:
            self.early.append(frame)

    def start_tunnel(self, sink: Any) -> None:
        super().start_tunnel(sink)
        early, self.early = self.early, []
        for frame in early:
            sink(frame)

    def take(self, message: dict) -> bool:
        kind = message["type"]
        if kind == "websocket.receive":
            text = message.get("text")
            if text is not None:
                self._to_plane(wsframes.TEXT, text.encode())
            else:
                self._to_plane(wsframes.BINARY, message.get("bytes") or b"")
            return True
        code = message.get("code", 1005)
        if self.tunnel is not None and code not in (1005, 1006) and not self.close_sent:  # pass the client's close on
            self._to_plane(wsframes.CLOSE, wsframes.close_payload(code, message.get("reason") or ""))
        self.client_gone()  # the native teardown closes the plane's connection
        return False

    def close(self) -> None:
        """The session ended on the plane's side (or timed out idle): close the client's side."""
        if self.accepted and not self.close_sent and not self.closed_by_client:
            self._push({"type": "websocket.close", "code": PLANE_GONE, "reason": "the plane closed the connection"})
            self.close_sent = True
        super().close()
