#!/usr/bin/env python3
"""A gRPC plane for benchmarks/run_grpc.py: a grpc.aio server relaying raw bytes (no protobuf schema).

    /bench.Echo/Say      unary: the request message back
    /bench.Echo/Stream   server streaming: request b"<count>:<size>" -> count messages of size bytes

Run: python benchmarks/peers/grpc_plane.py --port P
"""

from __future__ import annotations

import argparse
import asyncio

import grpc
from grpc import aio


async def say(request: bytes, context: aio.ServicerContext) -> bytes:
    return request


async def stream(request: bytes, context: aio.ServicerContext):
    count, _, size = request.partition(b":")
    message = b"m" * int(size)
    for _ in range(int(count)):
        yield message


HANDLERS = {
    "Say": grpc.unary_unary_rpc_method_handler(say),
    "Stream": grpc.unary_stream_rpc_method_handler(stream),
}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    server = aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Echo", HANDLERS),))
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    await server.start()
    print(f"grpc plane on 127.0.0.1:{args.port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
