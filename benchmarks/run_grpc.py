#!/usr/bin/env python3
"""gRPC benchmark: unary calls/s and latency, server-streaming messages/s; direct vs gateway vs nginx grpc_pass.

Run from the repo root:

    /work/venv/bin/python benchmarks/run_grpc.py             # 5 s per measurement, about 1.5 min
    /work/venv/bin/python benchmarks/run_grpc.py --quick     # 2 s per measurement
    /work/venv/bin/python benchmarks/run_grpc.py --repeat 3  # best of 3 per measurement

Targets (all on 127.0.0.1, all started and stopped by this script):
  direct   the plane: benchmarks/peers/grpc_plane.py, a grpc.aio server relaying raw bytes
  gateway  `python -m gateway serve --grpc-port P` (one worker), its table's plane `grpc` = the plane
  nginx    nginx `grpc_pass` (h2c listener `listen ... http2`, keepalive upstream) in front of the plane

Load: benchmarks/peers/grpc_load.py in its own process: a stock grpc.aio client on one channel with
N calls in flight for a fixed time, after a 1 s warm-up. Unary: a 16-byte message, 1 and 32 calls in
flight. Server streaming: 1000 messages of 64 bytes per call, 4 calls in flight.
Goal printed: gateway unary calls/s at 32 in flight >= 0.5 x direct.
Writes benchmarks/results/grpc-latest.json.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as H  # noqa: E402

GOAL_RATIO = 0.5
AUTHORITY = f"model-{H.MODEL_ID}.grpc.{H.DOMAIN}"
LOADS = [("unary", 1), ("unary", 32), ("stream", 4)]  # (mode, calls in flight)
STREAM_COUNT, STREAM_SIZE = 1000, 64


# --------------------------------------------------------------------------- targets


def wait_grpc(proc: H.Proc, port: int, authority: str | None, key: str | None, timeout: float = 20.0) -> None:
    """Poll with one real gRPC call until it answers OK; fail fast if the process died."""
    import grpc

    deadline = time.monotonic() + timeout
    options = [("grpc.default_authority", authority)] if authority else []
    metadata = (("authorization", f"Api-Key {key}"),) if key else ()
    last = "no attempt"
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        say = channel.unary_unary("/bench.Echo/Say")
        while time.monotonic() < deadline:
            if not proc.alive():
                proc.dump_log("(process exited) ")
                raise H.StartupError(f"{proc.name} exited with code {proc.popen.returncode} during startup")
            try:
                if say(b"ping", metadata=metadata, timeout=2) == b"ping":
                    return
            except grpc.RpcError as e:
                last = f"{e.code()}: {e.details()}" if isinstance(e, grpc.Call) else repr(e)
            time.sleep(0.1)
    proc.dump_log("(not ready) ")
    raise H.StartupError(f"{proc.name} not answering gRPC on port {port} after {timeout:.0f}s (last: {last})")


def start_plane(procs: H.Procs, python: str) -> tuple[H.Proc, int]:
    port = H.free_port()
    proc = procs.start("grpc-plane", [python, str(H.PEERS_DIR / "grpc_plane.py"), "--port", str(port)])
    wait_grpc(proc, port, None, None)
    return proc, port


def gateway_table(plane_port: int) -> str:
    return f"""version: 1
domains: [{H.DOMAIN}]
regions: {{us: {{}}}}
planes: {{p1: {{region: us, url: "http://127.0.0.1:9", grpc: "127.0.0.1:{plane_port}"}}}}
teams: {{bench: {{}}}}
api_keys:
  - {{name: bench, team: bench, sha256: "{H.sha256_hex(H.API_KEY)}"}}
models:
  {H.MODEL_ID}:
    team: bench
    deployments: {{v1: {{plane: p1}}}}
    environments: {{production: {{deployment: v1}}}}
