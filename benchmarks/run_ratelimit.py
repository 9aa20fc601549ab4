"""What a call's rate_limit costs.

1. (issue 13) `Limiter.admit` + `Permit.release` per call for a key without limits, a key with its
   own limits, and a key with its own and its team's, against the pure `resolve()` of the same call
   measured in the same run (the work every call does anyway).
2. `--fleet` (issue 14): sync req/s through a real gateway of a key (and its team) with limits high
   enough never to refuse, with `--store postgresql://...` (the limits fleet-wide: usage exchanged
   with the database every 0.2 s) against the embedded store (per worker), `wrk` 32 connections,
   alternating rounds; the ratio of the medians. Goal: no difference beyond noise (the hot path
   never waits on the database). Needs PostgreSQL on 127.0.0.1:5432 (`--server`), nginx and wrk.

Run from the repository root: `.venv/bin/python benchmarks/run_ratelimit.py [--calls N]`, or
`.venv/bin/python benchmarks/run_ratelimit.py --fleet [--rounds 3] [--duration 5]`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as H  # noqa: E402

from gateway.calls.ratelimit import Limiter  # noqa: E402
from gateway.metrics import Metrics  # noqa: E402
from gateway.routing.loader import compile_table  # noqa: E402
from gateway.routing.resolve import Call, resolve  # noqa: E402

LIMIT = {"requests_per_second": 1e6, "burst": 1000000, "max_concurrent": 1000}


def table():  # noqa: ANN201
    def key(name: str, team: str, limited: bool) -> dict:
        k = {"name": name, "team": team, "sha256": hashlib.sha256(name.encode()).hexdigest()}
        return {**k, "rate_limit": LIMIT} if limited else k

    return compile_table({
        "version": 1, "domains": ["api.example.com"], "regions": {"us": {}},
        "planes": {"us-1": {"region": "us", "url": "http://127.0.0.1:9001"}},
        "teams": {"free": {}, "paid": {"rate_limit": LIMIT}},
        "api_keys": [key("none", "free", False), key("own", "free", True), key("both", "paid", True)],
        "models": {"m1": {"team": "free", "deployments": {"d1": {"plane": "us-1"}},
                          "environments": {"production": {"deployment": "d1"}}}},
    })  # fmt: skip


def per_call(fn, calls: int) -> float:  # noqa: ANN001
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls)
    return statistics.median(runs)


PLAIN_TABLE = H.gateway_table


def limited_gateway_table(plane_url: str) -> str:
    """The harness's table with the bench key and its team under LIMIT (never refused at these rates)."""
    flow = json.dumps(LIMIT)
    text = PLAIN_TABLE(plane_url).replace("teams: {bench: {}}", f"teams: {{bench: {{rate_limit: {flow}}}}}")
    return text.replace("team: bench, sha256:", f"team: bench, rate_limit: {flow}, sha256:")


def fleet(args: argparse.Namespace) -> None:
    import psycopg
    from run_http import run_wrk, wrk_lua

    H.install_signal_handlers()
    H.gateway_table = limited_gateway_table  # start_gateway writes this table (this process only)
    name = f"ratelimit_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(f"{args.server}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = f"{args.server}/{name}"
    rps: dict[str, list[float]] = {"postgresql": [], "embedded": []}
    try:
        subprocess.run([sys.executable, "-m", "gateway", "store", "migrate", "--store", url], check=True, timeout=60)
        with H.Procs() as procs:
            _, plane_port = H.start_direct_nginx(procs)
            plane = f"http://127.0.0.1:{plane_port}"
            _, fleet_port = H.start_gateway(procs, sys.executable, plane, "with-postgres", ["--store", url])
            _, embedded_port = H.start_gateway(procs, sys.executable, plane, "embedded")
            lua = wrk_lua(procs.tmp / "post.lua")
            for r in range(args.rounds):
                for label, port in (("postgresql", fleet_port), ("embedded", embedded_port))[:: 1 if r % 2 else -1]:
                    res = run_wrk(f"http://127.0.0.1:{port}{H.GATEWAY_PATH}", lua, 2, 32, args.duration, None)
                    if res.get("errors_total") or res["rps"] is None:  # a refusal (429) is a wrk error too
                        raise RuntimeError(f"{label}: wrk saw errors: {res['raw'][-500:]}")
                    rps[label].append(res["rps"])
                    H.log(f"round {r + 1} {label}: {res['rps']:.0f} req/s")
            with psycopg.connect(url) as conn:
                members = conn.execute("SELECT count(*) FROM rate_limit_members").fetchone()
            if members != (1,):
                raise RuntimeError(f"the fleet gateway is not a member of the fleet's limits: {members}")
    finally:
        H.gateway_table = PLAIN_TABLE
        with psycopg.connect(f"{args.server}/postgres", autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    pg, embedded = statistics.median(rps["postgresql"]), statistics.median(rps["embedded"])
    spread = max((max(v) - min(v)) / statistics.median(v) for v in rps.values())
    print(f"sync req/s of a key and team with limits, 32 connections, median of {args.rounds}: "
          f"--store postgresql:// (fleet-wide limits) {pg:.0f}, embedded (per worker) {embedded:.0f}, "
          f"ratio {pg / embedded:.3f} (spread between rounds up to {spread:.1%})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--fleet", action="store_true", help="req/s with --store postgresql:// against embedded")
    parser.add_argument("--server", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk measurement")
    args = parser.parse_args()
    if args.fleet:
        fleet(args)
        return
    t = table()
    keys = {k.name: k for k in t.api_keys.values()}
    limiter = Limiter(Metrics(), time.monotonic)
    call = Call("POST", "model-m1.api.example.com", "/production/predict", "Api-Key none")
    base = per_call(lambda: resolve(t, call), args.calls)
    print(f"resolve() of the call: {base * 1e9:.0f} ns")
    for name in ("none", "own", "both"):
        key = keys[name]
        cost = per_call(lambda key=key: limiter.admit(t, key).release(), args.calls)
        print(f"admit + release, key {name!r}: {cost * 1e9:.0f} ns = {cost / base:.2f}x resolve()")


if __name__ == "__main__":
    main()
