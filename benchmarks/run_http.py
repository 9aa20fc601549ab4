#!/usr/bin/env python3
"""HTTP throughput/latency benchmark: the gateway against nginx and two Python proxies.

Run from the repo root:

    /work/venv/bin/python benchmarks/run_http.py            # 10 s per measurement
    /work/venv/bin/python benchmarks/run_http.py --quick    # 3 s per measurement
    /work/venv/bin/python benchmarks/run_http.py --skip-gateway

Targets (all on 127.0.0.1, all started and stopped by this script):
  direct          nginx answering POST /predict with a fixed JSON (the "plane")
  nginx-proxy     nginx reverse proxy (upstream keepalive) in front of `direct`
  aiohttp-proxy   benchmarks/peers/aiohttp_proxy.py in front of `direct`
  starlette-httpx benchmarks/peers/starlette_httpx_proxy.py (uvicorn) in front of `direct`
  gateway         `python -m gateway serve` (one worker) with a table whose plane is `direct`

Load: wrk, small JSON POST, 1 connection (-t1 -c1) and 32 connections (-t2 -c32), 1 s warm-up first.
Prints a table, the gateway's ratios against the goals, and writes benchmarks/results/http-latest.json.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as H  # noqa: E402

CONN_LEVELS = [(1, 1), (2, 32)]  # (threads, connections)

GOAL_RATIO_NGINX = 0.25
STRETCH_RATIO_NGINX = 0.35
GOAL_RATIO_AIOHTTP = 3.0
GOAL_ADDED_P50_MS = 0.3

_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


# --------------------------------------------------------------------------- wrk


def wrk_lua(path: Path) -> Path:
    headers = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in H.REQUEST_HEADERS.items())
    path.write_text(f"wrk.method = \"POST\"\nwrk.body = '{H.REQUEST_BODY.decode()}'\n{headers}\n")
    return path


def _to_ms(value: str, unit: str) -> float:
    return round(float(value) * _UNIT_MS[unit], 6)


def parse_wrk(out: str) -> dict:
    res: dict = {
        "rps": None,
        "p50_ms": None,
        "p75_ms": None,
        "p90_ms": None,
        "p99_ms": None,
        "requests": None,
        "non2xx": 0,
        "socket_errors": {},
        "raw": out,
    }
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m:
        res["rps"] = float(m.group(1))
    m = re.search(r"(\d+) requests in", out)
    if m:
        res["requests"] = int(m.group(1))
    dist = out.split("Latency Distribution", 1)
    if len(dist) == 2:
        for pct, val, unit in re.findall(r"^\s*(\d+)%\s+([\d.]+)(us|ms|s|m|h)\s*$", dist[1], re.M):
            key = f"p{pct}_ms"
            if key in res and res[key] is None:
                res[key] = _to_ms(val, unit)
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if m:
        res["non2xx"] = int(m.group(1))
    m = re.search(r"Socket errors:\s+connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        res["socket_errors"] = {
            k: int(v) for k, v in zip(("connect", "read", "write", "timeout"), m.groups(), strict=True)
        }
    res["errors_total"] = res["non2xx"] + sum(res["socket_errors"].values())
    return res


def run_wrk(url: str, lua: Path, threads: int, conns: int, duration: float, cpus: set[int] | None) -> dict:
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{conns}",
        f"-d{max(1, int(round(duration)))}s",
        "--latency",
        "--timeout",
        "2s",
        "-s",
        str(lua),
        url,
    ]
    pre = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    p = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=pre,
    )
    try:
        out, _ = p.communicate(timeout=duration + 30)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate(timeout=10)
        res = parse_wrk(out.decode(errors="replace"))
        res["failed"] = "wrk did not finish in time"
        return res
    finally:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=10)
    res = parse_wrk(out.decode(errors="replace"))
    if p.returncode != 0 or res["rps"] is None:
        res["failed"] = f"wrk exit {p.returncode}: {out.decode(errors='replace')[-500:]}"
    return res


# --------------------------------------------------------------------------- targets


def measure(
    procs: H.Procs, name: str, port: int, path: str, lua: Path, args, results: list, wrk_cpus, cpu_sid: int | None
) -> None:
    """cpu_sid: the session of the target's processes, whose CPU per request is reported (cpu_us_per_call)."""
    url = f"http://127.0.0.1:{port}{path}"
    problem = H.smoke_check(name, port, path)
    if problem:
        H.log(f"WARNING: {problem} (measuring anyway; errors will show in the table)")
    hz = os.sysconf("SC_CLK_TCK")
    for threads, conns in args.levels:
        H.log(f"[{name}] warm-up 1 s, {conns} conn(s)")
        run_wrk(url, lua, threads, conns, 1, wrk_cpus)
        runs = []
        for i in range(args.repeat):
            H.log(
                f"[{name}] measuring {args.duration:g} s, {conns} conn(s)"
                + (f", run {i + 1}/{args.repeat}" if args.repeat > 1 else "")
            )
            noise = H.CpuNoise({p.pid for p in procs.procs})
            ticks0 = H.session_cpu_ticks(cpu_sid) if cpu_sid else None
            r = run_wrk(url, lua, threads, conns, args.duration, wrk_cpus)
            # The target's user+sys CPU over wrk's whole run (its start and end are a few idle ms)
            # divided by the requests wrk completed.
            if ticks0 is not None and r.get("requests"):
                r["cpu_us_per_call"] = round(1e6 * (H.session_cpu_ticks(cpu_sid) - ticks0) / hz / r["requests"], 1)
            r["noise"] = noise.stop()
            if args.verbose:
                H.log(r["raw"])
            runs.append(r)
        # Several runs: report the fastest clean one (least disturbed by the rest of the machine),
        # but any errors seen in any run are reported.
        clean = [r for r in runs if "failed" not in r and r["rps"] is not None]
        r = max(clean, key=lambda r: r["rps"]) if clean else runs[-1]
        row = {
            "target": name,
            "conns": conns,
            "threads": threads,
            "url": url,
            "rps": r["rps"],
            "p50_ms": r["p50_ms"],
            "p75_ms": r["p75_ms"],
            "p90_ms": r["p90_ms"],
            "p99_ms": r["p99_ms"],
            "requests": r["requests"],
            "cpu_us_per_call": r.get("cpu_us_per_call"),
            "non2xx": sum(x["non2xx"] for x in runs),
            "socket_errors": {
                k: sum(x["socket_errors"].get(k, 0) for x in runs) for k in ("connect", "read", "write", "timeout")
            },
            "errors_total": sum(x["errors_total"] for x in runs),
            "smoke_problem": problem,
            "noise": r["noise"],
            "runs": [
                {k: x.get(k) for k in ("rps", "p50_ms", "p99_ms", "cpu_us_per_call", "errors_total", "noise", "failed")}
                for x in runs
            ],
        }
        if "failed" in r:
            row["failed"] = r["failed"]
            H.log(f"[{name}] wrk failed: {r['failed']}")
        results.append(row)


