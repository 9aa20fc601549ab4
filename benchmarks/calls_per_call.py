#!/usr/bin/env python3
"""Python function calls per proxied HTTP call, per revision: the cost figure that survives steal.

    .venv/bin/python benchmarks/calls_per_call.py                      # a476c78 and HEAD
    .venv/bin/python benchmarks/calls_per_call.py --rev a476c78 --rev e916d31 --rev HEAD --seconds 3
    .venv/bin/python benchmarks/calls_per_call.py --protocol grpc     # per unary gRPC call (h2load)
    .venv/bin/python benchmarks/calls_per_call.py --rev HEAD --variant plain --variant access-log --variant otel

Wall-clock and CPU figures on this machine move by 20-50% between runs (hypervisor steal, other
processes on two cores), which hides a 10% change. The number of Python function calls the gateway
makes per proxied call does not move: on the hot path the time goes to those calls and to the two
loopback sends per call, and the sends are the same for every revision (`strace -c` agrees). So a
change in calls per call is a change in gateway CPU per call, measured without noise.

Each revision is exported like `ab.py` does (`git archive` into /tmp/ab-<sha>) and started as
`python -m gateway serve` with that cwd, in front of the same nginx plane, with cProfile armed but
off. After a 1 s wrk warm-up, SIGUSR1 turns the profiler on, wrk sends the benchmark's POST over 32
connections for `--seconds`, SIGUSR2 turns it off and writes the profile. The figure is the calls
counted by the profiler divided by the calls wrk completed; the functions whose count per call
differs between revisions are listed (only those called at least 0.9 times per call: the hot path).

`--variant` (repeatable; default `plain`) measures each revision as `plain` (`gateway serve`),
`access-log` (`--access-log FILE`, JSON), `otel` (`--otel --otel-sample-ratio 0.01`, exporting to
run_obs.py's sink) or `otel-all` (ratio 1: what one traced call costs), so the cost of issue 13's sinks is counted, not timed. The profiler counts the
calls of the thread that armed it (the event loop's); the other threads' calls (the access log's
writer, the SDK's exporter) are counted by a profiler of their own, started with the thread, whose
counts at SIGUSR1 are subtracted from those at SIGUSR2 (`thread` in the table). Also per call: the
process's context switches (voluntary + involuntary, all threads, from /proc), which count the
wake-ups of the threads and their GIL hand-offs; and the CPU µs per call (user + system, from
/proc) of the gateway process (`cpu µs`, inflated by the profiler: compare variants) and of its
children (`child`: the access log's writer process). `--rev .` is the working tree as it is (not a
commit).
Writes benchmarks/results/calls-per-call-latest.json.

`--protocol grpc` counts the same way per unary gRPC call: the gateway serves `--grpc-port` in front
of run_grpc.py's plane (peers/grpc_plane.py), and the load is h2load on one connection with 32
streams in flight (like run_grpc.py's one channel at 32 calls) POSTing a prebuilt length-prefixed
16-byte message to /bench.Echo/Say, a fixed `--grpc-calls` calls after a warm-up of 2,000. h2load
does not read trailers, so the run also requires every call in the gateway's
`gateway_requests_total` to have ended OK. Writes benchmarks/results/calls-per-call-grpc-latest.json.
"""

from __future__ import annotations

import argparse
import http.server
import json
import marshal
import os
import pstats
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as H  # noqa: E402
from ab import export, git  # noqa: E402
from run_obs import Sink  # noqa: E402

# Run as `python -c WRAPPER OUT serve ...` with cwd = the revision's tree: the tree comes first on
# sys.path, the profiler is armed by SIGUSR1 and written by SIGUSR2.
# Threads other than the loop's run under a profiler of their own from their start (cProfile can
# only be switched on by the thread it profiles); their counts are snapshot at both signals.
WRAPPER = """
import cProfile, marshal, os, runpy, signal, sys, threading
sys.path.insert(0, os.getcwd())
out, prof = sys.argv[1], cProfile.Profile()
threads, marks = [], []
_run = threading.Thread.run
def _profiled_run(self):
    p = cProfile.Profile()
    threads.append(p)
    p.runcall(_run, self)
threading.Thread.run = _profiled_run
def _snapshot():
    stats = {}
    for p in threads:
        p.snapshot_stats()
        for k, v in p.stats.items():
            stats[k] = stats.get(k, 0) + v[1]
    return stats
def _arm(*_):
    marks.append(_snapshot())
    prof.enable()
def _dump(*_):
    prof.disable()
    prof.dump_stats(out)
    after = _snapshot()
    with open(out + ".threads", "wb") as f:
        marshal.dump({k: n - marks[0].get(k, 0) for k, n in after.items()}, f)
signal.signal(signal.SIGUSR1, _arm)
signal.signal(signal.SIGUSR2, _dump)
sys.argv = ["gateway"] + sys.argv[2:]
runpy.run_module("gateway", run_name="__main__", alter_sys=True)
"""
VARIANTS = {
    "plain": [],
    "access-log": ["--access-log", "{tmp}/access-{name}.log"],
    "otel": ["--otel", "--otel-sample-ratio", "0.01"],
    "otel-all": ["--otel", "--otel-sample-ratio", "1"],  # every call traced: the cost of one traced call
}
HOT = 0.9  # calls per proxied call for a function to count as on the hot path


