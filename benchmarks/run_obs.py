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

`--peers` (in turn) adds nginx as the proxy, without and with its own access log (JSON lines,
`buffer=64k flush=50ms`), measured in the same rotation: what an access log costs a peer on the
same machine and load.

`--pin` (in turn) puts every gateway process (and an nginx peer) on the last CPU and wrk (-t1),
the plane and the access log's writer process on the others, and prints the gateway process's own
CPU per call beside its session's (the writer included): the gateway's part of the cost, apart
from what its writer and the load generator take from each other.
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
PEERS = ("nginx", "nginx-log")  # --peers: nginx as the proxy, without and with its access log
BASE = {"nginx-log": "nginx"}  # the target a ratio is taken to (plain otherwise)
# nginx's access log as operators run it: JSON lines, buffered (64 KiB, at least every 50 ms, as the gateway's
# batches), with the fields the gateway logs that nginx has.
NGINX_LOG_FORMAT = (
    'log_format j escape=json \'{"time":"$time_iso8601","request_id":"$request_id","client":'
    '"$remote_addr","host":"$host","method":"$request_method","target":"$request_uri",'
    '"status":"$status","bytes_in":$request_length,"bytes_out":$body_bytes_sent,"ttfb_ms":'
    '"$upstream_header_time","total_ms":$request_time,"upstream":"$upstream_addr","user_agent":'
    '"$http_user_agent","referer":"$http_referer"}\';'
)


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


def start_nginx_peers(procs: H.Procs, direct_port: int) -> dict[str, tuple[H.Proc, int]]:
    """--peers: two nginx proxies (one worker each) in front of the same plane, the second with its access log."""
    upstream = f"upstream u {{ server 127.0.0.1:{direct_port}; keepalive 64; keepalive_requests 1000000; }}"
    out = {}
    for name in PEERS:
        log = f"access_log {procs.tmp / 'nginx-access.log'} j buffer=64k flush=50ms;" if name == "nginx-log" else ""
        block = f"""
        location / {{
            {log}
            rewrite ^ /predict break;
            proxy_pass http://u;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    """
        out[name] = H.start_nginx(procs, f"peer-{name}", block, http_extra=upstream + NGINX_LOG_FORMAT)
    return out


def measure(name: str, proc: H.Proc, port: int, lua: Path, duration: float, cpus: set[int] | None = None) -> dict:
    """One wrk run against one gateway; `cpus`: wrk's CPUs (--pin)."""
    url = f"http://127.0.0.1:{port}{H.GATEWAY_PATH}"
    hz = os.sysconf("SC_CLK_TCK")
    ticks0, own0 = H.session_cpu_ticks(proc.pid), H.process_cpu_ticks(proc.pid)
    r = RH.run_wrk(url, lua, 1 if cpus else 2, 32, duration, cpus)
    cpu = own = None
    if r.get("requests"):
        cpu = round(1e6 * (H.session_cpu_ticks(proc.pid) - ticks0) / hz / r["requests"], 1)
        own = round(1e6 * (H.process_cpu_ticks(proc.pid) - own0) / hz / r["requests"], 1)
    H.log(f"[{name}] {r.get('rps')} req/s, {cpu} us CPU/call (gateway process {own}), errors {r.get('errors_total')}")
    return {"rps": r.get("rps"), "cpu_us_per_call": cpu, "own_cpu_us_per_call": own, "errors": r.get("errors_total"),
            "failed": r.get("failed")}  # fmt: skip