def failed_rows(name: str, reason: str, results: list, levels=CONN_LEVELS) -> None:
    for threads, conns in levels:
        results.append(
            {
                "target": name,
                "conns": conns,
                "threads": threads,
                "rps": None,
                "p50_ms": None,
                "p99_ms": None,
                "errors_total": None,
                "failed": reason,
            }
        )


def run_target(procs: H.Procs, name: str, starter, path: str, lua: Path, args, results, wrk_cpus) -> None:
    """Start a target, measure it, stop it. A start failure is recorded, not fatal."""
    proc = None
    try:
        proc, port = starter()
    except H.StartupError as e:
        H.log(f"[{name}] failed to start: {e}")
        failed_rows(name, f"start failed: {e}", results, args.levels)
        return
    try:
        measure(procs, name, port, path, lua, args, results, wrk_cpus, cpu_sid=proc.pid)
        if not proc.alive():
            proc.dump_log("(exited during the run) ")
            for row in results:
                if row["target"] == name:
                    row.setdefault("failed", "process exited during the run")
    finally:
        procs.stop(proc)


def start_python_peer(procs: H.Procs, name: str, script: str, upstream_port: int, python: str):
    port = H.free_port()
    proc = procs.start(
        name,
        [python, str(H.PEERS_DIR / script), "--port", str(port), "--upstream", f"http://127.0.0.1:{upstream_port}"],
    )
    H.wait_ready(
        proc, port, "POST", H.DIRECT_PATH, H.REQUEST_BODY, H.REQUEST_HEADERS, ok=lambda s: s == 200, timeout=20.0
    )
    return proc, port


