#!/usr/bin/env python3
"""Python function calls per proxied HTTP call, per revision: the cost figure that survives steal.

    .venv/bin/python benchmarks/calls_per_call.py                      # a476c78 and HEAD
    .venv/bin/python benchmarks/calls_per_call.py --rev a476c78 --rev e916d31 --rev HEAD --seconds 3
    .venv/bin/python benchmarks/calls_per_call.py --protocol grpc     # per unary gRPC call (h2load)

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
import json
import pstats
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as H  # noqa: E402
from ab import export, git  # noqa: E402

# Run as `python -c WRAPPER OUT serve ...` with cwd = the revision's tree: the tree comes first on
# sys.path, the profiler is armed by SIGUSR1 and written by SIGUSR2.
WRAPPER = """
import cProfile, os, runpy, signal, sys
sys.path.insert(0, os.getcwd())
out, prof = sys.argv[1], cProfile.Profile()
signal.signal(signal.SIGUSR1, lambda *_: prof.enable())
def _dump(*_):
    prof.disable()
    prof.dump_stats(out)
signal.signal(signal.SIGUSR2, _dump)
sys.argv = ["gateway"] + sys.argv[2:]
runpy.run_module("gateway", run_name="__main__", alter_sys=True)
"""
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
    return counts


def measure(procs: H.Procs, python: str, root: Path, plane_port: int, seconds: float, tmp: Path) -> tuple[dict, int]:
    cfg = tmp / f"{root.name}-table.yaml"
    cfg.write_text(H.gateway_table(f"http://127.0.0.1:{plane_port}"))
    out = tmp / f"{root.name}.prof"
    port, admin = H.free_port(), H.free_port()
    argv = [python, "-c", WRAPPER, str(out), "serve", "--config", str(cfg), "--host", "127.0.0.1",
            "--port", str(port), "--admin-port", str(admin)]  # fmt: skip
    proc = procs.start(f"gateway-{root.name[:10]}", argv, cwd=root)
    H.wait_ready(proc, admin, "GET", "/readyz", ok=lambda s: s == 200, timeout=30.0)
    lua = tmp / "post.lua"
    headers = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in H.REQUEST_HEADERS.items())
    lua.write_text(f"wrk.method = \"POST\"\nwrk.body = '{H.REQUEST_BODY.decode()}'\n{headers}\n")
    url = f"http://127.0.0.1:{port}{H.GATEWAY_PATH}"
    subprocess.run(["wrk", "-t2", "-c32", "-d1s", "-s", str(lua), url], capture_output=True, timeout=60)
    proc.popen.send_signal(signal.SIGUSR1)
    r = subprocess.run(["wrk", "-t2", "-c32", f"-d{seconds:g}s", "-s", str(lua), url],
                       capture_output=True, text=True, timeout=60 + seconds)  # fmt: skip
    proc.popen.send_signal(signal.SIGUSR2)
    for _ in range(100):
        if out.exists() and out.stat().st_size:
            break
        time.sleep(0.1)
    time.sleep(0.5)  # the dump is written in one go; let it finish
    procs.stop(proc)
    m = re.search(r"(\d+) requests in", r.stdout)
    if not m or "Non-2xx" in r.stdout:
        raise SystemExit(f"wrk against {root} failed:\n{r.stdout}{r.stderr}")
    calls = int(m.group(1))
    return per_call(out, calls), calls


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
    results: list[dict] = []
    with H.Procs() as procs:
        if grpc:
            import run_grpc

            _plane, plane_port = run_grpc.start_plane(procs, args.python)
        else:
            _plane, plane_port = H.start_direct_nginx(procs)
        for spec in specs:
            sha = git(repo, "rev-parse", "--verify", f"{spec}^{{commit}}")
            root = export(repo, sha)
            if grpc:
                counts, calls = measure_grpc(
                    procs,
                    args.python,
                    root,
                    plane_port,
                    args.grpc_calls,
                    procs.tmp,
                    Path(args.keep_profiles) if args.keep_profiles else None,
                )
            else:
                counts, calls = measure(procs, args.python, root, plane_port, args.seconds, procs.tmp)
            hot = {k: v for k, v in counts.items() if v >= HOT}
            results.append({"rev": spec, "sha": sha, "calls": calls, "per_call": sum(counts.values()),
                            "hot_per_call": sum(hot.values()), "hot": hot})  # fmt: skip
            H.log(
                f"{spec} ({sha[:7]}): {calls:,} calls profiled, {sum(hot.values()):.1f} hot-path Python calls per call"
            )
    base = results[0]
    print(f"\n{'revision':<22} {'calls profiled':>14} {'hot calls/call':>15} {'vs ' + base['rev']:>12}")
    for r in results:
        change = (r["hot_per_call"] / base["hot_per_call"] - 1) * 100
        print(f"{r['rev'] + ' ' + r['sha'][:7]:<22} {r['calls']:>14,} {r['hot_per_call']:>15.1f} {change:>+11.1f}%")
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
