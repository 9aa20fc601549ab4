"""A replica "plane" for benchmarks/soak.py: `python soak_plane.py PORT [RID_LOG]`.

aiohttp on uvloop, 127.0.0.1 only:
- `POST /predict` answers a small JSON after a random delay of 0..20 ms (the request header
  `x-soak-max-delay-ms` changes the upper bound; 0 answers at once);
- `POST /stream` answers 20 chunks, 10 ms apart (chunked);
- `GET /health` answers 200.

Every answer carries `x-soak-replica: <pid>`, so a client can tell which replica process served it,
and `x-soak-deployment`: the `x-baseten-deployment-id` the gateway sent (v1, or the canary v2).
With RID_LOG, the `x-baseten-request-id` of every call is appended to that file when the call
arrives (one unbuffered write each), so it survives a SIGKILL: the soak script reads it afterwards
to tell whether a failed call had reached the replica that was killed.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys

from aiohttp import web

STREAM_CHUNKS = 20
STREAM_INTERVAL_S = 0.010
DEFAULT_MAX_DELAY_MS = 20.0

REPLICA = str(os.getpid())
HEADERS = {"x-soak-replica": REPLICA}


def headers(request: web.Request) -> dict[str, str]:
    return {**HEADERS, "x-soak-deployment": request.headers.get("x-baseten-deployment-id", "-")}


class RidLog:
    def __init__(self, path: str | None) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if path else None

    def record(self, request: web.Request) -> None:
        if self.fd is not None:
            rid = request.headers.get("x-baseten-request-id", "-")
            os.write(self.fd, f"{rid}\n".encode())


def make_app(rids: RidLog) -> web.Application:
    async def predict(request: web.Request) -> web.Response:
        rids.record(request)
        await request.read()
        max_ms = float(request.headers.get("x-soak-max-delay-ms", DEFAULT_MAX_DELAY_MS))
        if max_ms > 0:
            await asyncio.sleep(random.uniform(0, max_ms) / 1000)
        return web.json_response({"replica": REPLICA, "output": [1, 2, 3]}, headers=headers(request))

    async def stream(request: web.Request) -> web.StreamResponse:
        rids.record(request)
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/plain", **headers(request)})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(STREAM_CHUNKS):
            if i:
                await asyncio.sleep(STREAM_INTERVAL_S)
            await resp.write(b"chunk %02d\n" % i)
        await resp.write_eof()
        return resp

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "replica": REPLICA}, headers=HEADERS)

    app = web.Application()
    app.router.add_post("/predict", predict)
    app.router.add_post("/stream", stream)
    app.router.add_get("/health", health)
    return app


async def serve(port: int, rid_log: str | None) -> None:
    runner = web.AppRunner(make_app(RidLog(rid_log)), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=4096)
    await site.start()
    print(f"soak plane {REPLICA} on http://127.0.0.1:{port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: soak_plane.py PORT [RID_LOG]")
    port = int(sys.argv[1])
    rid_log = sys.argv[2] if len(sys.argv) == 3 else None
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run  # type: ignore[assignment]
    try:
        run(serve(port, rid_log))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
