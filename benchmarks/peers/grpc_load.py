#!/usr/bin/env python3
"""gRPC load generator for benchmarks/run_grpc.py: a stock grpc.aio client, N calls in flight for a fixed time.

    python benchmarks/peers/grpc_load.py --target 127.0.0.1:P [--authority A] [--key K]
        --mode unary|stream --concurrency N --duration S [--warmup S] [--stream-count C --stream-size B]

Prints one JSON object: calls, calls_per_s, messages, messages_per_s, p50_ms, p99_ms, errors (by status name).
One channel (one HTTP/2 connection), as a gRPC client normally has.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import grpc
from grpc import aio

REQUEST = b"hello world 1234"  # 16 bytes


async def run(args: argparse.Namespace) -> dict:
    options = [("grpc.default_authority", args.authority)] if args.authority else []
    metadata = (("authorization", f"Api-Key {args.key}"),) if args.key else ()
    async with aio.insecure_channel(args.target, options=options) as channel:
        say = channel.unary_unary("/bench.Echo/Say")
        stream = channel.unary_stream("/bench.Echo/Stream")
        stream_request = f"{args.stream_count}:{args.stream_size}".encode()
        latencies: list[float] = []
        errors: dict[str, int] = {}
        messages = 0
        measuring = False

        async def one() -> None:
            nonlocal messages
            started = time.perf_counter()
            try:
                if args.mode == "unary":
                    await say(REQUEST, metadata=metadata, timeout=30)
                    received = 1
                else:
                    received = 0
                    async for _ in stream(stream_request, metadata=metadata, timeout=60):
                        received += 1
            except grpc.RpcError as error:
                code = error.code() if isinstance(error, grpc.Call) else None
                name = code.name if code is not None else "UNKNOWN"
                errors[name] = errors.get(name, 0) + 1
                return
            if measuring:
                latencies.append(time.perf_counter() - started)
                messages += received

        async def worker(stop: float) -> None:
            while time.perf_counter() < stop:
                await one()

        await one()  # connect
        if args.warmup > 0:
            await asyncio.gather(*(worker(time.perf_counter() + args.warmup) for _ in range(args.concurrency)))
        errors.clear()
        measuring = True
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(t0 + args.duration) for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - t0
    latencies.sort()

    def pct(p: float) -> float | None:
        return round(latencies[min(len(latencies) - 1, int(len(latencies) * p))] * 1000, 3) if latencies else None

    return {
        "calls": len(latencies),
        "calls_per_s": round(len(latencies) / elapsed, 1),
        "messages": messages,
        "messages_per_s": round(messages / elapsed, 1),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "errors": errors,
        "elapsed_s": round(elapsed, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--authority", default=None)
    ap.add_argument("--key", default=None)
    ap.add_argument("--mode", choices=("unary", "stream"), default="unary")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--stream-count", type=int, default=1000)
    ap.add_argument("--stream-size", type=int, default=64)
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
