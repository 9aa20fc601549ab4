"""A WebSocket echo plane for benchmarks/run_ws.py: `python ws_echo_plane.py PORT`."""

from __future__ import annotations

import asyncio
import sys

from websockets.asyncio.server import ServerConnection, serve


async def echo(ws: ServerConnection) -> None:
    async for message in ws:
        await ws.send(message)


async def main(port: int) -> None:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        pass
    async with serve(echo, "127.0.0.1", port, max_size=None, compression=None):
        await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
