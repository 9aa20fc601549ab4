"""The demo's webhook receiver (SPEC §10): checks both signature schemes on every delivery.

`POST /webhook` verifies `X-BASETEN-SIGNATURE` and the Standard Webhooks headers with the demo's
secret and prints what arrived; `GET /last` answers the last delivered request id (waiting up to
10 s for a first one), so a printed command can ask the gateway for that request's status.
"""

from __future__ import annotations

import asyncio
import json

from gateway.asyncq.webhook import verify_baseten, verify_standard
from gateway.http.server import Request, async_handler, serve

DEMO_SECRET_ENV = "GATEWAY_DEMO_WEBHOOK_SECRET"
DEMO_SECRET = "whsec_ZGVtby13ZWJob29rLXNlY3JldA=="  # base64 of "demo-webhook-secret"


class WebhookReceiver:
    def __init__(self, secret: str) -> None:
        self.secret = secret.encode()
        self.last: str | None = None
        self.arrived = asyncio.Event()
        self.server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int) -> int:
        self.server = await serve(async_handler(self.handle), host, port)
        return self.server.sockets[0].getsockname()[1]

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def handle(self, req: Request) -> None:
        path = req.target.partition("?")[0]
        body = await req.body.read_all(16 * 1024 * 1024)
        if path == "/last" and req.method == "GET":
            try:
                await asyncio.wait_for(self.arrived.wait(), 10)
            except TimeoutError:
                req.conn.send_simple(404, b'{"error": "no webhook has arrived yet"}')
                return
            req.conn.send_simple(200, (self.last or "").encode(), content_type=b"text/plain")
            return
        if path != "/webhook" or req.method != "POST":
            req.conn.send_simple(404, b'{"error": "POST /webhook"}')
            return
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in req.headers}
        baseten = verify_baseten(body, headers.get("x-baseten-signature", ""), self.secret)
        standard = verify_standard(body, headers, self.secret)
        try:
            doc = json.loads(body)
        except ValueError:
            doc = {}
        print(
            f"[webhook receiver] {doc.get('request_id')}: errors={doc.get('errors')} data={json.dumps(doc.get('data'))[:80]}"
            f" | X-BASETEN-SIGNATURE {'valid' if baseten else 'INVALID'}, "
            f"webhook-signature {'valid' if standard else 'INVALID'}",
            flush=True,
        )
        if not (baseten and standard):
            req.conn.send_simple(401, b'{"error": "bad signature"}')
            return
        self.last = doc.get("request_id")
        self.arrived.set()
        req.conn.send_simple(200, b'{"ok": true}')