"""


def start_gateway(procs: H.Procs, python: str, plane_port: int, extra: list[str]) -> tuple[H.Proc, int]:
    cfg = procs.tmp / "grpc-table.yaml"
    cfg.write_text(gateway_table(plane_port))
    port, admin, grpc_port = H.free_port(), H.free_port(), H.free_port()
    argv = [python, "-m", "gateway", "serve", "--config", str(cfg), "--port", str(port), "--admin-port", str(admin),
            "--grpc-port", str(grpc_port), *extra]  # fmt: skip
    H.log(f"starting gateway: {' '.join(argv)}")
    proc = procs.start("gateway", argv, cwd=H.GATEWAY_ROOT)  # --gateway-root, else this checkout
    H.wait_ready(proc, admin, "GET", "/readyz", ok=lambda s: s == 200, timeout=30.0)
    wait_grpc(proc, grpc_port, AUTHORITY, H.API_KEY)
    return proc, grpc_port


def start_nginx(procs: H.Procs, plane_port: int) -> tuple[H.Proc, int]:
    port = H.free_port()
    user = "user root;" if os.geteuid() == 0 else ""
    tmp = procs.tmp
    conf = tmp / "nginx-grpc.conf"
    conf.write_text(f"""
{user}
worker_processes 1;
daemon off;
pid {tmp}/nginx-grpc.pid;
error_log {tmp}/nginx-grpc-error.log warn;
events {{ worker_connections 8192; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/ng-body;
    proxy_temp_path {tmp}/ng-proxy;
    fastcgi_temp_path {tmp}/ng-fastcgi;
    uwsgi_temp_path {tmp}/ng-uwsgi;
    scgi_temp_path {tmp}/ng-scgi;
    http2_max_requests 10000000;
    keepalive_timeout 300s;
    upstream plane {{ server 127.0.0.1:{plane_port}; keepalive 64; keepalive_requests 10000000; }}
    server {{
        listen 127.0.0.1:{port} http2 backlog=4096;
        location / {{ grpc_pass grpc://plane; }}
    }}
}}
""")
    prefix = tmp / "nginx-grpc-prefix"
    prefix.mkdir(exist_ok=True)
    argv = [H.nginx_binary(), "-c", str(conf), "-p", str(prefix), "-e", str(tmp / "nginx-grpc-error.log")]
    proc = procs.start("nginx-grpc", argv)
    wait_grpc(proc, port, AUTHORITY, None)
    return proc, port


# --------------------------------------------------------------------------- load


def cpu_ticks(pids: list[int]) -> int:
    """utime+stime of these processes, all their threads (clock ticks)."""
    return sum(H.process_cpu_ticks(pid) for pid in pids)


class CpuSampler:
    """CPU time of some processes sampled every 20 ms, so that the CPU of any past window can be read.

    The CPU per call of the gateway and of the plane is what the gateway's code changes; unlike
    calls/s it hardly moves with hypervisor steal or with the other processes on the machine.
    """

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.sample()
        self.thread.start()

    def sample(self) -> None:
        self.samples.append((time.monotonic(), {k: cpu_ticks(v) for k, v in self.groups.items()}))

    def _run(self) -> None:
        while not self.stopped.wait(0.02):
            self.sample()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()
        self.sample()

    def at(self, t: float, key: str) -> float:
        samples = self.samples
        for (t0, a), (t1, b) in zip(samples, samples[1:], strict=False):
            if t0 <= t <= t1:
                return a[key] + (b[key] - a[key]) * ((t - t0) / (t1 - t0) if t1 > t0 else 0.0)
        return float(samples[0][1][key] if t < samples[0][0] else samples[-1][1][key])

    def seconds(self, start: float, end: float, key: str) -> float:
        return (self.at(end, key) - self.at(start, key)) / os.sysconf("SC_CLK_TCK")


def run_load(python: str, port: int, authority: str | None, key: str | None, mode: str, concurrency: int,
             duration: float, cpus: set[int] | None, watch: dict[str, int]) -> dict:  # fmt: skip
    """One load run; `watch` names the sessions (target, plane) whose CPU per call is reported as `cpu_ms`."""
    argv = [python, str(H.PEERS_DIR / "grpc_load.py"), "--target", f"127.0.0.1:{port}", "--mode", mode,
            "--concurrency", str(concurrency), "--duration", str(duration), "--warmup", "1",
            "--stream-count", str(STREAM_COUNT), "--stream-size", str(STREAM_SIZE)]  # fmt: skip
    if authority:
        argv += ["--authority", authority]
    if key:
        argv += ["--key", key]
    pre = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=pre)
    groups = {name: H.session_pids(sid) for name, sid in watch.items()} | {"load": [popen.pid]}
    sampler = CpuSampler(groups)
    # The load generator prints its result as soon as its measured window is over (and its channel
    # closed): that moment, less the window's length, places the window on this clock. The channel's
    # close shifts both ends by the same few ms, from a busy warm-up to a quiet end, which cancel out.
    printed = None
    lines: list[bytes] = []
    timer = threading.Timer(duration + 60, popen.kill)
    timer.start()
    try:
        for line in popen.stdout:  # type: ignore[union-attr]
            printed = time.monotonic()
            lines.append(line)
        stderr = popen.stderr.read()  # type: ignore[union-attr]
        popen.wait()
    finally:
        timer.cancel()
        sampler.stop()
    if popen.returncode != 0:
        if popen.returncode < 0:
            return {"failed": "load generator did not finish in time"}
        return {"failed": f"load generator exit {popen.returncode}: {stderr.decode(errors='replace')[-500:]}"}
    result = json.loads(lines[-1].decode().strip())
    calls, elapsed = result.get("calls"), result.get("elapsed_s")
    if printed is not None and calls and elapsed:
        start = printed - elapsed
        result["cpu_ms"] = {k: round(1000 * sampler.seconds(start, printed, k) / calls, 3) for k in groups}
    return result


def measure(procs: H.Procs, name: str, port: int, args, results: list, cpus, watch: dict[str, int],
            loads=LOADS) -> None:  # fmt: skip
    authority = AUTHORITY if name != "direct" else None
    key = H.API_KEY if name == "gateway" else None
    for mode, concurrency in loads:
        runs = []
        for i in range(args.repeat):
            H.log(
                f"[{name}] {mode}, {concurrency} in flight, {args.duration:g} s"
                + (f", run {i + 1}" if args.repeat > 1 else "")
            )
            noise = H.CpuNoise({p.pid for p in procs.procs})
            r = run_load(args.python, port, authority, key, mode, concurrency, args.duration, cpus, watch)
            r["noise"] = noise.stop()
            runs.append(r)
        clean = [r for r in runs if "failed" not in r]
        best = max(clean, key=lambda r: r["calls_per_s"]) if clean else runs[-1]
        errors: dict[str, int] = {}
        for r in runs:
            for code, n in (r.get("errors") or {}).items():
                errors[code] = errors.get(code, 0) + n
        results.append({"target": name, "mode": mode, "concurrency": concurrency, **best, "errors": errors,
                        "runs": runs})  # fmt: skip


# --------------------------------------------------------------------------- report


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(results: list) -> None:
    hdr = (f"{'target':<8} | {'call shape':<18} | {'in flight':>9} | {'calls/s':>8} | {'messages/s':>10} | "
           f"{'p50 ms':>7} | {'p99 ms':>7} | {'cpu ms/call: self':>17} {'plane':>6} {'load':>6} | {'errors':<8} | noise")  # fmt: skip
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        shape = "unary" if r["mode"] == "unary" else f"server stream {STREAM_COUNT}"
        errors = "FAILED" if r.get("failed") else (" ".join(f"{k}:{v}" for k, v in r["errors"].items()) or "0")
        cpu = r.get("cpu_ms") or {}
        own = cpu.get("plane") if r["target"] == "direct" else cpu.get("target")
        plane = None if r["target"] == "direct" else cpu.get("plane")
        print(
            f"{r['target']:<8} | {shape:<18} | {r['concurrency']:>9} | {_fmt(r.get('calls_per_s'), ',.0f'):>8} | "
            f"{_fmt(r.get('messages_per_s'), ',.0f'):>10} | {_fmt(r.get('p50_ms'), '.2f'):>7} | "
            f"{_fmt(r.get('p99_ms'), '.2f'):>7} | {_fmt(own, '.3f'):>17} {_fmt(plane, '.3f'):>6} "
            f"{_fmt(cpu.get('load'), '.3f'):>6} | {errors:<8} | {H.noise_cell(r.get('noise'))}"
        )
    for r in results:
        if r.get("failed"):
            print(f"  ! {r['target']} {r['mode']} {r['concurrency']}: {r['failed'].splitlines()[0][:200]}")


def _row(results: list, target: str, mode: str, concurrency: int) -> dict | None:
    for r in results:
        if (r["target"], r["mode"], r["concurrency"]) == (target, mode, concurrency) and not r.get("failed"):
            return r
    return None


def compute_goals(results: list) -> list[dict]:
    goals = []
    gw, direct, nginx = (_row(results, t, "unary", 32) for t in ("gateway", "direct", "nginx"))

    def ratio(a: dict | None, b: dict | None, key: str) -> float | None:
        return a[key] / b[key] if a and b and b.get(key) else None

    value = ratio(gw, direct, "calls_per_s")
    noisy = any(H.noise_cell(r.get("noise"), threshold=10.0) for r in (gw, direct) if r)
    errors = f"gateway answered errors {gw['errors']}" if gw and gw["errors"] else ""
    if value is None:
        ok = None
    elif noisy:  # a loaded or stolen CPU skews one side: no verdict (a 37% steal once made 0.85 of it)
        ok = None
        errors = ", ".join(x for x in (errors, "not judged: noisy measurement, rerun on an idle machine") if x)
    else:
        ok = value >= GOAL_RATIO and not errors
    goals.append({"label": "gateway / direct unary calls/s @32", "value": value, "goal": f">= {GOAL_RATIO}",
                  "ok": ok, "note": errors})  # fmt: skip
    goals.append({"label": "gateway / nginx grpc_pass unary calls/s @32", "value": ratio(gw, nginx, "calls_per_s"),
                  "goal": "(for reference)", "ok": None, "note": ""})  # fmt: skip
    # CPU per call: what the gateway's code sets, and what steal barely moves (calls/s above stays the goal).
    cpu = (gw or {}).get("cpu_ms") or {}
    goals.append({"label": "gateway CPU ms per unary call @32", "value": cpu.get("target"), "goal": "(for reference)",
                  "ok": None, "note": ""})  # fmt: skip
    goals.append({"label": "plane CPU ms per unary call @32 (via gateway)", "value": cpu.get("plane"),
                  "goal": "(for reference)", "ok": None, "note": ""})  # fmt: skip
    direct_cpu = ((direct or {}).get("cpu_ms") or {}).get("plane")
    goals.append({"label": "plane CPU ms per unary call @32 (direct)", "value": direct_cpu, "goal": "(for reference)",
                  "ok": None, "note": ""})  # fmt: skip
    gw1, d1 = _row(results, "gateway", "unary", 1), _row(results, "direct", "unary", 1)
    added = gw1["p50_ms"] - d1["p50_ms"] if gw1 and d1 else None
    goals.append({"label": "gateway added p50 @1 (ms)", "value": added, "goal": "(for reference)", "ok": None,
                  "note": ""})  # fmt: skip
    gs, ds = _row(results, "gateway", "stream", 4), _row(results, "direct", "stream", 4)
    goals.append({"label": "gateway / direct streamed messages/s", "value": ratio(gs, ds, "messages_per_s"),
                  "goal": "(for reference)", "ok": None, "note": ""})  # fmt: skip
    return goals


def print_goals(goals: list[dict]) -> None:
    print()
    for g in goals:
        value = "n/a" if g["value"] is None else f"{g['value']:.3f}"
        if g["ok"] is not None:
            verdict = "goal met" if g["ok"] else "goal missed"
        else:
            verdict = "" if g["goal"].startswith("(") else "no verdict"
        note = f"  ({g['note']})" if g["note"] else ""
        print(f"{g['label']:<46} {value:>8}   {g['goal']:<16} {verdict}{note}")


def versions(python: str) -> dict:
    return H.versions(
        {
            "python": [python, "-V"],
            "grpcio": [python, "-c", "import grpc; print(grpc.__version__)"],
            "nginx": ["nginx", "-v"],
        }
    )


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=None, help="seconds per measurement (default 5)")
    ap.add_argument("--quick", action="store_true", help="2 s per measurement (unless --duration is given)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per measurement; the fastest is reported")
    ap.add_argument("--only", default="", help="comma-separated subset of targets: direct,gateway,nginx")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the peers and the gateway")
    ap.add_argument("--gateway-arg", action="append", default=[], help="extra argument for `gateway serve`")
    H.add_gateway_root_arg(ap)
    ap.add_argument(
        "--loads",
        default=",".join(f"{m}:{c}" for m, c in LOADS),
        help=f"comma-separated loads to measure, from {','.join(f'{m}:{c}' for m, c in LOADS)} (default: all)",
    )
    ap.add_argument("--pin", action="store_true", help="pin the load generator to the last CPU, servers to the others")
    ap.add_argument("--output", default=str(H.RESULTS_DIR / "grpc-latest.json"))
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    if args.duration is None:
        args.duration = 2.0 if args.quick else 5.0
    args.repeat = max(1, args.repeat)
    H.install_signal_handlers()
    known = {f"{m}:{c}": (m, c) for m, c in LOADS}
    try:
        loads = [known[x.strip()] for x in args.loads.split(",") if x.strip()]
    except KeyError:
        ap.error(f"--loads: choose from {','.join(known)}")
    wanted = {t.strip() for t in args.only.split(",") if t.strip()}
    if not wanted or "gateway" in wanted:
        try:
            H.set_gateway_root(args.gateway_root, args.python)
        except (H.StartupError, subprocess.TimeoutExpired) as e:
            H.log(f"gateway root not usable: {e}")
            return 2
    ncpu = os.cpu_count() or 1
    load_cpus = server_cpus = None
    if args.pin and ncpu >= 2:
        load_cpus, server_cpus = {ncpu - 1}, set(range(ncpu - 1))

    results: list[dict] = []
    started = time.time()
    with H.Procs(keep_tmp=args.keep_tmp, server_cpus=server_cpus) as procs:
        try:
            plane, plane_port = start_plane(procs, args.python)
        except H.StartupError as e:
            H.log(f"cannot start the gRPC plane: {e}")
            return 1
        H.log(f"gRPC plane on 127.0.0.1:{plane_port}")
        if not wanted or "direct" in wanted:
            measure(procs, "direct", plane_port, args, results, load_cpus, {"plane": plane.pid}, loads)
        plan = [
            ("gateway", lambda: start_gateway(procs, args.python, plane_port, args.gateway_arg)),
            ("nginx", lambda: start_nginx(procs, plane_port)),
        ]
        for name, starter in plan:
            if wanted and name not in wanted:
                continue
            try:
                proc, port = starter()
            except H.StartupError as e:
                H.log(f"[{name}] failed to start: {e}")
                results.extend({"target": name, "mode": m, "concurrency": c, "errors": {}, "failed": str(e)}
                               for m, c in loads)  # fmt: skip
                continue
            try:
                measure(procs, name, port, args, results, load_cpus, {"target": proc.pid, "plane": plane.pid},
                        loads)  # fmt: skip
                if not proc.alive():
                    proc.dump_log("(exited during the run) ")
            finally:
                procs.stop(proc)
        if not plane.alive():
            plane.dump_log("(plane exited) ")

    print()
    print(
        f"gRPC benchmark: {args.duration:g} s per measurement after 1 s warm-up"
        f"{f' (best of {args.repeat})' if args.repeat > 1 else ''}, grpc.aio load generator on one channel, "
        f"{ncpu} CPUs{', pinned' if load_cpus else ''}"
    )
    print()
    print_table(results)
    goals = compute_goals(results)
    print_goals(goals)

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "grpc",
        "timestamp": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "duration_s": args.duration,
        "repeat": args.repeat,
        "wall_s": round(time.time() - started, 1),
        "pinned": bool(load_cpus),
        "gateway_root": str(H.GATEWAY_ROOT),
        "loads": [f"{m}:{c}" for m, c in loads],
        "environment": versions(args.python),
        "results": results,
        "goals": goals,
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
