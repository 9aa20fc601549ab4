"""Routing table scale: a 100,000-model JSON table (2 deployments, 2 environments each).

Measures, for this checkout and optionally a second one (`--before DIR`, e.g. the commit you started
from: `git archive <commit> | tar -x -C DIR`), alternating rounds so machine noise hits both alike:

- compile: `load_table(path)` in a fresh interpreter (seconds), and that process's RSS after it;
- ready: `python -m gateway serve --config table.json` started as a subprocess, time until the
  admin `/readyz` answers 200, then the serving process's RSS (psutil);
- admin: `PATCH /v1/models/{id}/environments/staging` changing the canary percent, time until the
  call returns and `/v1/routing` shows the new `admin_revision` (median of `--patches`).

Goals (issue "table scale"): ready <= 5 s, RSS <= 150 MiB per worker, admin <= 0.2 s.
Every wait has a time limit and every server started is stopped at the end.
Run from the repository root: `.venv/bin/python benchmarks/run_table_scale.py [--before DIR]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import Procs, free_port, http_request, install_signal_handlers, log, wait_ready  # noqa: E402

HERE = Path(__file__).resolve().parents[1]
READY_TIMEOUT = 120.0
GOALS = {"compile_s": None, "compile_rss_mib": None, "ready_s": 5.0, "serve_rss_mib": 150.0, "patch_s": 0.2}


def table_doc(n: int) -> dict:
    return {
        "version": 1,
        "domains": ["api.example.com"],
        "regions": {"us": {}, "eu": {}},
        "planes": {
            "us-1": {"region": "us", "url": "http://127.0.0.1:9001", "grpc": "127.0.0.1:9101"},
            "eu-1": {"region": "eu", "url": "http://127.0.0.1:9002"},
        },
        "teams": {"acme": {"regional_environments": {"prod-us": "us"}}},
        "api_keys": [{"name": "k", "team": "acme", "sha256": "a" * 64}],
        "models": {
            f"m{i:06d}": {
                "team": "acme",
                "deployments": {"v1": {"plane": "us-1"}, "v2": {"plane": "us-1", "status": "scaled_to_zero"}},
                "environments": {
                    "production": {"deployment": "v1"},
                    "staging": {
                        "deployment": "v1",
                        # Values vary by model, so sharing equal sub-objects is not the whole story.
                        "canary": {"deployment": "v2", "percent": i % 50},
                        "autoscaling": {"min_replica": 0, "max_replica": 1 + i % 7, "concurrency_target": 4},
                    },
                },
            }
            for i in range(n)
        },
    }


# -- in a fresh interpreter: compile ----------------------------------------------------------------


def measure_compile(path: str) -> dict:
    import gc

    import psutil

    from gateway.routing.loader import load_table

    started = time.perf_counter()
    table = load_table(path)
    elapsed = time.perf_counter() - started
    gc.collect()
    rss = psutil.Process().memory_info().rss / 2**20
    assert len(table.models) > 0
    return {"compile_s": elapsed, "compile_rss_mib": rss}


def run_compile(checkout: Path, table: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    argv = [sys.executable, str(Path(__file__).resolve()), "--compile-only", str(table)]
    out = subprocess.run(argv, cwd=checkout, env=env, capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- a serving gateway: ready, RSS, admin PATCH ---------------------------------------------------


def run_serve(checkout: Path, table: Path, patches: int) -> dict:
    import psutil

    with Procs() as procs:
        cfg = procs.tmp / "table.json"  # a fresh copy: the admin store lands next to it
        cfg.write_bytes(table.read_bytes())
        port, admin = free_port(), free_port()
        argv = [sys.executable, "-m", "gateway", "serve", "--config", str(cfg), "--host", "127.0.0.1",
                "--port", str(port), "--admin-port", str(admin)]  # fmt: skip
        started = time.perf_counter()
        proc = procs.start("gateway", argv, cwd=checkout, env={"PYTHONPATH": str(checkout)})
        wait_ready(proc, admin, "GET", "/readyz", ok=lambda s: s == 200, timeout=READY_TIMEOUT)
        ready = time.perf_counter() - started
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        rss = max(p.memory_info().rss for p in tree) / 2**20
        times = []
        for i in range(patches):
            times.append(patch_once(admin, f"m{(i * 7919) % 100_000:06d}", 11 + i))
        return {"ready_s": ready, "serve_rss_mib": rss, "patch_s": statistics.median(times)}


def patch_once(admin: int, model: str, percent: int) -> float:
    def routing() -> dict:
        status, body = http_request(admin, "GET", "/v1/routing", timeout=30)
        if status != 200:
            raise RuntimeError(f"/v1/routing: HTTP {status}: {body[:200]!r}")
        return json.loads(body)

    before = routing()["admin_revision"]
    body = json.dumps({"canary": {"deployment": "v2", "percent": percent}}).encode()
    headers = {"Content-Type": "application/json"}
    started = time.perf_counter()
    status, answer = http_request(admin, "PATCH", f"/v1/models/{model}/environments/staging", body, headers, 30)
    if status != 200:
        raise RuntimeError(f"PATCH: HTTP {status}: {answer[:300]!r}")
    deadline = started + 30
    while routing()["admin_revision"] == before:
        if time.perf_counter() > deadline:
            raise RuntimeError("the admin change never showed in /v1/routing")
        time.sleep(0.005)
    return time.perf_counter() - started


# -- driver -----------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per checkout (median)")
    parser.add_argument("--patches", type=int, default=5, help="admin PATCH calls per round")
    parser.add_argument("--before", type=Path, default=None, help="a second checkout to compare against")
    parser.add_argument("--compile-only", metavar="TABLE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compile_only:
        print(json.dumps(measure_compile(args.compile_only)))
        return 0
    install_signal_handlers()
    checkouts = {"after": HERE}
    if args.before is not None:
        checkouts = {"before": args.before.resolve(), **checkouts}
    with tempfile.TemporaryDirectory(prefix="gw-table-scale-") as tmp:
        table = Path(tmp) / "table.json"
        table.write_text(json.dumps(table_doc(args.models)))
        log(f"table: {args.models} models, {table.stat().st_size / 2**20:.1f} MiB of JSON")
        results: dict[str, list[dict]] = {name: [] for name in checkouts}
        for round_no in range(args.rounds):
            for name, checkout in checkouts.items():
                log(f"round {round_no + 1}/{args.rounds}: {name} ({checkout})")
                figures = run_compile(checkout, table) | run_serve(checkout, table, args.patches)
                log(f"  {figures}")
                results[name].append(figures)
    print_table(args.models, results)
    return 0


def print_table(models: int, results: dict[str, list[dict]]) -> None:
    names = list(results)
    print(f"\n{models} models, median of {len(results[names[0]])} round(s)")
    print(f"{'measure':<18}" + "".join(f"{n:>10}" for n in names) + f"{'goal':>10}")
    for key, goal in GOALS.items():
        cells = "".join(f"{statistics.median(r[key] for r in results[n]):>10.2f}" for n in names)
        print(f"{key:<18}{cells}{'<= ' + str(goal) if goal else '':>10}")


if __name__ == "__main__":
    raise SystemExit(main())
