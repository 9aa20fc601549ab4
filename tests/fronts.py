"""The public front ends a gateway can run behind, as real server processes on 127.0.0.1 (issue 13).

`native` is `gateway serve`; `uvicorn`, `hypercorn` and `granian` run `gateway.asgi:app`
(GATEWAY_CONFIG) with the admin listener on (GATEWAY_ADMIN_PORT), so the same tests drive all four
through the same public port and the same admin reload, /readyz and /metrics.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.support import GatewayProcess

FRONTS = ("native", "uvicorn", "hypercorn", "granian")


class AsgiProcess(GatewayProcess):
    """`gateway.asgi:app` under an ASGI server; ready when its admin listener's /readyz says so."""

    def __init__(
        self, config: Path, server: str, *extra: str, env: dict | None = None, app: str = "gateway.asgi:app"
    ) -> None:  # fmt: skip
        super().__init__(config, *extra, env=env)
        self.server, self.app = server, app
        self.env = {**(env or {}), "GATEWAY_CONFIG": str(config), "GATEWAY_ADMIN_PORT": str(self.admin_port)}

    def command(self) -> list[str]:
        if self.server == "uvicorn":
            return [sys.executable, "-m", "uvicorn", self.app, "--host", "127.0.0.1", "--port",
                    str(self.port), "--lifespan", "on", "--no-access-log", "--no-proxy-headers", *self.extra]  # fmt: skip
        if self.server == "hypercorn":
            return [sys.executable, "-m", "hypercorn", self.app, "--bind", f"127.0.0.1:{self.port}",
                    *self.extra]  # fmt: skip
        if self.server == "granian":  # one worker; its Rust HTTP stack, the app on its asyncio loop
            return [sys.executable, "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1", "--port",
                    str(self.port), "--workers", "1", "--no-access-log", self.app, *self.extra]  # fmt: skip
        raise ValueError(f"unknown ASGI server {self.server!r}")


def front_process(front: str, config: Path, *extra: str, env: dict | None = None) -> GatewayProcess:
    if front == "native":
        return GatewayProcess(config, *extra, env=env)
    return AsgiProcess(config, front, *extra, env=env)


@contextlib.contextmanager
def running_front(front: str, config: Path, *extra: str, env: dict | None = None) -> Iterator[GatewayProcess]:
    gw = front_process(front, config, *extra, env=env).start()
    try:
        yield gw
    finally:
        gw.stop()
