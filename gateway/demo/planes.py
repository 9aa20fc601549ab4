"""Sample workload planes for `gateway demo`: a JSON model, an SSE token stream, a wake hook.

A plane serves every model it hosts on one address and tells them apart by the
identity headers the gateway sets (SPEC §4). It is a real HTTP/1.1 server (the
gateway's own server class) so the demo exercises real sockets end to end.

`python -m gateway.demo.planes --name N --region R` runs one on its own (deploy/fleet/'s planes).
"""

from __future__ import annotations

import argparse
import asyncio
import json

from gateway.http import wsframes
from gateway.http.server import Request, async_handler, serve

STREAMING_MODELS = frozenset({"llm7"})
TOKENS = "Once upon a time a gateway kept every token inside its region and streamed it on the spot .".split()


class SamplePlane:
    def __init__(self, name: str, region: str, token_interval: float = 0.05) -> None:
        self.name = name
        self.region = region
        self.token_interval = token_interval
        self.wakes: list[dict] = []
        self.server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int) -> int:
        self.server = await serve(async_handler(self.handle), host, port)
        return self.server.sockets[0].getsockname()[1]

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    def identity(self, req: Request) -> dict:
        h = {k.decode(): v.decode("latin-1") for k, v in req.headers}
        return {
            "model_id": h.get("x-baseten-model-id"),
            "environment": h.get("x-baseten-environment"),
            "deployment_id": h.get("x-baseten-deployment-id"),
            "request_id": h.get("x-baseten-request-id"),
            "plane": self.name,
            "region": self.region,
        }

    async def handle(self, req: Request) -> None:
        who = self.identity(req)
        path = req.target.partition("?")[0]
        if path == "/websocket" and req.upgrade is not None:
            return await self._websocket(req, who)
        body = await req.body.read_all(8 * 1024 * 1024)
        if path == "/wake" and req.method == "POST":
            self.wakes.append(who)
            return self._json(req, 200, {"status": "waking", **who})
        if path in ("/predict", "/run_remote") and req.method == "POST":
            try:
                model_input = json.loads(body or b"{}")
            except ValueError:
                return self._json(req, 400, {"error": "body must be JSON"})
            if who["model_id"] in STREAMING_MODELS:
                return await self._stream(req, model_input, who)
            return self._json(req, 200, {**who, "output": {"echo": model_input, "length": len(body)}})
        if path == "/v1/models" and req.method == "GET":
            return self._json(req, 200, {"object": "list", "data": [{"id": who["model_id"], "object": "model"}]})
        return self._json(req, 404, {"error": f"the sample plane has no route {req.method} {path}"})

    def _json(self, req: Request, status: int, obj: dict) -> None:
        req.conn.send_simple(status, json.dumps(obj).encode() + b"\n")

    async def _stream(self, req: Request, model_input: dict, who: dict) -> None:
        """Server-sent events, one token per event, each written as its own chunk."""
        count = min(int(model_input.get("max_tokens", 12)), len(TOKENS)) if isinstance(model_input, dict) else 12
        conn = req.conn
        conn.response_started = True
        conn.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        for i in range(count):
            await asyncio.sleep(self.token_interval)
            event = b"data: %s\n\n" % json.dumps({"index": i, "token": TOKENS[i], "region": who["region"]}).encode()
            conn.write(b"%x\r\n%s\r\n" % (len(event), event))
        done = b"data: [DONE]\n\n"
        conn.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))

    async def _websocket(self, req: Request, who: dict) -> None:
        """The WebSocket echo model: echoes text (tagged with where it ran) and binary, answers pings."""
        key = req.header(b"sec-websocket-key")
        if key is None:
            return self._json(req, 400, {"error": "missing Sec-WebSocket-Key"})
        conn = req.conn
        conn.response_started = True
        conn.write(
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
            b"sec-websocket-accept: %s\r\n\r\n" % wsframes.accept_key(key)
        )
        reader = wsframes.FrameReader()
        tag = f"echo from {who['deployment_id']} on {self.name} ({self.region}): "

        def on_bytes(data: bytes) -> None:
            for msg in reader.feed(data):
                if msg.opcode == wsframes.TEXT:
                    conn.write(wsframes.encode(wsframes.TEXT, tag.encode() + msg.payload, mask=False))
                elif msg.opcode == wsframes.BINARY:
                    conn.write(wsframes.encode(wsframes.BINARY, msg.payload, mask=False))
                elif msg.opcode == wsframes.PING:
                    conn.write(wsframes.encode(wsframes.PONG, msg.payload, mask=False))
                elif msg.opcode == wsframes.CLOSE:
                    conn.write(wsframes.encode(wsframes.CLOSE, msg.payload[:125], mask=False))
                    conn.close()
                    return

        ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def lost() -> None:
            if not ended.done():
                ended.set_result(None)

        conn.on_lost = lost
        conn.start_tunnel(on_bytes)
        await ended  # the session lives until either side closes the connection


def main(argv: list[str] | None = None) -> None:
    """One sample plane in the foreground (deploy/fleet/compose.yaml runs two from the gateway image)."""
    p = argparse.ArgumentParser(prog="python -m gateway.demo.planes", description="one sample plane")
    p.add_argument("--name", required=True, help="the plane's name, as in the table")
    p.add_argument("--region", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--token-interval", type=float, default=0.05, help="seconds between streamed tokens")
    args = p.parse_args(argv)

    async def run() -> None:
        plane = SamplePlane(args.name, args.region, args.token_interval)
        port = await plane.start(args.host, args.port)
        print(f"sample plane {args.name} (region {args.region}) on {args.host}:{port}", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
