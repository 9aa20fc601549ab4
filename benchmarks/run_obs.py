#!/usr/bin/env python3
"""The cost of the access log and of tracing (issue 13), measured against the plain gateway in one run.

    .venv/bin/python benchmarks/run_obs.py                 # 3 rounds, 5 s per measurement, ~2 min
    .venv/bin/python benchmarks/run_obs.py --rounds 5 --duration 10
    .venv/bin/python benchmarks/run_obs.py --together --rounds 5   # the three under load at once

Three gateways (one worker each) in front of the same nginx plane (`direct` of run_http.py):
  plain       `gateway serve`
  access-log  `gateway serve --access-log FILE` (JSON lines to a file in the temp dir)
  otel-1%     `gateway serve --otel --otel-sample-ratio 0.01`, exporting OTLP/HTTP to a local sink
              that answers 200 to every POST (a collector that costs nothing)
Each round measures the three in a rotated order (plain/log/otel, log/otel/plain, ...), with wrk at
32 connections (the run_http.py load), so a slow drift of the machine favours none. Per round the
ratios to `plain` of the same round are taken; the medians of the rounds are printed, with the
gateway's CPU per call (user+sys of its process over wrk's run / requests), which the machine's
other load disturbs less than req/s. Goal: each ratio >= 0.95 (a cost <= 5% of req/s).

`--together` loads the three at the same time instead (one wrk each, -t1 -c32, started together):
the scheduler gives each gateway process an equal share of the two cores, and whatever else the
machine runs then takes from the three alike, so the ratio of their req/s is their ratio of CPU per
call, with the drift between measurements taken out. On a machine shared with other work this is
the figure to read; the rotated sequential one is the figure of a quiet machine.
Writes benchmarks/results/obs-latest.json (obs-together-latest.json).
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import statistics
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as H  # noqa: E402
import run_http as RH  # noqa: E402

GOAL = 0.95
TARGETS = ("plain", "access-log", "otel-1%")


class Sink(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP receiver that keeps nothing: 200 to every export."""

    received = 0

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("content-length") or 0))
        Sink.received += 1
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def start_gateways(procs: H.Procs, python: str, plane_url: str, sink_port: int) -> dict[str, tuple[H.Proc, int]]:
    log_file = procs.tmp / "access.log"
    extra = {
        "plain": [],
        "access-log": ["--access-log", str(log_file)],
        "otel-1%": ["--otel", "--otel-sample-ratio", "0.01"],
    }
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{sink_port}"  # inherited by the gateways
    return {name: H.start_gateway(procs, python, plane_url, name=name.replace("%", ""), extra_args=extra[name])
            for name in TARGETS}  # fmt: skip


def measure(name: str, proc: H.Proc, port: int, lua: Path, duration: float) -> dict:
    url = f"http://127.0.0.1:{port}{H.GATEWAY_PATH}"
    hz = os.sysconf("SC_CLK_TCK")
    ticks0 = H.session_cpu_ticks(proc.pid)
    r = RH.run_wrk(url, lua, 2, 32, duration, None)
    cpu = None
    if r.get("requests"):
        cpu = round(1e6 * (H.session_cpu_ticks(proc.pid) - ticks0) / hz / r["requests"], 1)
    H.log(f"[{name}] {r.get('rps')} req/s, {cpu} us CPU/call, errors {r.get('errors_total')}")
    return {"rps": r.get("rps"), "cpu_us_per_call": cpu, "errors": r.get("errors_total"), "failed": r.get("failed")}


