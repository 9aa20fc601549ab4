"""The "obvious" Starlette + httpx reverse proxy, served by uvicorn (one worker, uvloop + httptools).

A baseline for run_http.py: read the request body, forward it with a shared httpx.AsyncClient,
return the upstream's status, headers (minus hop-by-hop) and body.

    python benchmarks/peers/starlette_httpx_proxy.py --port 8002 --upstream http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import contextlib

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

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
DROP_REQUEST = HOP_BY_HOP | {"host", "content-length"}
DROP_RESPONSE = HOP_BY_HOP | {"content-length", "date", "server"}


def _filter(headers, drop):
    return {k: v for k, v in headers.items() if k.lower() not in drop}


def make_app(upstream: str) -> Starlette:
    state = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        # Generous pool limits so the proxy does not churn connections at 32 concurrent callers.
        state["client"] = httpx.AsyncClient(
            base_url=upstream.rstrip("/"),
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=1000),
            timeout=httpx.Timeout(None, connect=5.0),
        )
        try:
            yield
        finally:
            await state["client"].aclose()

    async def proxy(request: Request) -> Response:
        client: httpx.AsyncClient = state["client"]
        body = await request.body()
        url = request.url.path
        if request.url.query:
            url += "?" + request.url.query
        try:
            r = await client.request(request.method, url, content=body, headers=_filter(request.headers, DROP_REQUEST))
        except httpx.TransportError as e:
            return Response(f"upstream error: {e}\n", status_code=502)
        return Response(content=r.content, status_code=r.status_code, headers=_filter(r.headers, DROP_RESPONSE))

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", proxy, methods=methods)], lifespan=lifespan)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True)
    args = ap.parse_args()
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    try:
        import httptools  # noqa: F401

        http = "httptools"
    except ImportError:
        http = "h11"
    uvicorn.run(
        make_app(args.upstream),
        host=args.host,
        port=args.port,
        workers=1,
        loop=loop,
        http=http,
        access_log=False,
        log_level="warning",
        backlog=4096,
    )


if __name__ == "__main__":
    main()