# --------------------------------------------------------------------------- report


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _errors_cell(row: dict) -> str:
    if row.get("failed") and row.get("rps") is None:
        return "FAILED"
    parts = []
    if row.get("non2xx"):
        parts.append(f"non2xx:{row['non2xx']}")
    for k, v in (row.get("socket_errors") or {}).items():
        if v:
            parts.append(f"{k}:{v}")
    return " ".join(parts) if parts else "0"


def print_table(results: list) -> None:
    hdr = (
        f"{'target':<16} | {'conns':>5} | {'req/s':>10} | {'p50 ms':>8} | {'p99 ms':>8} | {'cpu us/call':>11} | "
        f"{'errors':<8} | noise"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        print(
            f"{r['target']:<16} | {r['conns']:>5} | {_fmt(r.get('rps'), ',.0f'):>10} | "
            f"{_fmt(r.get('p50_ms'), '.3f'):>8} | {_fmt(r.get('p99_ms'), '.3f'):>8} | "
            f"{_fmt(r.get('cpu_us_per_call'), '.1f'):>11} | {_errors_cell(r):<8} | "
            f"{H.noise_cell(r.get('noise'))}"
        )
    for r in results:
        if r.get("failed"):
            print(f"  ! {r['target']} c{r['conns']}: {r['failed'].splitlines()[0][:200]}")
        elif r.get("smoke_problem") and r["conns"] == 1:
            print(f"  ! {r['smoke_problem'][:300]}")
    noisy = [r for r in results if H.noise_cell(r.get("noise"))]
    if noisy:
        print("  ! noise: CPU used during the measurement by processes outside this benchmark (other, % of the")
        print("    machine) or taken by the hypervisor (steal); those rows are unreliable, rerun on an idle machine.")
        hogs: dict[int, dict] = {}
        for r in noisy:
            for h in r["noise"].get("other_top", []):
                if h["pid"] not in hogs or h["cpu_pct"] > hogs[h["pid"]]["cpu_pct"]:
                    hogs[h["pid"]] = h
        for h in sorted(hogs.values(), key=lambda h: -h["cpu_pct"])[:5]:
            print(f"    busy: pid {h['pid']} {h['cmd']} (up to {h['cpu_pct']}% of a CPU)")


def _row(results, target, conns):
    for r in results:
        if r["target"] == target and r["conns"] == conns:
            return r
    return None


def compute_goals(results: list, gateway_skipped: bool) -> list[dict]:
    goals = []
    gw32, gw1 = _row(results, "gateway", 32), _row(results, "gateway", 1)

    def usable(r):
        return r is not None and r.get("rps") is not None and not r.get("failed")

    def entry(label, value, fmt, ok, goal_text, extra=""):
        return {"label": label, "value": value, "fmt": fmt, "ok": ok, "goal": goal_text, "note": extra}

    def gw_note(*rows):
        errs = sum((r.get("errors_total") or 0) for r in rows if r)
        return f"gateway answered {errs} errors" if errs else ""

    def noisy(*rows):
        return any(H.noise_cell(r.get("noise")) for r in rows if r)

    for label, peer, goal, stretch in (
        ("gateway / nginx-proxy req/s @32", "nginx-proxy", GOAL_RATIO_NGINX, STRETCH_RATIO_NGINX),
        ("gateway / aiohttp-proxy req/s @32", "aiohttp-proxy", GOAL_RATIO_AIOHTTP, None),
    ):
        p32 = _row(results, peer, 32)
        goal_text = f">= {goal}" + (f" (stretch {stretch})" if stretch else "")
        if gateway_skipped:
            goals.append(entry(label, None, "", None, goal_text, "gateway skipped"))
        elif p32 is None:
            goals.append(entry(label, None, "", None, goal_text, f"{peer} not measured"))
        elif not (usable(gw32) and usable(p32)) or not p32["rps"]:
            goals.append(entry(label, None, "", False, goal_text, "no valid measurement"))
        else:
            v = gw32["rps"] / p32["rps"]
            note = gw_note(gw32)
            ok = v >= goal and not note
            if ok and stretch is not None:
                note = "stretch met" if v >= stretch else "stretch missed"
            if noisy(gw32, p32):
                note = ", ".join(x for x in (note, "noisy measurement") if x)
            goals.append(entry(label, v, ".3f", ok, goal_text, note))

    label = "gateway added p50 @1 vs direct (ms)"
    d1 = _row(results, "direct", 1)
    if gateway_skipped:
        goals.append(entry(label, None, "", None, f"< {GOAL_ADDED_P50_MS}", "gateway skipped"))
    elif d1 is None:
        goals.append(entry(label, None, "", None, f"< {GOAL_ADDED_P50_MS}", "direct not measured"))
    elif not (usable(gw1) and usable(d1)) or gw1["p50_ms"] is None or d1["p50_ms"] is None:
        goals.append(entry(label, None, "", False, f"< {GOAL_ADDED_P50_MS}", "no valid measurement"))
    else:
        v = gw1["p50_ms"] - d1["p50_ms"]
        note = gw_note(gw1)
        ok = v < GOAL_ADDED_P50_MS and not note
        if noisy(gw1, d1):
            note = ", ".join(x for x in (note, "noisy measurement") if x)
        goals.append(entry(label, v, ".3f", ok, f"< {GOAL_ADDED_P50_MS}", note))
    return goals


def print_goals(goals: list[dict]) -> None:
    print()
    for g in goals:
        val = "n/a" if g["value"] is None else format(g["value"], g["fmt"])
        verdict = "n/a" if g["ok"] is None else ("goal met" if g["ok"] else "goal missed")
        note = f"  ({g['note']})" if g["note"] else ""
        print(f"{g['label']:<36} {val:>8}   goal {g['goal']:<28} {verdict}{note}")


def versions(python: str) -> dict:
    return H.versions({"python": [python, "-V"], "nginx": ["nginx", "-v"], "wrk": ["wrk", "-v"]})


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=None, help="seconds per measurement (default 10)")
    ap.add_argument("--quick", action="store_true", help="3 s per measurement (unless --duration is given)")
    ap.add_argument(
        "--repeat", type=int, default=1, help="runs per measurement; the fastest clean run is reported (default 1)"
    )
    ap.add_argument("--skip-gateway", action="store_true", help="measure only the peers")
    ap.add_argument("--only", default="", help="comma-separated subset of targets (direct is always started)")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the peers and the gateway")
    ap.add_argument("--gateway-arg", action="append", default=[], help="extra argument for `gateway serve`")
    H.add_gateway_root_arg(ap)
    ap.add_argument(
        "--conns",
        default="1,32",
        help="comma-separated connection levels to measure, from 1 and 32 (default 1,32)",
    )
    ap.add_argument(
        "--pin",
        action="store_true",
        help="pin wrk to the last CPU and every server to the others (default: no pinning)",
    )
    ap.add_argument("--output", default=str(H.RESULTS_DIR / "http-latest.json"))
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print raw wrk output")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    if args.duration is None:
        args.duration = 3.0 if args.quick else 10.0
    args.repeat = max(1, args.repeat)
    H.install_signal_handlers()
    levels = {c: (t, c) for t, c in CONN_LEVELS}
    try:
        args.levels = [levels[int(c)] for c in args.conns.split(",") if c.strip()]
    except (KeyError, ValueError):
        ap.error(f"--conns: choose from {','.join(str(c) for c in levels)}")

    if not shutil.which("wrk"):
        H.log("wrk not found (apt-get install -y wrk)")
        return 2
    wanted = {t.strip() for t in args.only.split(",") if t.strip()}

    def want(t):
        return not wanted or t in wanted

    gateway_skipped = args.skip_gateway or not want("gateway")
    if not gateway_skipped:
        try:
            H.set_gateway_root(args.gateway_root, args.python)
        except (H.StartupError, subprocess.TimeoutExpired) as e:
            H.log(f"gateway root not usable: {e}")
            return 2
        problem = H.gateway_cli_problem(args.python)
        if problem:
            H.log(f"gateway not runnable: {problem}")

    wrk_cpus = server_cpus = None
    ncpu = os.cpu_count() or 1
    if args.pin and ncpu >= 2:
        wrk_cpus, server_cpus = {ncpu - 1}, set(range(ncpu - 1))

    results: list[dict] = []
    started = time.time()
    with H.Procs(keep_tmp=args.keep_tmp, server_cpus=server_cpus) as procs:
        lua = wrk_lua(procs.tmp / "post.lua")
        try:
            direct, direct_port = H.start_direct_nginx(procs)
        except H.StartupError as e:
            H.log(f"cannot start the direct nginx upstream: {e}")
            return 1
        H.log(f"direct nginx upstream on 127.0.0.1:{direct_port}")
        if want("direct"):
            measure(procs, "direct", direct_port, H.DIRECT_PATH, lua, args, results, wrk_cpus, cpu_sid=direct.pid)
        plan = [
            ("nginx-proxy", lambda: H.start_proxy_nginx(procs, direct_port), H.DIRECT_PATH),
            (
                "aiohttp-proxy",
                lambda: start_python_peer(procs, "aiohttp-proxy", "aiohttp_proxy.py", direct_port, args.python),
                H.DIRECT_PATH,
            ),
            (
                "starlette-httpx",
                lambda: start_python_peer(
                    procs, "starlette-httpx", "starlette_httpx_proxy.py", direct_port, args.python
                ),
                H.DIRECT_PATH,
            ),
        ]
        if not gateway_skipped:
            plan.append(
                (
                    "gateway",
                    lambda: H.start_gateway(
                        procs, args.python, f"http://127.0.0.1:{direct_port}", extra_args=args.gateway_arg
                    ),
                    H.GATEWAY_PATH,
                )
            )
        for name, starter, path in plan:
            if want(name):
                run_target(procs, name, starter, path, lua, args, results, wrk_cpus)
        if not direct.alive():
            direct.dump_log("(direct upstream exited) ")

    print()
    print(
        f"HTTP benchmark: {args.duration:g} s per measurement"
        f"{f' (best of {args.repeat})' if args.repeat > 1 else ''}, wrk POST {len(H.REQUEST_BODY)} B JSON, "
        f"{ncpu} CPUs{', pinned' if wrk_cpus else ''}"
    )
    print()
    print_table(results)
    goals = compute_goals(results, gateway_skipped)
    print_goals(goals)

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "http",
        "timestamp": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "duration_s": args.duration,
        "repeat": args.repeat,
        "wall_s": round(time.time() - started, 1),
        "pinned": bool(wrk_cpus),
        "gateway_skipped": gateway_skipped,
        "gateway_root": str(H.GATEWAY_ROOT),
        "conns": [c for _, c in args.levels],
        "environment": versions(args.python),
        "results": results,
        "goals": [{k: g[k] for k in ("label", "value", "ok", "goal", "note")} for g in goals],
    }
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nresults written to {out}")
    return 1 if any(r.get("failed") for r in results) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        H.log("interrupted; all started processes were stopped")
        sys.exit(130)