def _name(filename: str, func: str) -> str:
    short = filename.split("/gateway/", 1)[-1] if "/gateway/" in filename else filename.rsplit("/", 1)[-1]
    # Built-ins are keyed by name only: `<built-in method __new__ of type object at 0x...>` differs per process.
    return f"{short}:{re.sub(r' at 0x[0-9a-f]+', '', func)}"


def per_call(profile: Path, calls: int) -> dict[str, float]:
    counts: dict[str, float] = {}
    for (filename, _line, func), (_cc, ncalls, *_rest) in pstats.Stats(str(profile)).stats.items():  # type: ignore[attr-defined]
        key = _name(filename, func)
        counts[key] = counts.get(key, 0.0) + ncalls / calls
    threads = Path(str(profile) + ".threads")
    if threads.exists():
        for (filename, _line, func), ncalls in marshal.loads(threads.read_bytes()).items():
            if ncalls:
                key = "thread " + _name(filename, func)
                counts[key] = counts.get(key, 0.0) + ncalls / calls
    return counts


def switches(pid: int) -> int:
    """Context switches of every thread of `pid` so far (voluntary + involuntary)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "status").read_text()
        except OSError:  # a thread that just ended
            continue
        total += sum(int(line.split()[1]) for line in text.splitlines() if "ctxt_switches:" in line)
    return total


def cpu(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) so far of `pid` and of its children (the access log's writer)."""
    tick = os.sysconf("SC_CLK_TCK")

    def of(p: str) -> float:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / tick

    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return of(str(pid)), sum(of(k) for k in kids)


def measure(
    procs: H.Procs, python: str, root: Path, plane_port: int, seconds: float, tmp: Path, variant: str = "plain"
) -> tuple[dict, int, float]:  # fmt: skip
    name = f"{root.name}-{variant}"
    cfg = tmp / f"{name}-table.yaml"
    cfg.write_text(H.gateway_table(f"http://127.0.0.1:{plane_port}"))
    out = tmp / f"{name}.prof"
    port, admin = H.free_port(), H.free_port()
    extra = [a.format(tmp=tmp, name=name) for a in VARIANTS[variant]]
    argv = [python, "-c", WRAPPER, str(out), "serve", "--config", str(cfg), "--host", "127.0.0.1",
            "--port", str(port), "--admin-port", str(admin), *extra]  # fmt: skip
    proc = procs.start(f"gateway-{name[:10]}", argv, cwd=root)
    H.wait_ready(proc, admin, "GET", "/readyz", ok=lambda s: s == 200, timeout=30.0)
    lua = tmp / "post.lua"
    headers = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in H.REQUEST_HEADERS.items())
    lua.write_text(f"wrk.method = \"POST\"\nwrk.body = '{H.REQUEST_BODY.decode()}'\n{headers}\n")
    url = f"http://127.0.0.1:{port}{H.GATEWAY_PATH}"
    subprocess.run(["wrk", "-t2", "-c32", "-d1s", "-s", str(lua), url], capture_output=True, timeout=60)
    proc.popen.send_signal(signal.SIGUSR1)
    switched, (own, child) = switches(proc.pid), cpu(proc.pid)
    r = subprocess.run(["wrk", "-t2", "-c32", f"-d{seconds:g}s", "-s", str(lua), url],
                       capture_output=True, text=True, timeout=60 + seconds)  # fmt: skip
    switched = switches(proc.pid) - switched
    own_after, child_after = cpu(proc.pid)
    proc.popen.send_signal(signal.SIGUSR2)
    threads = Path(str(out) + ".threads")
    for _ in range(100):
        if threads.exists() and threads.stat().st_size:
            break
        time.sleep(0.1)
    time.sleep(0.5)  # the dump is written in one go; let it finish
    procs.stop(proc)
    m = re.search(r"(\d+) requests in", r.stdout)
    if not m or "Non-2xx" in r.stdout:
        raise SystemExit(f"wrk against {root} failed:\n{r.stdout}{r.stderr}")
    calls = int(m.group(1))
    # CPU µs per call of the gateway process (profiled: inflated, compare variants) and its children.
    CPU[root.name + variant] = ((own_after - own) / calls * 1e6, (child_after - child) / calls * 1e6)
    return per_call(out, calls), calls, switched / calls