def pin(gateways: dict[str, tuple[H.Proc, int]], peers: list[H.Proc]) -> set[int]:
    """--pin: every gateway process on the last CPU, the rest of each one's session (the access log's
    writer) and wrk on the others; an nginx peer's whole session (its worker) on the last CPU; the
    CPUs wrk gets."""
    last = max(os.sched_getaffinity(0))
    others = set(os.sched_getaffinity(0)) - {last}
    for proc in [p for p, _ in gateways.values()] + peers:
        for pid in H.session_pids(proc.pid):
            os.sched_setaffinity(pid, {last} if pid == proc.pid or proc in peers else others)
    return others


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
    ap.add_argument("--pin", action="store_true", help="gateways on the last CPU, wrk and log writers on the others")
    ap.add_argument("--peers", action="store_true", help="also nginx as the proxy without and with its access log")
    args = ap.parse_args()
    H.install_signal_handlers()
    sink = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    rounds: list[dict[str, dict]] = []
    with H.Procs(keep_tmp=args.keep_tmp) as procs:
        _, direct_port = H.start_direct_nginx(procs)
        gateways = start_gateways(procs, args.python, f"http://127.0.0.1:{direct_port}", sink.server_address[1])
        targets = TARGETS + (PEERS if args.peers and not args.together else ())
        if len(targets) > len(TARGETS):
            gateways.update(start_nginx_peers(procs, direct_port))
        lua = RH.wrk_lua(procs.tmp / "post.lua")
        cpus = None
        if args.pin and not args.together and len(os.sched_getaffinity(0)) > 1:
            cpus = pin({n: gateways[n] for n in TARGETS}, [gateways[n][0] for n in targets if n in PEERS])
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
            k = i % len(targets)
            order = targets[k:] + targets[:k]
            H.log(f"round {i + 1}/{args.rounds}: {', '.join(order)}")
            rounds.append({name: measure(name, *gateways[name], lua, args.duration, cpus) for name in order})
        log_lines = sum(1 for _ in open(procs.tmp / "access.log", "rb"))
    sink.shutdown()
    summary = summarize(rounds, targets)
    summary["access_log_lines"] = log_lines
    summary["otlp_exports"] = Sink.received
    print_summary(summary, args, targets)
    H.RESULTS_DIR.mkdir(exist_ok=True)
    name = "obs-together-latest.json" if args.together else "obs-latest.json"
    (H.RESULTS_DIR / name).write_text(json.dumps({"rounds": rounds, "summary": summary}, indent=2))
    return 0


def summarize(rounds: list[dict[str, dict]], targets: tuple[str, ...] = TARGETS) -> dict:
    out: dict = {}
    for name in targets:
        base = BASE.get(name, "plain")
        rps = [r[name]["rps"] for r in rounds if r[name]["rps"]]
        cpu = [r[name]["cpu_us_per_call"] for r in rounds if r[name]["cpu_us_per_call"]]
        own = [r[name]["own_cpu_us_per_call"] for r in rounds if r[name].get("own_cpu_us_per_call")]
        ratios = [r[name]["rps"] / r[base]["rps"] for r in rounds if r[name]["rps"] and r[base]["rps"]]
        out[name] = {
            "rps_median": statistics.median(rps) if rps else None,
            "cpu_us_median": statistics.median(cpu) if cpu else None,
            "own_cpu_us_median": statistics.median(own) if own else None,
            "ratio_median": round(statistics.median(ratios), 3) if ratios else None,
            "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)] if ratios else None,
            "errors": sum(r[name]["errors"] or 0 for r in rounds),
        }
    return out


def print_summary(summary: dict, args: argparse.Namespace, targets: tuple[str, ...] = TARGETS) -> None:
    how = "the three loaded at once, wrk -t1 -c32 each" if args.together else "in turn, wrk -t2 -c32"
    if args.pin and not args.together:
        how = "in turn, pinned: gateways on the last CPU, wrk -t1 -c32 and the log's writer on the others"
    print(f"\n{args.rounds} rounds x {args.duration:g} s, {how}, medians of the rounds")
    print(f"{'target':<12} {'req/s':>9} {'CPU us/call':>12} {'of it gateway':>14} {'req/s / base':>14} {'range':>14} "
          f"{'errors':>7}")  # fmt: skip
    for name in targets:
        s = summary[name]
        rng = "-" if s["ratio_range"] is None else f"{s['ratio_range'][0]:.3f}-{s['ratio_range'][1]:.3f}"
        own = "-" if s["own_cpu_us_median"] is None else f"{s['own_cpu_us_median']:.1f}"
        print(f"{name:<12} {s['rps_median'] or 0:>9,.0f} {s['cpu_us_median'] or 0:>12.1f} {own:>14} "
              f"{s['ratio_median'] or 0:>14.3f} {rng:>14} {s['errors']:>7}")  # fmt: skip
    for name in TARGETS[1:]:
        ratio = summary[name]["ratio_median"]
        verdict = "met" if ratio is not None and ratio >= GOAL else "missed"
        print(f"goal {name} / plain req/s >= {GOAL}: {ratio} ({verdict})")
    if "nginx-log" in summary:
        print(
            f"peer: nginx-log / nginx req/s: {summary['nginx-log']['ratio_median']} (nginx's own access log, same load)"
        )
    print(
        f"access log lines written: {summary['access_log_lines']:,}; OTLP exports received: {summary['otlp_exports']}"
    )


if __name__ == "__main__":
    sys.exit(main())
