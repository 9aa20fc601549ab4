"""The ASGI 3 application: lifespan runs the data plane of `gateway.runner`, calls go to its handler.

Startup builds exactly what `gateway serve` builds (`runner.Gateway` with `embedded=True`: the
table, the call pipeline, the pool, the async queue and, with an admin port, the control plane and
its admin listener) but binds no public socket and installs no signal handlers: the ASGI server
owns both. Shutdown drains as SIGTERM does natively.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

from gateway.asgi.connection import AsgiConnection
from gateway.asgi.websocket import AsgiWebSocket
from gateway.errors import ModelUnavailable
from gateway.runner import Gateway, ServeOptions, check_options

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
CONFIG_ENV = "GATEWAY_CONFIG"  # SPEC §12
ADMIN_PORT_ENV = "GATEWAY_ADMIN_PORT"  # the admin listener of `gateway.asgi:app` (off when unset)
ADMIN_HOST_ENV = "GATEWAY_ADMIN_HOST"
ADMIN_TOKEN_ENV = "GATEWAY_ADMIN_TOKEN"  # as for `gateway serve`


class GatewayApp:
    """An ASGI 3 app serving the public API (HTTP and WebSocket) of one gateway per process.

    `options` are `gateway serve`'s (`runner.ServeOptions`); `None` reads them from the environment
    at startup (`gateway.asgi:app`). The admin API is served on its own listener, as natively, only
    when an admin port is given: it is never mixed into the public path space.
    """

    def __init__(self, options: ServeOptions | None = None) -> None:
        self.options = options
        self.gateway: Gateway | None = None

    def __repr__(self) -> str:
        return f"<GatewayApp {self.gateway!r}>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self.lifespan(receive, send)
            return
        gateway = self.gateway
        if kind == "http":
            conn = AsgiConnection(scope, receive, send, self.handler(), self.tracker())
        elif kind == "websocket":
            conn = AsgiWebSocket(scope, receive, send, self.handler(), self.tracker())
        else:
            raise ValueError(f"unsupported ASGI scope type {kind!r}")
        if gateway is None:
            conn.refuse(ModelUnavailable("the gateway has not started: run the ASGI server with lifespan on"))
        await conn.run()

    def handler(self) -> Callable:
        public = self.gateway.data.public if self.gateway is not None else None
        return public if public is not None else _unstarted

    def tracker(self) -> set | None:
        return self.gateway.data.connections if self.gateway is not None else None

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as error:  # a bad table or option: the server reports it and exits
                    await send({"type": "lifespan.startup.failed", "message": f"gateway: {error}"})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Start and drain with a host app's lifespan (Starlette does not pass lifespan to a Mount):
        `Starlette(routes=[Mount("/gw", gw)], lifespan=lambda app: gw.running())`."""
        await self.startup()
        try:
            yield None  # a lifespan state would be merged into the host's: the gateway adds none
        finally:
            await self.shutdown()

    async def startup(self) -> None:
        opts = self.options if self.options is not None else options_from_environment()
        check_options(opts)
        gateway = Gateway(opts)
        await gateway.start()
        self.gateway = gateway

    async def shutdown(self) -> None:
        gateway, self.gateway = self.gateway, None
        if gateway is not None:
            await gateway.drain()


def _unstarted(req: Any) -> None:  # replaced by `refuse` before it could run
    raise RuntimeError("the gateway has not started")


def options_from_environment() -> ServeOptions:
    config = os.environ.get(CONFIG_ENV)
    if not config:
        raise ValueError(f"set {CONFIG_ENV} to the routing table's path (or use gateway.asgi.create_app)")
    port = os.environ.get(ADMIN_PORT_ENV)
    if port is not None and not port.isdigit():
        raise ValueError(f"{ADMIN_PORT_ENV} must be a port number, not {port!r}")
    return embedded_options(
        config,
        admin_port=int(port) if port else None,
        admin_host=os.environ.get(ADMIN_HOST_ENV, "127.0.0.1"),
        admin_token=os.environ.get(ADMIN_TOKEN_ENV) or None,
    )


def embedded_options(config_path: str, **options: Any) -> ServeOptions:
    return ServeOptions(config=str(config_path), embedded=True, **{"admin_port": None, **options})


def create_app(config_path: str | os.PathLike, **options: Any) -> GatewayApp:
    """An ASGI app over the table at `config_path`; `options` are `runner.ServeOptions` fields
    (`admin_port=9090` for the admin listener, `store=`, `queue_store=`, `drain_timeout=`, ...)."""
    return GatewayApp(embedded_options(str(config_path), **options))


app = GatewayApp()  # `uvicorn gateway.asgi:app` with GATEWAY_CONFIG set (SPEC §12)
