"""Fleet mode, the async queue (SPEC §10, §13; issue 14): durable submits/s into a region's PostgreSQL queue.

Three measurements in alternating rounds (machine noise hits all alike), each a wrk window of
`--duration` s after a 1 s warm-up, `POST /production/async_predict` with run_http.py's body, no
webhook, the deployment `scaled_to_zero` so that the queue only stores (run_async.py's "runs
parked"):

- `embedded`: one gateway, `--queue-store DIR` (the SQLite file), wrk 2 threads x 32 connections;
- `pg x1`: one gateway, `--queue-store us=postgresql://...`, the same wrk;
- `pg x3`: three gateways on that one database, three wrk at once (1 thread x 11 connections each).

Durable submits are counted in the store itself (rows before and after the window), never taken
from wrk alone; a 201 whose row is missing would be printed as lost. The ratios pg x3 / embedded and
pg x1 / embedded are printed. Every process shares this machine's cores (gateways, PostgreSQL, wrk):
the fleet figure is what three gateways on one host reach, not three hosts'.

Needs PostgreSQL on 127.0.0.1:5432 (trust auth; `--server` for another), nginx and wrk.
Run from the repository root: `.venv/bin/python benchmarks/run_fleet_async.py [--duration 5] [--rounds 2]`.
Every wait has a time limit; every server started is stopped, and the database dropped, at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as H  # noqa: E402
from run_async import ASYNC_PATH, SECRET, SECRET_ENV, start_gateway, store_counts, table_yaml  # noqa: E402
from run_http import run_wrk, wrk_lua  # noqa: E402

FLEET = 3


def start_pg_gateway(procs: H.Procs, python: str, name: str, table: str, url: str) -> int:
    """A gateway whose region us keeps its queue in `url`; its public port."""
    home = procs.tmp / name
    home.mkdir()
    (home / "table.yaml").write_text(table)
    port, admin = H.free_port(), H.free_port()
    while admin == port:
        admin = H.free_port()
    argv = [python, "-m", "gateway", "serve", "--config", str(home / "table.yaml"), "--host", "127.0.0.1",
            "--port", str(port), "--admin-port", str(admin), "--queue-store", f"us={url}"]  # fmt: skip
    H.log(f"starting {name}: {' '.join(argv)}")
    proc = procs.start(name, argv, cwd=H.GATEWAY_ROOT, env={SECRET_ENV: SECRET})
    H.wait_ready(proc, admin, "GET", "/readyz", ok=lambda s: s == 200, timeout=30.0)
    return port


def db_rows(url: str) -> int:
    with psycopg.connect(url, connect_timeout=5) as conn:
        row = conn.execute("SELECT count(*) FROM async_requests").fetchone()
        return int(row[0]) if row else 0


def window(ports: list[int], lua: Path, duration: float, count) -> dict:  # noqa: ANN001
    """One measured window of wrk on `ports` at once (32 connections in all): rates and durable rows."""
    threads, conns = (2, 32) if len(ports) == 1 else (1, 32 // len(ports) + 1)
    urls = [f"http://127.0.0.1:{port}{ASYNC_PATH}" for port in ports]
    with ThreadPoolExecutor(len(urls)) as pool:  # warm-up
        list(pool.map(lambda u: run_wrk(u, lua, threads, conns, 1, None), urls))
    time.sleep(0.3)
    before = count()
    with ThreadPoolExecutor(len(urls)) as pool:
        results = list(pool.map(lambda u: run_wrk(u, lua, threads, conns, duration, None), urls))
    time.sleep(0.3)  # the window's last commits
    durable = count() - before
    answered = sum((r.get("requests") or 0) - r.get("non2xx", 0) for r in results)
    errors = sum(r.get("errors_total") or 0 for r in results) + sum(r.get("non2xx", 0) for r in results)
    return {"durable_per_s": durable / duration, "wrk_2xx": answered, "durable": durable,
            "errors": errors, "lost": max(0, answered - durable)}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default="postgresql://postgres@127.0.0.1:5432")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per wrk measurement")
    args = ap.parse_args()
    H.install_signal_handlers()
    python = sys.executable
    name = f"fleet_async_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(f"{args.server}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = f"{args.server}/{name}"
    runs: dict[str, list[dict]] = {"embedded": [], "pg x1": [], f"pg x{FLEET}": []}
    try:
        subprocess.run([python, "-m", "gateway", "store", "migrate", "--queue-store", f"us={url}"], check=True,
                       timeout=60)  # fmt: skip
        with H.Procs() as procs:
            _, plane_port = H.start_direct_nginx(procs)
            table = table_yaml(f"http://127.0.0.1:{plane_port}", status="scaled_to_zero")
            embedded = start_gateway(procs, python, "embedded", table)
            fleet = [start_pg_gateway(procs, python, f"pg-{i}", table, url) for i in range(FLEET)]
            lua = wrk_lua(procs.tmp / "post.lua")
            plans = {
                "embedded": ([embedded.port], lambda: store_counts(embedded.store)["total"]),
                "pg x1": ([fleet[0]], lambda: db_rows(url)),
                f"pg x{FLEET}": (fleet, lambda: db_rows(url)),
            }
            for r in range(args.rounds):
                order = list(plans) if r % 2 == 0 else list(plans)[::-1]
                for label in order:
                    ports, count = plans[label]
                    res = window(ports, lua, args.duration, count)
                    runs[label].append(res)
                    H.log(f"round {r + 1} {label}: {res['durable_per_s']:.0f} durable submits/s "
                          f"(wrk 2xx {res['wrk_2xx']}, errors {res['errors']}, lost {res['lost']})")  # fmt: skip
    finally:
        with psycopg.connect(f"{args.server}/postgres", autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    medians = {label: statistics.median(r["durable_per_s"] for r in rs) for label, rs in runs.items()}
    base = medians["embedded"]
    result = {"rounds": args.rounds, "duration_s": args.duration, "runs": runs, "median_durable_per_s": medians,
              "ratio_fleet_to_embedded": medians[f"pg x{FLEET}"] / base, "ratio_pg1_to_embedded": medians["pg x1"] / base,
              "lost": sum(r["lost"] for rs in runs.values() for r in rs)}  # fmt: skip
    print(f"durable async submits/s, median of {args.rounds} rounds of {args.duration:g} s, 32 connections in all:")
    for label, value in medians.items():
        print(f"  {label:>9}: {value:7.0f}  ({value / base:.2f}x embedded)")
    print(f"fleet ({FLEET} gateways, one database) / one gateway embedded: {result['ratio_fleet_to_embedded']:.2f}x; "
          f"lost {result['lost']}")  # fmt: skip
    H.RESULTS_DIR.mkdir(exist_ok=True)
    (H.RESULTS_DIR / "fleet-async-latest.json").write_text(json.dumps(result, indent=1) + "\n")
    return 1 if result["lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
