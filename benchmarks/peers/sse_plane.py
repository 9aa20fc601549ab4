"""SSE "plane" for run_sse.py: POST /predict answers text/event-stream with timestamped events.

Each event is `data: <time.monotonic_ns() taken just before the write>\\n\\n`. CLOCK_MONOTONIC is
system-wide on Linux, so a client on the same machine can subtract it from its own receive time.

Query parameters: `events` (default 200), `interval_ms` (default 5). The response is chunked, one
event per chunk, written as soon as it is stamped (aiohttp sets TCP_NODELAY).

    python benchmarks/peers/sse_plane.py --port 9000
"""

from __future__ import annotations

import argparse
import asyncio
import time

from aiohttp import web


async def predict(request: web.Request) -> web.StreamResponse:
    await request.read()
    n = int(request.query.get("events", "200"))
    interval_ns = int(float(request.query.get("interval_ms", "5")) * 1_000_000)
    resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    start = time.monotonic_ns()
    for i in range(n):
        delay = (start + i * interval_ns - time.monotonic_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        await resp.write(b"data: %d\n\n" % time.monotonic_ns())
    await resp.write_eof()
    return resp


async def health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def serve(host: str, port: int) -> None:
    app = web.Application()
    app.router.add_post("/predict", predict)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=1024).start()
    print(f"SSE plane on http://{host}:{port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run  # type: ignore[assignment]
    try:
        run(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
