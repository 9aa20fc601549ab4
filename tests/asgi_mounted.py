"""A platform team's own Starlette app with the gateway mounted under /gw behind its own ASGI
middleware (tests/test_asgi.py runs it under uvicorn: `uvicorn tests.asgi_mounted:app`)."""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from gateway.asgi import create_app


class PlatformHeader:
    """Pure ASGI middleware: stamps every HTTP answer with `x-platform: <calls seen>`."""

    def __init__(self, app) -> None:  # noqa: ANN001
        self.app = app
        self.calls = 0

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.calls += 1
        seen = str(self.calls).encode()

        async def stamped(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (b"x-platform", seen)]}
            await send(message)

        await self.app(scope, receive, stamped)


async def platform_health(request) -> PlainTextResponse:  # noqa: ANN001
    return PlainTextResponse("platform ok")


gateway = create_app(os.environ["GATEWAY_CONFIG"], admin_port=int(os.environ["GATEWAY_ADMIN_PORT"]))
app = PlatformHeader(
    Starlette(
        routes=[Route("/platform/health", platform_health), Mount("/gw", app=gateway)],
        lifespan=lambda app: gateway.running(),
    )
)
