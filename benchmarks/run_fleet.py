"""Fleet mode (SPEC §13, issue 14): change propagation across three gateways, and the hot path's cost.

1. Propagation: three gateways share one PostgreSQL store (a fresh database, dropped at the end).
   `--changes N` admin changes (a PATCH of the production environment's autoscaling settings) go
   through the gateways in turn; for each, the time from the admin call's answer until each of the
   two other gateways' `/v1/routing` shows the new `admin_revision` (polled every 2 ms). Goal: p99 <= 1 s.
   With `--workers N` every gateway runs N workers, and a change counts as served by a gateway once
   each of its workers has swapped to the supervisor's table (the digests `/v1/routing` lists).
2. Sync req/s: `wrk` (one small POST, 32 connections) against a gateway with `--store
   postgresql://...` and one with the embedded store, in alternating rounds so machine noise hits
   both alike; the ratio of their medians. Goal: no difference beyond noise (the hot path never
   waits on the database).

Needs PostgreSQL on 127.0.0.1:5432 (trust auth; `--server` for another), nginx and wrk.
Run from the repository root: `.venv/bin/python benchmarks/run_fleet.py [--changes 200] [--rounds 3] [--workers N]`.
Every wait has a time limit; every server started is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as H  # noqa: E402
from run_http import run_wrk, wrk_lua  # noqa: E402

PROPAGATION_TIMEOUT = 10.0
GOAL_P99_S = 1.0


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def admin(port: int, method: str, path: str, body: object = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    status, raw = H.http_request(port, method, path, data, {"Content-Type": "application/json"})
    return status, json.loads(raw)


def revision(port: int) -> int:
    return int(admin(port, "GET", "/v1/routing")[1]["admin_revision"])


def served(port: int, target: int) -> bool:
    """The gateway is at revision `target` or later, and so is every worker it has (`--workers N`)."""
    view = admin(port, "GET", "/v1/routing")[1]
    workers = view.get("workers", [])
    return int(view["admin_revision"]) >= target and all(w["digest"] == view["digest"] for w in workers)


def propagation(admin_ports: list[int], changes: int) -> list[float]:
    """Seconds from each change's answer until every other gateway serves it (one value per gateway)."""
    latencies = []
    path = f"/v1/models/{H.MODEL_ID}/environments/production"
    for i in range(changes):
        origin = admin_ports[i % len(admin_ports)]
        while True:  # based on a revision the origin has not yet read: 409, read again and retry
            status, body = admin(origin, "PATCH", path, {"autoscaling_settings": {"max_replica": 2 + i % 5}})
            if status != 409:
                break
            time.sleep(0.01)
        if status != 200:
            raise RuntimeError(f"admin change {i} answered {status}: {body}")
        done_at = time.monotonic()
        target = revision(origin)
        for port in admin_ports:
            if port == origin:
                continue
            deadline = done_at + PROPAGATION_TIMEOUT
            while not served(port, target):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"change {i} did not reach the gateway on admin port {port}")
                time.sleep(0.002)
            latencies.append(time.monotonic() - done_at)
    return latencies


def admin_port_of(proc: H.Proc) -> int:
    argv = proc.popen.args
    return int(argv[argv.index("--admin-port") + 1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default="postgresql://postgres@127.0.0.1:5432")
    ap.add_argument("--changes", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per wrk measurement")
    ap.add_argument("--workers", type=int, default=1, help="worker processes of every gateway (--workers N)")
    args = ap.parse_args()
    H.install_signal_handlers()
    python = sys.executable
    workers = ["--workers", str(args.workers)] if args.workers > 1 else []
    name = f"fleet_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(f"{args.server}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = f"{args.server}/{name}"
    try:
        subprocess.run([python, "-m", "gateway", "store", "migrate", "--store", url], check=True, timeout=60)
        with H.Procs() as procs:
            _, plane_port = H.start_direct_nginx(procs)
            plane = f"http://127.0.0.1:{plane_port}"
            fleet = [
                H.start_gateway(procs, python, plane, f"fleet-{i}", ["--store", url, *workers])[0] for i in range(3)
            ]
            admin_ports = [admin_port_of(proc) for proc in fleet]
            H.log(f"propagation: {args.changes} changes across {len(fleet)} gateways")
            latencies = propagation(admin_ports, args.changes)
            for proc in fleet:
                procs.stop(proc)

            _, fleet_port = H.start_gateway(procs, python, plane, "with-postgres", ["--store", url, *workers])
            _, embedded_port = H.start_gateway(procs, python, plane, "embedded", workers)
            lua = wrk_lua(procs.tmp / "post.lua")
            rps: dict[str, list[float]] = {"postgresql": [], "embedded": []}
            for r in range(args.rounds):
                for label, port in (("postgresql", fleet_port), ("embedded", embedded_port))[:: 1 if r % 2 else -1]:
                    res = run_wrk(f"http://127.0.0.1:{port}{H.GATEWAY_PATH}", lua, 2, 32, args.duration, None)
                    if res.get("errors_total") or res["rps"] is None:
                        raise RuntimeError(f"{label}: wrk saw errors: {res['raw'][-500:]}")
                    rps[label].append(res["rps"])
                    H.log(f"round {r + 1} {label}: {res['rps']:.0f} req/s")
    finally:
        with psycopg.connect(f"{args.server}/postgres", autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    pg, embedded = statistics.median(rps["postgresql"]), statistics.median(rps["embedded"])
    spread = max((max(v) - min(v)) / statistics.median(v) for v in rps.values())
    result = {
        "workers": args.workers,
        "propagation": {"changes": args.changes, "samples": len(latencies), "p50_ms": p50 * 1000,
                        "p99_ms": p99 * 1000, "max_ms": max(latencies) * 1000, "goal_p99_ms": GOAL_P99_S * 1000},
        "sync_rps": {"postgresql": rps["postgresql"], "embedded": rps["embedded"], "ratio": pg / embedded,
                     "round_spread": spread},
    }  # fmt: skip
    print(f"propagation over 3 gateways of {args.workers} worker(s) ({len(latencies)} samples): p50 {p50 * 1000:.1f} ms, "
          f"p99 {p99 * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms "
          f"(goal p99 <= {GOAL_P99_S * 1000:.0f} ms: {'met' if p99 <= GOAL_P99_S else 'NOT met'})")  # fmt: skip
    print(f"sync req/s, 32 connections, median of {args.rounds}: --store postgresql:// {pg:.0f}, "
          f"embedded {embedded:.0f}, ratio {pg / embedded:.3f} (spread between rounds up to {spread:.1%})")  # fmt: skip
    H.RESULTS_DIR.mkdir(exist_ok=True)
    (
        H.RESULTS_DIR / ("fleet-latest.json" if args.workers == 1 else f"fleet-workers{args.workers}-latest.json")
    ).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
