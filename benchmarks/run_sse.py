#!/usr/bin/env python3
"""SSE relay-delay benchmark: how long after the plane writes a chunk does the client get it?

Run from the repo root:

    /work/venv/bin/python benchmarks/run_sse.py
    /work/venv/bin/python benchmarks/run_sse.py --skip-gateway

A plane (benchmarks/peers/sse_plane.py) answers POST /predict with N events 5 ms apart, each carrying
the CLOCK_MONOTONIC time (ns) at which it was written. The client here is a raw asyncio Protocol that
stamps each received TCP read in data_received() and decodes HTTP/1.1 chunked encoding by hand, so
it adds as little as possible. delay = receive_ns - send_ns per event, measured directly against the
plane and through the gateway. Goal: every chunk relayed within 1 ms of the plane sending it.
Writes benchmarks/results/sse-latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as H  # noqa: E402

GOAL_MS = 1.0


class SSEResponse(asyncio.Protocol):
    """Reads one HTTP/1.1 response at a time; records (receive_ns, send_ns) per SSE event."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self.reset()

    def reset(self) -> None:
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()
        self.raw = bytearray()  # undecoded bytes
        self.state = "head"
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.remaining = 0  # bytes left in the current chunk / content-length body
        self.body = bytearray()  # decoded body bytes not yet split into events
        self.error_body = bytearray()
        self.samples: list[tuple[int, int]] = []

    # -- asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)
        if not self.done.done():
            if self.state == "close-delimited":
                self._finish()
            else:
                self.done.set_exception(ConnectionError(f"connection lost in state {self.state}: {exc}"))

    def data_received(self, data: bytes) -> None:
        t = time.monotonic_ns()
        self.raw += data
        try:
            self._parse(t)
        except Exception as e:  # noqa: BLE001
            if not self.done.done():
                self.done.set_exception(e)

    # -- parsing
    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def _parse(self, t: int) -> None:
        while True:
            if self.state == "head":
                end = self.raw.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(self.raw[:end]).decode("latin-1").split("\r\n")
                del self.raw[: end + 4]
                self.status = int(head[0].split()[1])
                for line in head[1:]:
                    k, _, v = line.partition(":")
                    self.headers[k.strip().lower()] = v.strip()
                if "chunked" in self.headers.get("transfer-encoding", "").lower():
                    self.state = "size"
                elif "content-length" in self.headers:
                    self.remaining = int(self.headers["content-length"])
                    self.state = "length"
                else:
                    self.state = "close-delimited"
            elif self.state == "size":
                end = self.raw.find(b"\r\n")
                if end < 0:
                    return
                size = int(bytes(self.raw[:end]).split(b";")[0].strip(), 16)
                del self.raw[: end + 2]
                if size == 0:
                    self.state = "trailers"
                else:
                    self.remaining = size
                    self.state = "data"
            elif self.state == "data":
                if not self.raw:
                    return
                take = min(self.remaining, len(self.raw))
                self._body(bytes(self.raw[:take]), t)
                del self.raw[:take]
                self.remaining -= take
                if self.remaining == 0:
                    self.state = "data-crlf"
            elif self.state == "data-crlf":
                if len(self.raw) < 2:
                    return
                if self.raw[:2] != b"\r\n":
                    raise ValueError("bad chunk terminator")
                del self.raw[:2]
                self.state = "size"
            elif self.state == "trailers":
                end = self.raw.find(b"\r\n")
                if end < 0:
                    return
                trailer = bytes(self.raw[:end])
                del self.raw[: end + 2]
                if not trailer:
                    self.state = "complete"
                    self._finish()
                    return
            elif self.state == "length":
                take = min(self.remaining, len(self.raw))
                self._body(bytes(self.raw[:take]), t)
                del self.raw[:take]
                self.remaining -= take
                if self.remaining == 0:
                    self.state = "complete"
                    self._finish()
                return
            elif self.state == "close-delimited":
                self._body(bytes(self.raw), t)
                self.raw.clear()
                return
            else:
                return

    def _body(self, data: bytes, t: int) -> None:
        if self.status != 200:
            self.error_body += data
            return
        self.body += data
        while True:
            end = self.body.find(b"\n\n")
            if end < 0:
                return
            event = bytes(self.body[:end])
            del self.body[: end + 2]
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    self.samples.append((t, int(line[5:].strip())))


