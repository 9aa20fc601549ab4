#!/usr/bin/env python3
"""The ASGI front end against the native server, in one run (issue 13).

    .venv/bin/python benchmarks/run_asgi.py              # 10 s per measurement, 3 rounds
    .venv/bin/python benchmarks/run_asgi.py --quick      # 3 s per measurement

Both fronts serve the same generated table (one model, its plane `direct`: nginx answering a
fixed JSON, see run_http.py) with the same data plane; only the front differs:
  native    `python -m gateway serve` (1 worker)
  uvicorn   `uvicorn gateway.asgi:app --http httptools --loop uvloop` (1 worker, GATEWAY_CONFIG)
Load: wrk, small JSON POST, 32 connections (-t2 -c32), 1 s warm-up. The fronts are measured
alternately (native, uvicorn, native, uvicorn, ...) so drift on a shared machine hits both; the
ratio printed is uvicorn / native req/s of the best round of each (and of each round). Results go to
benchmarks/results/asgi-latest.json.
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


def start_uvicorn(procs: H.Procs, python: str, plane_url: str) -> tuple[H.Proc, int]:
    cfg = procs.tmp / "uvicorn-table.yaml"
    cfg.write_text(H.gateway_table(plane_url))
    port, admin = H.free_port(), H.free_port()
    loop = "uvloop" if _importable(python, "uvloop") else "asyncio"
    argv = [python, "-m", "uvicorn", "gateway.asgi:app", "--host", "127.0.0.1", "--port", str(port),
            "--http", "httptools", "--loop", loop, "--no-access-log", "--no-proxy-headers", "--lifespan", "on"]  # fmt: skip
    H.log(f"starting uvicorn: {' '.join(argv)}")
    env = {"GATEWAY_CONFIG": str(cfg), "GATEWAY_ADMIN_PORT": str(admin)}  # the admin listener says when it is ready
    proc = procs.start("uvicorn", argv, cwd=H.GATEWAY_ROOT, env=env)
    H.wait_ready(proc, admin, "GET", "/readyz", ok=lambda s: s == 200, timeout=30.0)
    return proc, port


def _importable(python: str, module: str) -> bool:
    import subprocess

    return subprocess.run([python, "-c", f"import {module}"], capture_output=True, timeout=30).returncode == 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=None, help="seconds per measurement (default 10)")
    ap.add_argument("--quick", action="store_true", help="3 s per measurement (unless --duration is given)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of native then uvicorn (default 3)")
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
        fronts = {
            "native": lambda: H.start_gateway(procs, args.python, plane, name="native"),
            "uvicorn": lambda: start_uvicorn(procs, args.python, plane),
        }
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
        environment=R.versions(args.python), results=results, uvicorn_over_native=best,
    )  # fmt: skip
    return 1 if any(r.get("failed") for r in results) else 0


def ratio_lines(results: list[dict]) -> tuple[list[str], float | None]:
    def rps(name: str, round_: int | None = None) -> list[float]:
        return [r["rps"] for r in results if r["target"] == name and r.get("rps") and not r.get("failed")
                and round_ in (None, r["round"])]  # fmt: skip

    lines = []
    for i in sorted({r["round"] for r in results}):
        native, uvicorn = rps("native", i), rps("uvicorn", i)
        if native and uvicorn:
            lines.append(f"round {i}: uvicorn / native req/s @32 = {uvicorn[0] / native[0]:.3f}")
    native, uvicorn = rps("native"), rps("uvicorn")
    best = max(uvicorn) / max(native) if native and uvicorn else None
    lines.append(f"best of each: uvicorn / native req/s @32 = {'n/a' if best is None else format(best, '.3f')}")
    return lines, best


if __name__ == "__main__":
    H.run_main(main)