CPU: dict[str, tuple[float, float]] = {}  # per measured run: gateway and child CPU µs per call
GRPC_MESSAGE = b"calls-per-call.."  # 16 bytes, as run_grpc.py's unary load
GRPC_WARMUP = 2000


def _h2load(url: str, body: Path, calls: int, timeout: float) -> int:
    """Unary gRPC calls with h2load (one connection, 32 streams in flight); the calls that got a 2xx."""
    import run_grpc

    argv = ["h2load", "-n", str(calls), "-c1", "-m32", "-d", str(body), "-H", "content-type: application/grpc",
            "-H", "te: trailers", "-H", f"authorization: Api-Key {H.API_KEY}",
            "-H", f":authority: {run_grpc.AUTHORITY}", url]  # fmt: skip
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    m = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, (\d+) errored", r.stdout)
    if r.returncode != 0 or not m or int(m.group(2)) or int(m.group(3)):
        raise SystemExit(f"h2load {url} failed:\n{r.stdout}{r.stderr}")
    return int(m.group(1))


def _grpc_not_ok(admin: int) -> dict[str, float]:
    """Calls the gateway counted with a code other than OK (h2load sees only the 200 of a gRPC error)."""
    _status, text = H.http_request(admin, "GET", "/metrics")
    bad: dict[str, float] = {}
    for line in text.decode().splitlines():
        m = re.match(r'gateway_requests_total\{.*code="([^"]*)".*\} ([0-9.e+]+)$', line)
        if m and m.group(1) != "OK" and float(m.group(2)):
            bad[m.group(1)] = bad.get(m.group(1), 0.0) + float(m.group(2))
    return bad


