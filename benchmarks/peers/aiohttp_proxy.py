"""Plain aiohttp reverse proxy: the "hand-written Python proxy" baseline for run_http.py.

Every request is forwarded (method, path + query, body, headers minus hop-by-hop) to --upstream with
one shared aiohttp.ClientSession; the upstream's status, headers (minus hop-by-hop) and body are
returned. Bodies are read whole (this is the simple baseline, not a streaming proxy).

    python benchmarks/peers/aiohttp_proxy.py --port 8001 --upstream http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
from aiohttp import web

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
}
# Recomputed by the client/server library on each side.
DROP_REQUEST = HOP_BY_HOP | {"host", "content-length"}
DROP_RESPONSE = HOP_BY_HOP | {"content-length", "date", "server"}


def _filter(headers, drop):
    conn_tokens = {t.strip().lower() for v in headers.getall("connection", []) for t in v.split(",")}
    return [(k, v) for k, v in headers.items() if k.lower() not in drop and k.lower() not in conn_tokens]


def make_app(upstream: str) -> web.Application:
    upstream = upstream.rstrip("/")
    app = web.Application()

    async def on_startup(app):
        app["session"] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=300),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
        )

    async def on_cleanup(app):
        await app["session"].close()

    async def proxy(request: web.Request) -> web.Response:
        body = await request.read()
        session: aiohttp.ClientSession = request.app["session"]
        try:
            async with session.request(
                request.method,
                upstream + request.raw_path,
                data=body or None,
                headers=_filter(request.headers, DROP_REQUEST),
                allow_redirects=False,
            ) as r:
                data = await r.read()
                return web.Response(status=r.status, body=data, headers=_filter(r.headers, DROP_RESPONSE))
        except aiohttp.ClientConnectionError as e:
            return web.Response(status=502, text=f"upstream error: {e}\n")

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


async def serve(host: str, port: int, upstream: str) -> None:
    runner = web.AppRunner(make_app(upstream), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096)
    await site.start()
    print(f"aiohttp proxy on http://{host}:{port} -> {upstream}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True)
    args = ap.parse_args()
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run  # type: ignore[assignment]
    try:
        run(serve(args.host, args.port, args.upstream))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
