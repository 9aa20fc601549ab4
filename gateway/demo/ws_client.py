"""A minimal WebSocket client for the demo: `python -m gateway.demo.ws_client URL --key K --message M`.

Sends one text message through the gateway, prints the echo, closes with code 1000.
Like curl, it connects `*.localhost` hosts to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import sys
from urllib.parse import urlsplit

from gateway.http import wsframes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url", help="ws://model-<id>[-<env>].<domain>:<port>/<path>")
    p.add_argument("--key", required=True, help="API key")
    p.add_argument("--message", default="hello over WebSocket")
    args = p.parse_args(argv)
    url = urlsplit(args.url)
    if url.scheme != "ws" or not url.hostname:
        print("expected a ws:// URL", file=sys.stderr)
        return 2
    host = "127.0.0.1" if url.hostname.endswith(".localhost") else url.hostname
    sock = socket.create_connection((host, url.port or 80), timeout=10)
    key = base64.b64encode(os.urandom(16))
    target = (url.path or "/") + (f"?{url.query}" if url.query else "")
    sock.sendall(
        f"GET {target} HTTP/1.1\r\nHost: {url.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Version: 13\r\nAuthorization: Api-Key {args.key}\r\n".encode()
        + b"Sec-WebSocket-Key: %s\r\n\r\n" % key
    )
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode()
    if " 101 " not in status_line + " ":
        print(f"upgrade refused: {status_line}\n{rest.decode(errors='replace')}")
        return 1
    if wsframes.accept_key(key).lower() not in head.lower():
        print("bad Sec-WebSocket-Accept from the server", file=sys.stderr)
        return 1
    print(f"connected: {status_line}")
    reader = wsframes.FrameReader()
    sock.sendall(wsframes.encode(wsframes.TEXT, args.message.encode(), mask=True))
    messages = reader.feed(rest)
    while not messages:
        messages = reader.feed(sock.recv(65536))
    print(f"received: {messages[0].payload.decode(errors='replace')}")
    sock.sendall(wsframes.encode(wsframes.CLOSE, wsframes.close_payload(1000, "done"), mask=True))
    closing: list = []
    while not any(m.opcode == wsframes.CLOSE for m in closing):
        chunk = sock.recv(65536)
        if not chunk:
            break
        closing = reader.feed(chunk)
    code = next((int.from_bytes(m.payload[:2], "big") for m in closing if m.opcode == wsframes.CLOSE), None)
    print(f"closed: {code}")
    sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