def measure_together(gateways: dict[str, tuple[H.Proc, int]], lua: Path, duration: float) -> dict[str, dict]:
    hz = os.sysconf("SC_CLK_TCK")
    ticks0 = {name: H.session_cpu_ticks(proc.pid) for name, (proc, _) in gateways.items()}
    results: dict[str, dict] = {}

    def load(name: str, port: int) -> None:
        results[name] = RH.run_wrk(f"http://127.0.0.1:{port}{H.GATEWAY_PATH}", lua, 1, 32, duration, None)

    threads = [threading.Thread(target=load, args=(name, port)) for name, (_, port) in gateways.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = {}
    for name, (proc, _) in gateways.items():
        r = results[name]
        cpu = None
        if r.get("requests"):
            cpu = round(1e6 * (H.session_cpu_ticks(proc.pid) - ticks0[name]) / hz / r["requests"], 1)
        H.log(f"[{name}] {r.get('rps')} req/s, {cpu} us CPU/call, errors {r.get('errors_total')}")
        out[name] = {"rps": r.get("rps"), "cpu_us_per_call": cpu, "errors": r.get("errors_total"),
                     "failed": r.get("failed")}  # fmt: skip
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--keep-tmp", action="store_true")
    ap.add_argument("--together", action="store_true", help="load the three at once (see above)")
    args = ap.parse_args()
    H.install_signal_handlers()
    sink = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    rounds: list[dict[str, dict]] = []
    with H.Procs(keep_tmp=args.keep_tmp) as procs:
        _, direct_port = H.start_direct_nginx(procs)
        gateways = start_gateways(procs, args.python, f"http://127.0.0.1:{direct_port}", sink.server_address[1])
        lua = RH.wrk_lua(procs.tmp / "post.lua")
        for name, (_, port) in gateways.items():
            problem = H.smoke_check(name, port, H.GATEWAY_PATH)
            if problem:
                H.log(f"WARNING: {problem}")
            RH.run_wrk(f"http://127.0.0.1:{port}{H.GATEWAY_PATH}", lua, 2, 32, 1, None)  # warm-up
        for i in range(args.rounds):
            if args.together:
                H.log(f"round {i + 1}/{args.rounds}: the three at once")
                rounds.append(measure_together(gateways, lua, args.duration))
                continue
            order = TARGETS[i % 3 :] + TARGETS[: i % 3]
            H.log(f"round {i + 1}/{args.rounds}: {', '.join(order)}")
            rounds.append({name: measure(name, *gateways[name], lua, args.duration) for name in order})
        log_lines = sum(1 for _ in open(procs.tmp / "access.log", "rb"))
    sink.shutdown()
    summary = summarize(rounds)
    summary["access_log_lines"] = log_lines
    summary["otlp_exports"] = Sink.received
    print_summary(summary, args)
    H.RESULTS_DIR.mkdir(exist_ok=True)
    name = "obs-together-latest.json" if args.together else "obs-latest.json"
    (H.RESULTS_DIR / name).write_text(json.dumps({"rounds": rounds, "summary": summary}, indent=2))
    return 0


def summarize(rounds: list[dict[str, dict]]) -> dict:
    out: dict = {}
    for name in TARGETS:
        rps = [r[name]["rps"] for r in rounds if r[name]["rps"]]
        cpu = [r[name]["cpu_us_per_call"] for r in rounds if r[name]["cpu_us_per_call"]]
        ratios = [r[name]["rps"] / r["plain"]["rps"] for r in rounds if r[name]["rps"] and r["plain"]["rps"]]
        out[name] = {
            "rps_median": statistics.median(rps) if rps else None,
            "cpu_us_median": statistics.median(cpu) if cpu else None,
            "ratio_median": round(statistics.median(ratios), 3) if ratios else None,
            "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)] if ratios else None,
            "errors": sum(r[name]["errors"] or 0 for r in rounds),
        }
    return out


def print_summary(summary: dict, args: argparse.Namespace) -> None:
    how = "the three loaded at once, wrk -t1 -c32 each" if args.together else "in turn, wrk -t2 -c32"
    print(f"\n{args.rounds} rounds x {args.duration:g} s, {how}, medians of the rounds")
    print(f"{'target':<12} {'req/s':>9} {'CPU us/call':>12} {'req/s / plain':>14} {'range':>14} {'errors':>7}")
    for name in TARGETS:
        s = summary[name]
        rng = "-" if s["ratio_range"] is None else f"{s['ratio_range'][0]:.3f}-{s['ratio_range'][1]:.3f}"
        print(f"{name:<12} {s['rps_median'] or 0:>9,.0f} {s['cpu_us_median'] or 0:>12.1f} "
              f"{s['ratio_median'] or 0:>14.3f} {rng:>14} {s['errors']:>7}")  # fmt: skip
    for name in TARGETS[1:]:
        ratio = summary[name]["ratio_median"]
        verdict = "met" if ratio is not None and ratio >= GOAL else "missed"
        print(f"goal {name} / plain req/s >= {GOAL}: {ratio} ({verdict})")
    print(
        f"access log lines written: {summary['access_log_lines']:,}; OTLP exports received: {summary['otlp_exports']}"
    )


if __name__ == "__main__":
    sys.exit(main())