def measure_grpc(
    procs: H.Procs, python: str, root: Path, plane_port: int, calls: int, tmp: Path, keep: Path | None = None
) -> tuple[dict, int]:
    """`measure` for unary gRPC: h2load against the gateway's --grpc-port, a fixed number of calls
    (`keep`: a folder to copy the profile to, for `pstats` callers of a function the table lists)."""
    import run_grpc

    cfg = tmp / f"{root.name}-grpc-table.yaml"
    cfg.write_text(run_grpc.gateway_table(plane_port))
    out = tmp / f"{root.name}-grpc.prof"
    port, admin, grpc_port = H.free_port(), H.free_port(), H.free_port()
    argv = [python, "-c", WRAPPER, str(out), "serve", "--config", str(cfg), "--host", "127.0.0.1",
            "--port", str(port), "--admin-port", str(admin), "--grpc-port", str(grpc_port)]  # fmt: skip
    proc = procs.start(f"gateway-grpc-{root.name[:10]}", argv, cwd=root)
    H.wait_ready(proc, admin, "GET", "/readyz", ok=lambda s: s == 200, timeout=30.0)
    run_grpc.wait_grpc(proc, grpc_port, run_grpc.AUTHORITY, H.API_KEY)
    body = tmp / "grpc-unary.bin"
    body.write_bytes(b"\0" + len(GRPC_MESSAGE).to_bytes(4, "big") + GRPC_MESSAGE)
    url = f"http://127.0.0.1:{grpc_port}/bench.Echo/Say"
    _h2load(url, body, GRPC_WARMUP, 60)
    proc.popen.send_signal(signal.SIGUSR1)
    done = _h2load(url, body, calls, 120 + calls / 500)
    proc.popen.send_signal(signal.SIGUSR2)
    for _ in range(100):
        if out.exists() and out.stat().st_size:
            break
        time.sleep(0.1)
    time.sleep(0.5)  # the dump is written in one go; let it finish
    bad = _grpc_not_ok(admin)
    procs.stop(proc)
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(out, keep / f"grpc-{root.name.removeprefix('ab-')[:10]}.prof")
    if bad or done != calls:
        raise SystemExit(f"gRPC calls against {root} did not all end OK: {done} of {calls} 2xx, codes {bad}")
    return per_call(out, calls), calls


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", action="append", default=[], help="revision to measure (repeatable; default a476c78 HEAD)")
    ap.add_argument("--variant", action="append", default=[], choices=sorted(VARIANTS),
                    help="gateway flags to measure each revision with (repeatable; default plain)")  # fmt: skip
    ap.add_argument("--seconds", type=float, default=3.0, help="profiled wrk run per revision (default 3)")
    ap.add_argument("--repo", default=str(H.REPO_ROOT))
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--protocol", choices=("http", "grpc"), default="http",
                    help="http: wrk POSTs to the public port; grpc: h2load unary calls to --grpc-port")  # fmt: skip
    ap.add_argument("--grpc-calls", type=int, default=20000, help="profiled unary calls per revision (grpc)")
    ap.add_argument("--keep-profiles", metavar="DIR", default=None, help="copy each gRPC profile to DIR (grpc)")
    ap.add_argument("--output", default=None, help="default results/calls-per-call[-grpc]-latest.json")
    args = ap.parse_args()
    grpc = args.protocol == "grpc"
    if args.output is None:
        args.output = str(H.RESULTS_DIR / f"calls-per-call{'-grpc' if grpc else ''}-latest.json")
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    H.install_signal_handlers()
    repo = Path(args.repo).resolve()
    specs = args.rev or ["a476c78", "HEAD"]
    variants = args.variant or ["plain"]
    if grpc and variants != ["plain"]:
        ap.error("--variant is measured over HTTP only (--protocol http)")
    results: list[dict] = []
    with H.Procs() as procs:
        if grpc:
            import run_grpc

            _plane, plane_port = run_grpc.start_plane(procs, args.python)
        else:
            _plane, plane_port = H.start_direct_nginx(procs)
        sink = None
        if any(v.startswith("otel") for v in variants):
            sink = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
            threading.Thread(target=sink.serve_forever, daemon=True).start()
            os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{sink.server_address[1]}"
        for spec in specs:
            if spec == ".":  # the working tree, uncommitted changes included
                sha, root = "worktree", repo
            else:
                sha = git(repo, "rev-parse", "--verify", f"{spec}^{{commit}}")
                root = export(repo, sha)
            for variant in variants:
                if grpc:
                    keep = Path(args.keep_profiles) if args.keep_profiles else None
                    counts, calls = measure_grpc(procs, args.python, root, plane_port, args.grpc_calls, procs.tmp, keep)
                    switched = 0.0  # not counted for gRPC
                else:
                    counts, calls, switched = measure(
                        procs, args.python, root, plane_port, args.seconds, procs.tmp, variant
                    )
                hot = {k: v for k, v in counts.items() if v >= HOT}
                label = spec if len(variants) == 1 else f"{spec} {variant}"
                results.append({"rev": label, "sha": sha, "variant": variant, "calls": calls,
                                "per_call": sum(counts.values()), "hot_per_call": sum(hot.values()),
                                "thread_per_call": sum(v for k, v in counts.items() if k.startswith("thread ")),
                                "switches_per_call": switched, "hot": hot,
                                "cpu_us_per_call": CPU.get(root.name + variant, (0.0, 0.0))})  # fmt: skip
                H.log(f"{label} ({sha[:7]}): {calls:,} calls profiled, {sum(hot.values()):.1f} hot-path Python "
                      f"calls per call, {switched:.2f} context switches per call")  # fmt: skip
        if sink is not None:
            sink.shutdown()
    base = results[0]
    print(f"\n{'revision':<26} {'calls profiled':>14} {'hot calls/call':>15} {'vs ' + base['rev']:>14} "
          f"{'all calls/call':>15} {'thread':>7} {'switches':>9} {'cpu µs':>7} {'child':>6}")  # fmt: skip
    for r in results:
        change = (r["hot_per_call"] / base["hot_per_call"] - 1) * 100
        print(f"{r['rev'] + ' ' + r['sha'][:7]:<26} {r['calls']:>14,} {r['hot_per_call']:>15.1f} {change:>+13.1f}% "
              f"{r['per_call']:>15.1f} {r['thread_per_call']:>7.1f} {r['switches_per_call']:>9.2f} "
              f"{r['cpu_us_per_call'][0]:>7.1f} {r['cpu_us_per_call'][1]:>6.1f}")  # fmt: skip
    for r in results[1:]:
        print(f"\nfunctions whose calls per call differ, {base['rev']} -> {r['rev']}:")
        names = set(base["hot"]) | set(r["hot"])
        for name in sorted(names, key=lambda n: r["hot"].get(n, 0) - base["hot"].get(n, 0)):
            b, a = base["hot"].get(name, 0.0), r["hot"].get(name, 0.0)
            if abs(a - b) >= 0.5:
                print(f"  {name[:72]:<72} {b:5.1f} -> {a:5.1f}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(
        json.dumps({"protocol": args.protocol, "seconds": args.seconds, "results": results}, indent=1) + "\n"
    )
    print(f"\nresults written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