async def run_streams(
    port: int, path: str, headers: dict[str, str], events: int, interval_ms: float, streams: int, warmup_events: int
) -> dict:
    loop = asyncio.get_running_loop()
    transport, proto = await asyncio.wait_for(loop.create_connection(SSEResponse, "127.0.0.1", port), timeout=5)
    delays_ns: list[int] = []
    problems: list[str] = []
    received = expected = 0
    try:
        plan = ([warmup_events] if warmup_events else []) + [events] * streams
        for i, n in enumerate(plan):
            is_warmup = warmup_events and i == 0
            if proto.closed.done():
                transport, proto = await asyncio.wait_for(
                    loop.create_connection(SSEResponse, "127.0.0.1", port), timeout=5
                )
            proto.reset()
            body = H.REQUEST_BODY
            req = (
                f"POST {path}?events={n}&interval_ms={interval_ms:g} HTTP/1.1\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                + f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body
            transport.write(req)
            await asyncio.wait_for(proto.done, timeout=n * interval_ms / 1000 + 15)
            if proto.status != 200:
                problems.append(f"HTTP {proto.status}: {bytes(proto.error_body[:300])!r}")
                break
            ctype = proto.headers.get("content-type", "")
            if not ctype.startswith("text/event-stream"):
                problems.append(f"unexpected content-type {ctype!r}")
            if is_warmup:
                continue
            expected += n
            received += len(proto.samples)
            delays_ns.extend(r - s for r, s in proto.samples)
            if proto.headers.get("connection", "").lower() == "close":
                transport.close()
    finally:
        transport.close()
    if received != expected:
        problems.append(f"received {received} of {expected} events")
    return {"delays_ns": delays_ns, "received": received, "expected": expected, "problems": problems}


def stats(delays_ns: list[int]) -> dict:
    if not delays_ns:
        return {"count": 0, "p50_ms": None, "p99_ms": None, "max_ms": None, "mean_ms": None, "over_goal": None}
    ms = sorted(d / 1e6 for d in delays_ns)

    def pct(p):
        return ms[min(len(ms) - 1, max(0, math.ceil(p / 100 * len(ms)) - 1))]  # nearest rank

    return {
        "count": len(ms),
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "max_ms": ms[-1],
        "min_ms": ms[0],
        "mean_ms": statistics.fmean(ms),
        "over_goal": sum(1 for v in ms if v > GOAL_MS),
    }


def _f(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


async def measure_all(args, procs: H.Procs, plane_port: int, gateway_skipped: bool) -> dict:
    results: dict[str, dict] = {}
    targets = [("direct", plane_port, H.DIRECT_PATH, {"Host": H.MODEL_HOST, "Content-Type": "application/json"})]
    if not gateway_skipped:
        try:
            _, gw_port = H.start_gateway(
                procs, args.python, f"http://127.0.0.1:{plane_port}", extra_args=args.gateway_arg
            )
            targets.append(("gateway", gw_port, H.GATEWAY_PATH, dict(H.REQUEST_HEADERS)))
        except H.StartupError as e:
            H.log(f"[gateway] failed to start: {e}")
            results["gateway"] = {"failed": f"start failed: {e}", **stats([])}
    for name, port, path, headers in targets:
        H.log(f"[{name}] {args.streams} stream(s) x {args.events} events, {args.interval_ms:g} ms apart")
        noise = H.CpuNoise({p.pid for p in procs.procs})
        try:
            r = await run_streams(port, path, headers, args.events, args.interval_ms, args.streams, args.warmup_events)
        except (TimeoutError, OSError, ConnectionError, ValueError) as e:
            results[name] = {"failed": f"{type(e).__name__}: {e}", **stats([])}
            continue
        results[name] = {
            **stats(r["delays_ns"]),
            "received": r["received"],
            "expected": r["expected"],
            "problems": r["problems"],
            "noise": noise.stop(),
        }
        if r["problems"]:
            results[name]["failed"] = "; ".join(r["problems"])
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=200, help="events per stream (default 200)")
    ap.add_argument("--interval-ms", type=float, default=5.0, help="gap between events (default 5)")
    ap.add_argument("--streams", type=int, default=3, help="measured streams per target (default 3)")
    ap.add_argument("--warmup-events", type=int, default=20, help="events in the unmeasured first stream")
    ap.add_argument("--quick", action="store_true", help="one measured stream per target")
    ap.add_argument("--skip-gateway", action="store_true")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--gateway-arg", action="append", default=[], help="extra argument for `gateway serve`")
    ap.add_argument("--output", default=str(H.RESULTS_DIR / "sse-latest.json"))
    ap.add_argument("--keep-tmp", action="store_true")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    if args.quick:
        args.streams = 1
    H.install_signal_handlers()

    gateway_skipped = args.skip_gateway
    if not gateway_skipped:
        problem = H.gateway_cli_problem(args.python)
        if problem:
            H.log(f"gateway not runnable: {problem}")

    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run  # type: ignore[assignment]

    with H.Procs(keep_tmp=args.keep_tmp) as procs:
        port = H.free_port()
        plane = procs.start("sse-plane", [args.python, str(H.PEERS_DIR / "sse_plane.py"), "--port", str(port)])
        try:
            H.wait_ready(plane, port, "GET", "/health", ok=lambda s: s == 200, timeout=20)
        except H.StartupError as e:
            H.log(f"cannot start the SSE plane: {e}")
            return 1
        H.log(f"SSE plane on 127.0.0.1:{port}")
        results = runner(measure_all(args, procs, port, gateway_skipped))

    print()
    print(
        f"SSE relay delay: {args.streams} stream(s) x {args.events} events, {args.interval_ms:g} ms apart, "
        f"{os.cpu_count()} CPUs"
    )
    print()
    hdr = f"{'path':<8} | {'events':>7} | {'p50 ms':>7} | {'p99 ms':>7} | {'max ms':>7} | {'> 1 ms':>6} | noise"
    print(hdr)
    print("-" * len(hdr))
    for name in ("direct", "gateway"):
        r = results.get(name)
        if r is None:
            continue
        print(
            f"{name:<8} | {r['count']:>7} | {_f(r['p50_ms']):>7} | {_f(r['p99_ms']):>7} | "
            f"{_f(r['max_ms']):>7} | {_f(r['over_goal'], 'd'):>6} | {H.noise_cell(r.get('noise'))}"
        )
    for name, r in results.items():
        if r.get("failed"):
            print(f"  ! {name}: {r['failed'][:300]}")
    if any(H.noise_cell(r.get("noise")) for r in results.values()):
        print("  ! noise: other processes (or the hypervisor) used CPU during the run; delays are unreliable")

    print()
    goals = []
    d, g = results.get("direct", {}), results.get("gateway", {})
    if gateway_skipped:
        print("gateway skipped: no added-delay numbers")
    elif g.get("count") and d.get("count"):
        added50 = g["p50_ms"] - d["p50_ms"]
        added99 = g["p99_ms"] - d["p99_ms"]
        clean = not g.get("failed")
        ok99 = g["p99_ms"] < GOAL_MS and clean
        okall = g["max_ms"] < GOAL_MS and clean
        print(f"gateway added delay p50 (ms)        {added50:8.3f}")
        print(f"gateway added delay p99 (ms)        {added99:8.3f}")
        print(
            f"gateway chunk delay p99 (ms)        {g['p99_ms']:8.3f}   goal < {GOAL_MS:g}   "
            f"{'goal met' if ok99 else 'goal missed'}"
        )
        print(
            f"gateway chunks within {GOAL_MS:g} ms          {g['count'] - g['over_goal']}/{g['count']}"
            f"   goal all    {'goal met' if okall else 'goal missed'}  (max {g['max_ms']:.3f} ms)"
        )
        goals = [
            {"label": "added_p50_ms", "value": added50},
            {"label": "added_p99_ms", "value": added99},
            {"label": "gateway_p99_ms", "value": g["p99_ms"], "ok": ok99, "goal": f"< {GOAL_MS}"},
            {
                "label": "gateway_all_chunks_within_goal",
                "value": g["count"] - g["over_goal"],
                "ok": okall,
                "goal": f"max < {GOAL_MS}",
            },
        ]
    else:
        print("gateway: no valid measurement (goal missed)")
        goals = [{"label": "gateway_p99_ms", "value": None, "ok": False}]

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "sse",
                "timestamp": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                "events": args.events,
                "interval_ms": args.interval_ms,
                "streams": args.streams,
                "gateway_skipped": gateway_skipped,
                "results": results,
                "goals": goals,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nresults written to {out}")
    return 1 if any(r.get("failed") for r in results.values()) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        H.log("interrupted; all started processes were stopped")
        sys.exit(130)
