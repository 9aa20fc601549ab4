#!/usr/bin/env python3
"""The ASGI front end against the native server, in one run (issue 13).

    .venv/bin/python benchmarks/run_asgi.py              # 10 s per measurement, 3 rounds
    .venv/bin/python benchmarks/run_asgi.py --quick      # 3 s per measurement

    .venv/bin/python benchmarks/run_asgi.py --fronts native,granian

Every front serves the same generated table (one model, its plane `direct`: nginx answering a
fixed JSON, see run_http.py) with the same data plane; only the front differs:
  native     `python -m gateway serve` (1 worker)
  uvicorn    `uvicorn gateway.asgi:app --http httptools --loop uvloop` (1 worker, GATEWAY_CONFIG)
  hypercorn  `hypercorn gateway.asgi:app --worker-class uvloop` (1 worker)
  granian    `granian --interface asgi gateway.asgi:app --loop uvloop` (1 worker, 1 runtime thread)
Load: wrk, small JSON POST, 32 connections (-t2 -c32), 1 s warm-up. The fronts are measured
alternately (native, uvicorn, hypercorn, granian, native, ...) so drift on a shared machine hits
all; the ratio printed is each ASGI front's req/s over the native server's, per round and of the
best round of each. Results go to benchmarks/results/asgi-latest.json.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as H  # noqa: E402
import run_http as R  # noqa: E402

LEVEL = (2, 32)  # (threads, connections)
ASGI_FRONTS = ("uvicorn", "hypercorn", "granian")


def asgi_argv(server: str, python: str, port: int, uvloop: bool) -> list[str]:
    if server == "uvicorn":
        return [python, "-m", "uvicorn", "gateway.asgi:app", "--host", "127.0.0.1", "--port", str(port),
                "--http", "httptools", "--loop", "uvloop" if uvloop else "asyncio", "--no-access-log",
                "--no-proxy-headers", "--lifespan", "on"]  # fmt: skip
    if server == "hypercorn":
        return [python, "-m", "hypercorn", "gateway.asgi:app", "--bind", f"127.0.0.1:{port}",
                "--worker-class", "uvloop" if uvloop else "asyncio"]  # fmt: skip
    if server == "granian":
        return [python, "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1", "--port", str(port),
                "--workers", "1", "--runtime-threads", "1", "--loop", "uvloop" if uvloop else "asyncio",
                "--no-access-log", "gateway.asgi:app"]  # fmt: skip
    raise ValueError(f"unknown ASGI server {server!r}")


def start_asgi(procs: H.Procs, server: str, python: str, plane_url: str) -> tuple[H.Proc, int]:
    cfg = procs.tmp / f"{server}-table.yaml"
    cfg.write_text(H.gateway_table(plane_url))
    port, admin = H.free_port(), H.free_port()
    argv = asgi_argv(server, python, port, _importable(python, "uvloop"))
    H.log(f"starting {server}: {' '.join(argv)}")
    env = {"GATEWAY_CONFIG": str(cfg), "GATEWAY_ADMIN_PORT": str(admin)}  # the admin listener says when it is ready
    proc = procs.start(server, argv, cwd=H.GATEWAY_ROOT, env=env)
    H.wait_ready(proc, admin, "GET", "/readyz", ok=lambda s: s == 200, timeout=30.0)
    return proc, port


def _importable(python: str, module: str) -> bool:
    import subprocess

    return subprocess.run([python, "-c", f"import {module}"], capture_output=True, timeout=30).returncode == 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=None, help="seconds per measurement (default 10)")
    ap.add_argument("--quick", action="store_true", help="3 s per measurement (unless --duration is given)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of every front (default 3)")
    ap.add_argument("--fronts", default=",".join(("native", *ASGI_FRONTS)), help="comma-separated (default: all)")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the fronts")
    ap.add_argument("--output", default=str(H.RESULTS_DIR / "asgi-latest.json"))
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print raw wrk output")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    args.levels, args.repeat = [LEVEL], 1
    args.rounds = max(1, min(args.rounds, 10))
    H.install_signal_handlers()
    if not shutil.which("wrk"):
        H.log("wrk not found (apt-get install -y wrk)")
        return 2
    results: list[dict] = []
    started = time.time()
    with H.Procs(keep_tmp=args.keep_tmp) as procs:
        lua = R.wrk_lua(procs.tmp / "post.lua")
        direct, direct_port = H.start_direct_nginx(procs)
        plane = f"http://127.0.0.1:{direct_port}"
        starters = {"native": lambda: H.start_gateway(procs, args.python, plane, name="native")}
        for server in ASGI_FRONTS:
            starters[server] = lambda server=server: start_asgi(procs, server, args.python, plane)  # type: ignore[misc]
        fronts = {name: starters[name] for name in args.fronts.split(",")}
        for i in range(args.rounds):
            for name, starter in fronts.items():
                rows: list[dict] = []
                R.run_target(procs, name, starter, H.GATEWAY_PATH, lua, args, rows, None)
                for row in rows:
                    row["round"] = i + 1
                results += rows
        if not direct.alive():
            direct.dump_log("(direct upstream exited) ")

    print(f"\nASGI benchmark: {args.duration:g} s per measurement, {args.rounds} alternating rounds, wrk -c32 POST\n")
    R.print_table(results)
    ratios, best = ratio_lines(results)
    print()
    for line in ratios:
        print(line)
    H.write_results(
        args.output, "asgi", started, duration_s=args.duration, rounds=args.rounds,
        environment=R.versions(args.python), results=results, over_native=best,
    )  # fmt: skip
    return 1 if any(r.get("failed") for r in results) else 0


def ratio_lines(results: list[dict]) -> tuple[list[str], dict[str, float | None]]:
    """Each ASGI front's req/s over the native server's: per round, and of the best round of each."""

    def rps(name: str, round_: int | None = None) -> list[float]:
        return [r["rps"] for r in results if r["target"] == name and r.get("rps") and not r.get("failed")
                and round_ in (None, r["round"])]  # fmt: skip

    lines = []
    best: dict[str, float | None] = {}
    for server in ASGI_FRONTS:
        if not any(r["target"] == server for r in results):
            continue
        for i in sorted({r["round"] for r in results}):
            native, front = rps("native", i), rps(server, i)
            if native and front:
                lines.append(f"round {i}: {server} / native req/s @32 = {front[0] / native[0]:.3f}")
        native, front = rps("native"), rps(server)
        best[server] = max(front) / max(native) if native and front else None
        shown = "n/a" if best[server] is None else format(best[server], ".3f")
        lines.append(f"best of each: {server} / native req/s @32 = {shown}")
    return lines, best


if __name__ == "__main__":
    H.run_main(main)
