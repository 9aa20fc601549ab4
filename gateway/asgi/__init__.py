"""The ASGI front end (issue 13, SPEC §12): the same pipeline, pool and table under any ASGI server.

`gateway.asgi:app` reads its table from `GATEWAY_CONFIG`; `create_app(config_path)` builds one for
a platform team's own Starlette/FastAPI app or ASGI middleware stack. See README "ASGI front end".
"""

from gateway.asgi.app import GatewayApp, app, create_app

__all__ = ["GatewayApp", "app", "create_app"]
