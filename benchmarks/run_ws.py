#!/usr/bin/env python3
"""WebSocket relay benchmark: echo round-trip latency and messages/s, direct vs through the gateway.

Run from the repo root: `.venv/bin/python benchmarks/run_ws.py [--quick]`.

The plane is a `websockets` echo server (peers/ws_echo_plane.py). The client is a `websockets`
client in this process. Latency: one connection, sequential round trips of a 32-byte text message.
Throughput: 8 connections each doing sequential round trips for a fixed time. Goal (issue 3):
WebSocket round-trip overhead through the gateway under 0.3 ms at p50.
Writes benchmarks/results/ws-latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as H  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402

GOAL_MS = 0.3
MESSAGE = "x" * 32


async def open_ws(port: int, via_gateway: bool):
    sock = socket.create_connection(("127.0.0.1", port))
    if via_gateway:
        uri = f"ws://model-{H.MODEL_ID}.{H.DOMAIN}/production/websocket"
        headers = {"Authorization": f"Api-Key {H.API_KEY}"}
    else:
        uri, headers = "ws://127.0.0.1/websocket", {}
    return await connect(uri, sock=sock, additional_headers=headers, compression=None, max_size=None)


async def latency(port: int, via_gateway: bool, count: int) -> list[float]:
    ws = await open_ws(port, via_gateway)
    samples = []
    for i in range(count + 200):
        started = time.perf_counter()
        await ws.send(MESSAGE)
        await ws.recv()
        if i >= 200:  # the first 200 warm up
            samples.append((time.perf_counter() - started) * 1e3)
    await ws.close()
    return samples


async def throughput(port: int, via_gateway: bool, conns: int, seconds: float) -> float:
    sockets = [await open_ws(port, via_gateway) for _ in range(conns)]
    deadline = time.perf_counter() + seconds
    counts = [0] * conns

    async def loop(i: int) -> None:
        ws = sockets[i]
        while time.perf_counter() < deadline:
            await ws.send(MESSAGE)
            await ws.recv()
            counts[i] += 1

    started = time.perf_counter()
    await asyncio.gather(*(loop(i) for i in range(conns)))
    elapsed = time.perf_counter() - started
    for ws in sockets:
        await ws.close()
    return sum(counts) / elapsed


def pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


def main() -> int:
    parser = argparse.ArgumentParser(description="WebSocket relay benchmark")
    parser.add_argument("--quick", action="store_true", help="fewer round trips, 3 s throughput runs")
    parser.add_argument("--count", type=int, default=5000, help="sequential round trips for latency")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per throughput run")
    args = parser.parse_args()
    if args.quick:
        args.count, args.duration = 1500, 3.0
    H.install_signal_handlers()
    python = sys.executable
    results: dict[str, dict] = {}
    with H.Procs() as procs:
        port = H.free_port()
        plane = procs.start("ws-plane", [python, str(H.BENCH_DIR / "peers" / "ws_echo_plane.py"), str(port)])
        H.wait_ready(plane, port, ok=lambda s: s in (400, 426), timeout=15)
        _, gw_port = H.start_gateway(procs, python, f"http://127.0.0.1:{port}")
        for name, target, via in (("direct", port, False), ("gateway", gw_port, True)):
            H.log(f"[{name}] {args.count} sequential round trips, then 8 connections for {args.duration:g} s")
            samples = asyncio.run(latency(target, via, args.count))
            rate = asyncio.run(throughput(target, via, 8, args.duration))
            results[name] = {
                "p50_ms": statistics.median(samples), "p99_ms": pct(samples, 99), "msgs_per_s": rate,
            }  # fmt: skip
    print(f"\nWebSocket echo: {args.count} round trips of {len(MESSAGE)} B (1 conn); msgs/s over 8 conns\n")
    print(f"{'path':8} | {'p50 ms':>8} | {'p99 ms':>8} | {'round trips/s (8 conns)':>24}")
    print("-" * 58)
    for name, r in results.items():
        print(f"{name:8} | {r['p50_ms']:8.3f} | {r['p99_ms']:8.3f} | {r['msgs_per_s']:24,.0f}")
    overhead = results["gateway"]["p50_ms"] - results["direct"]["p50_ms"]
    ratio = results["gateway"]["msgs_per_s"] / results["direct"]["msgs_per_s"]
    verdict = "goal met" if overhead < GOAL_MS else "goal missed"
    print(f"\ngateway round-trip overhead p50 (ms)  {overhead:.3f}   goal < {GOAL_MS}   {verdict}")
    print(f"gateway / direct round trips/s         {ratio:.2f}")
    out = H.BENCH_DIR / "results" / "ws-latest.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"results": results, "overhead_p50_ms": overhead, "ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
