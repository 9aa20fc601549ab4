#!/usr/bin/env python3
"""Async inference benchmark (SPEC §10): durable submits/s, submit -> webhook latency, sync precedence.

Run from the repo root:

    .venv/bin/python benchmarks/run_async.py            # 10 s per measurement, about 75 s
    .venv/bin/python benchmarks/run_async.py --quick    # 3 s per measurement, about 35 s

Everything runs on 127.0.0.1 and is started and stopped by this script (benchmarks/_harness.py):
nginx `direct` (the instant plane of run_http.py), an aiohttp plane with a fixed delay and an
aiohttp webhook receiver (this file, `--role plane|receiver`, each its own process), and a fresh
`python -m gateway serve` (one worker, its own `--queue-store` directory) per phase.

1. Durable submits/s: wrk, 2 threads, 32 connections, `POST /production/async_predict` with the
   31-byte body of run_http.py (`{"model_input": ...}`, no webhook), 1 s warm-up, then --duration.
   Two runs: "runs parked" (the deployment is `scaled_to_zero`, so the queue only stores: its
   scheduler claims one request per tick, asks for a wake and puts it back) and "runs draining"
   (an active deployment on `direct`, concurrency_target 32: the queue runs what it accepts while
   submits arrive). The same wrk load on `POST /production/predict` of the draining gateway is the
   "queue disabled" comparison. Durable rows are counted in the SQLite file before and after the
   window; fsyncs (fsync + fdatasync syscalls of the gateway, counted by `perf stat` tracepoints)
   give submits per fsync, a lower bound of the submits per group commit (the scheduler's own
   commits and WAL checkpoints fsync too).
2. Submit -> webhook received: 100 submits/s (--rate), open loop, for --duration, against `direct`
   with a webhook to the receiver process. Latency = the receiver's time.time() when the POST
   arrives minus the load generator's time.time() just before it sent the submit (one clock).
3. Sync p50 under an async backlog: the plane answers after --plane-delay-ms (20), the environment
   has concurrency_target 4 (--concurrency-target), 2 sync clients (--sync-clients) call predict
   back to back. Measured with no backlog, then after --backlog (5,000) submits for the same
   deployment: async runs take only the concurrency sync leaves free.

Prints the tables and the goals, writes benchmarks/results/async-latest.json. Exit 0 when the run
completes (goals met or missed), 1 when it breaks (a process does not start, the time budget is
exceeded). See benchmarks/async.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as _dt
import hashlib
import hmac
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as H  # noqa: E402
from run_http import run_wrk, wrk_lua  # noqa: E402

GOAL_SUBMITS_PER_S = 2000.0
GOAL_E2E_P50_MS = 20.0
GOAL_E2E_P99_MS = 100.0
GOAL_SYNC_RATIO = 1.10

ASYNC_PATH = "/production/async_predict"
SECRET_ENV = "BENCH_WEBHOOK_SECRET"
SECRET = "bench-webhook-secret"
WRK_THREADS, WRK_CONNS = 2, 32
DRAIN_CONCURRENCY = 32  # concurrency_target of the active deployment in phases 1 and 2
FILL_CONNS = 32
HEADERS = {k: v for k, v in H.REQUEST_HEADERS.items() if k != "Host"}
HOST = H.REQUEST_HEADERS["Host"]


class OutOfTime(BaseException):
    """The run's time budget passed (a BaseException: no `except Exception` in a load loop eats it)."""


def runner():
    try:
        import uvloop

        return uvloop.run
    except ImportError:
        return asyncio.run


# --------------------------------------------------------------------------- peers (own processes)


def plane_role(port: int, delay_ms: float) -> None:
    """A model plane: POST /predict answers a fixed JSON after `delay_ms`; /wake and /health 200."""

    async def predict(request: web.Request) -> web.Response:
        await request.read()
        if delay_ms > 0:
            await asyncio.sleep(delay_ms / 1000)
        return web.Response(body=b'{"output": [1,2,3]}', content_type="application/json")

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/predict", predict)
    app.router.add_route("*", "/wake", ok)
    app.router.add_get("/health", ok)
    runner()(_serve(app, port))


def receiver_role(port: int) -> None:
    """The webhook receiver: takes time.time() as a POST /hook arrives, checks the Baseten signature
    (HMAC-SHA256 of the raw body with SECRET), answers 200. GET /records: {request_id: [t, ok]}."""
    records: dict[str, list] = {}
    key = os.environ.get(SECRET_ENV, SECRET).encode()

    async def hook(request: web.Request) -> web.Response:
        arrived = time.time()
        body = await request.read()
        want = hmac.new(key, body, hashlib.sha256).hexdigest()
        entries = [e.strip().removeprefix("v1=") for e in request.headers.get("x-baseten-signature", "").split(",")]
        rid = request.headers.get("x-baseten-request-id", "")
        records[rid] = [arrived, any(hmac.compare_digest(e, want) for e in entries)]
        return web.Response(text="ok")

    async def dump(request: web.Request) -> web.Response:
        return web.json_response(records)

    async def count(request: web.Request) -> web.Response:
        return web.json_response(len(records))

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    app.router.add_get("/records", dump)
    app.router.add_get("/count", count)
    app.router.add_get("/health", ok)
    runner()(_serve(app, port))


async def _serve(app: web.Application, port: int) -> None:
    site_runner = web.AppRunner(app, access_log=None)
    await site_runner.setup()
    await web.TCPSite(site_runner, "127.0.0.1", port, backlog=1024).start()
    await asyncio.Event().wait()  # until SIGTERM from the harness


def start_role(procs: H.Procs, python: str, role: str, *extra: str) -> tuple[H.Proc, int]:
    port = H.free_port()
    argv = [python, str(Path(__file__).resolve()), "--role", role, "--role-port", str(port), *extra]
    proc = procs.start(role, argv, env={SECRET_ENV: SECRET})
    H.wait_ready(proc, port, "GET", "/health", ok=lambda s: s == 200, timeout=20.0)
    return proc, port


# --------------------------------------------------------------------------- gateway


def table_yaml(plane_url: str, *, status: str | None = None, concurrency: int | None = None) -> str:
    dep = f"{{plane: p1{f', status: {status}' if status else ''}}}"
    scaling = f", autoscaling: {{concurrency_target: {concurrency}}}" if concurrency else ""
    # The team's async limits (SPEC §10: 200 submits/s, 50,000 open) are raised: the benchmark
    # measures the gateway, not the per-team limit.
    return f"""version: 1
domains: [{H.DOMAIN}]
gateway:
  async:
    webhook_allowed_hosts: ["127.0.0.1"]
    webhook_secrets: [{{name: bench, secret_env: {SECRET_ENV}}}]
regions: {{us: {{}}}}
planes: {{p1: {{region: us, url: "{plane_url}"}}}}
teams:
  bench:
    async: {{submits_per_second: 1000000, max_queued: 10000000, status_calls_per_second: 100000}}
api_keys:
  - {{name: bench, team: bench, sha256: "{H.sha256_hex(H.API_KEY)}"}}
models:
  {H.MODEL_ID}:
    team: bench
    deployments: {{v1: {dep}}}
    environments: {{production: {{deployment: v1{scaling}}}}}
"""


@dataclass
class Gateway:
    proc: H.Proc
    port: int
    store: Path  # the region's SQLite file

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_gateway(procs: H.Procs, python: str, name: str, table: str) -> Gateway:
    home = procs.tmp / name
    home.mkdir()
    (home / "table.yaml").write_text(table)
    port, admin = H.free_port(), H.free_port()
    while admin == port:
        admin = H.free_port()
    argv = [python, "-m", "gateway", "serve", "--config", str(home / "table.yaml"), "--host", "127.0.0.1",
            "--port", str(port), "--admin-port", str(admin), "--queue-store", str(home / "queue")]  # fmt: skip
    H.log(f"starting {name}: {' '.join(argv)}")
    proc = procs.start(name, argv, cwd=H.GATEWAY_ROOT, env={SECRET_ENV: SECRET})
    H.wait_ready(proc, admin, "GET", "/readyz", ok=lambda s: s == 200, timeout=30.0)
    return Gateway(proc, port, home / "queue" / "async-queue-us.sqlite3")


def store_counts(path: Path) -> dict[str, int]:
    """Rows of the queue file by status, and `total` (SELECT COUNT(*) FROM requests)."""
    if not path.exists():
        return {"total": 0}
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as conn:
        counts = {str(s): int(n) for s, n in conn.execute("SELECT status, COUNT(*) FROM requests GROUP BY status")}
        counts["total"] = int(conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0])
    return counts


def fsync_probe(directory: Path, n: int = 100) -> float:
    """ms per 4 KiB write + fdatasync in `directory` (the disk the queue stores are on)."""
    path = directory / "fsync-probe.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        started = time.perf_counter()
        for _ in range(n):
            os.write(fd, b"x" * 4096)
            os.fdatasync(fd)
        return (time.perf_counter() - started) / n * 1e3
    finally:
        os.close(fd)
        path.unlink()


class FsyncCounter:
    """fsync + fdatasync syscalls of one process (all its threads) between start and `stop()`,
    counted in the kernel by `perf stat` on the syscall tracepoints (nothing stops the process)."""

    EVENTS = ("syscalls:sys_enter_fsync", "syscalls:sys_enter_fdatasync")

    def __init__(self, procs: H.Procs, pid: int, name: str, enabled: bool) -> None:
        self.procs = procs
        self.out = procs.tmp / f"{name}.perf.csv"
        self.proc: H.Proc | None = None
        self.problem: str | None = None if enabled else "disabled (--no-perf)"
        if enabled and not shutil.which("perf"):
            self.problem = "perf not found"
        if self.problem is None:
            argv = ["perf", "stat", "-x", ",", "-o", str(self.out), "-e", ",".join(self.EVENTS), "-p", str(pid)]
            self.proc = procs.start(name, argv)
            time.sleep(0.3)  # attached (a refused attach exits at once)
            if not self.proc.alive():
                self.problem = f"perf stat failed: {self.proc.log_text(300).strip()}"

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGINT)  # perf stat writes its counts on SIGINT
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.popen.wait(timeout=5)
        self.procs.stop(self.proc)
        total = 0
        try:
            lines = self.out.read_text().splitlines()
        except OSError as e:
            self.problem = f"no perf output: {e}"
            return None
        seen = 0
        for line in lines:
            fields = line.split(",")
            if len(fields) >= 3 and fields[2] in self.EVENTS:
                if not fields[0].strip().isdigit():
                    self.problem = f"perf: {fields[2]} {fields[0]}"
                    return None
                total += int(fields[0])
                seen += 1
        if seen != len(self.EVENTS):
            self.problem = f"perf output not understood: {' | '.join(lines)[-300:]}"
            return None
        return total


# --------------------------------------------------------------------------- phase 1: submits/s


class RowSampler:
    """Rows in the queue file once a second (its own read connection, in a thread): the durable
    submit rate second by second, which shows whether it depends on the backlog."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.counts = [store_counts(path)["total"]]
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.done.wait(1.0):
            self.counts.append(store_counts(self.path)["total"])

    def stop(self) -> list[int]:
        """Rows added in each whole second of the window."""
        self.done.set()
        self.thread.join(timeout=5)
        return [b - a for a, b in zip(self.counts, self.counts[1:])]


def wrk_window(procs: H.Procs, gw: Gateway, name: str, path: str, lua: Path, args) -> dict:
    """1 s warm-up, then one measured wrk run: rate, latency, durable rows, fsyncs, CPU, noise."""
    url = gw.url + path
    problem = H.smoke_check(name, gw.port, path)
    if problem:
        H.log(f"WARNING: {problem} (measuring anyway; errors will show in the table)")
    H.log(f"[{name}] warm-up 1 s, then {args.duration:g} s at {WRK_CONNS} connections")
    run_wrk(url, lua, WRK_THREADS, WRK_CONNS, 1, None)
    before = store_counts(gw.store)
    fsyncs = FsyncCounter(procs, gw.proc.pid, f"{name}-perf", args.perf)
    noise = H.CpuNoise({p.pid for p in procs.procs})
    rows = RowSampler(gw.store) if path == ASYNC_PATH else None
    ticks0, t0 = H.session_cpu_ticks(gw.proc.pid), time.monotonic()
    r = run_wrk(url, lua, WRK_THREADS, WRK_CONNS, args.duration, None)
    cpu_s = (H.session_cpu_ticks(gw.proc.pid) - ticks0) / os.sysconf("SC_CLK_TCK")
    elapsed = time.monotonic() - t0
    row_noise = noise.stop()
    per_second = rows.stop() if rows else []
    time.sleep(0.2)  # the last writes of the window reach the file
    n_fsync = fsyncs.stop()
    after = store_counts(gw.store)
    ok = (r.get("requests") or 0) - r.get("non2xx", 0)
    row = {
        "run": name, "path": path, "rps": r.get("rps"), "p50_ms": r.get("p50_ms"), "p99_ms": r.get("p99_ms"),
        "requests": r.get("requests"), "answered_2xx": ok, "non2xx": r.get("non2xx"),
        "socket_errors": r.get("socket_errors"), "errors_total": r.get("errors_total"),
        "cpu_us_per_call": round(1e6 * cpu_s / r["requests"], 1) if r.get("requests") else None,
        "gateway_cpu_pct": round(100 * cpu_s / elapsed), "noise": row_noise, "smoke_problem": problem,
    }  # fmt: skip
    if path == ASYNC_PATH:
        durable = after["total"] - before["total"]
        row.update({
            "rows_before": before["total"], "rows_after": after["total"], "durable_rows": durable,
            "durable_per_s": round(durable / args.duration, 1), "fsyncs": n_fsync, "fsync_problem": fsyncs.problem,
            "submits_per_fsync": round(durable / n_fsync, 1) if n_fsync else None,
            "runs_ended": sum(after.get(s, 0) - before.get(s, 0) for s in ("SUCCEEDED", "FAILED")),
            "queued_after": after.get("QUEUED", 0), "statuses_after": after, "durable_per_second": per_second,
        })  # fmt: skip
        row["runs_per_s"] = round(row["runs_ended"] / args.duration, 1)
        if durable < ok:  # a 201 for a request that is not in the file would be a lost request
            row["lost"] = ok - durable
    if "failed" in r:
        row["failed"] = r["failed"]
    if not gw.proc.alive():
        gw.proc.dump_log("(exited during the run) ")
        row["failed"] = "gateway exited during the run"
    return row


def phase_submits(procs: H.Procs, direct_url: str, lua: Path, args) -> list[dict]:
    rows = []
    gw = start_gateway(procs, args.python, "gw-draining", table_yaml(direct_url, concurrency=DRAIN_CONCURRENCY))
    try:
        rows.append(wrk_window(procs, gw, "sync predict (no queue)", H.GATEWAY_PATH, lua, args))
        rows.append(wrk_window(procs, gw, "async submit, runs draining", ASYNC_PATH, lua, args))
    finally:
        procs.stop(gw.proc)
    gw = start_gateway(procs, args.python, "gw-parked", table_yaml(direct_url, status="scaled_to_zero"))
    try:
        rows.append(wrk_window(procs, gw, "async submit, runs parked", ASYNC_PATH, lua, args))
    finally:
        procs.stop(gw.proc)
    return rows


# --------------------------------------------------------------------------- phase 2: e2e latency


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


async def e2e(gw: Gateway, hook_port: int, rate: float, seconds: float) -> dict:
    hook = f"http://127.0.0.1:{hook_port}"
    body = json.dumps({"model_input": {"x": [1, 2, 3]}, "webhook_endpoint": hook + "/hook"}).encode()
    headers = {"Host": HOST, **HEADERS}
    sent: dict[str, float] = {}
    submit_ms: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    loop = asyncio.get_running_loop()
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256), timeout=timeout) as session:

        async def submit(record: dict[str, float]) -> None:
            t = time.time()
            try:
                async with session.post(gw.url + ASYNC_PATH, data=body, headers=headers) as r:
                    data = await r.read()
                    if r.status != 201:
                        errors[f"HTTP {r.status}"] += 1
                        return
            except (aiohttp.ClientError, TimeoutError) as e:
                errors[type(e).__name__] += 1
                return
            if record is sent:
                submit_ms.append((time.time() - t) * 1e3)
            record[json.loads(data)["request_id"]] = t

        warm: dict[str, float] = {}
        for _ in range(20):  # warm-up: connections, the scheduler, the receiver (not measured)
            await submit(warm)
        await asyncio.sleep(0.5)
        n = int(rate * seconds)
        start, lag = loop.time() + 0.05, 0.0
        tasks = []
        for i in range(n):  # open loop: send times are fixed in advance, whatever the answers do
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                lag = max(lag, -delay)
            tasks.append(asyncio.create_task(submit(sent)))
        await asyncio.gather(*tasks)
        deadline = loop.time() + 15
        while loop.time() < deadline:  # every accepted submit's webhook, or give up after 15 s
            async with session.get(hook + "/count") as r:
                if await r.json() >= len(sent) + len(warm):
                    break
            await asyncio.sleep(0.2)
        async with session.get(hook + "/records") as r:
            records = await r.json()
    latencies = [(records[rid][0] - t) * 1e3 for rid, t in sent.items() if rid in records]
    return {
        "rate": rate, "seconds": seconds, "submitted": n, "accepted": len(sent), "errors": dict(errors),
        "delivered": len(latencies), "missing": len(sent) - len(latencies),
        "signature_ok": sum(1 for rid in sent if rid in records and records[rid][1]),
        "p50_ms": pct(latencies, 50), "p90_ms": pct(latencies, 90), "p99_ms": pct(latencies, 99),
        "max_ms": max(latencies, default=None), "submit_p50_ms": pct(submit_ms, 50),
        "submit_p99_ms": pct(submit_ms, 99), "pacing_lag_max_ms": round(lag * 1e3, 2),
    }  # fmt: skip


def phase_e2e(procs: H.Procs, direct_url: str, hook_port: int, args) -> dict:
    gw = start_gateway(procs, args.python, "gw-e2e", table_yaml(direct_url, concurrency=DRAIN_CONCURRENCY))
    try:
        H.log(f"[e2e] {args.rate:g} submits/s open loop for {args.duration:g} s, webhook to 127.0.0.1:{hook_port}")
        noise = H.CpuNoise({p.pid for p in procs.procs})
        result = runner()(e2e(gw, hook_port, args.rate, args.duration))
        result["noise"] = noise.stop()
        result["statuses_after"] = store_counts(gw.store)
        if not gw.proc.alive():
            result["failed"] = "gateway exited during the run"
    finally:
        procs.stop(gw.proc)
    return result


# --------------------------------------------------------------------------- phase 3: sync precedence


async def sync_calls(gw: Gateway, clients: int, seconds: float) -> tuple[list[float], dict]:
    """`clients` loops calling sync predict back to back for `seconds`: latencies (ms), errors."""
    headers = {"Host": HOST, **HEADERS}
    latencies: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients), timeout=timeout) as session:
        deadline = time.perf_counter() + seconds

        async def client() -> None:
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                try:
                    async with session.post(gw.url + H.GATEWAY_PATH, data=H.REQUEST_BODY, headers=headers) as r:
                        await r.read()
                        if r.status != 200:
                            errors[f"HTTP {r.status}"] += 1
                            continue
                except (aiohttp.ClientError, TimeoutError) as e:
                    errors[type(e).__name__] += 1
                    continue
                latencies.append((time.perf_counter() - t) * 1e3)

        await asyncio.gather(*(client() for _ in range(clients)))
    return latencies, dict(errors)


async def fill(gw: Gateway, n: int) -> dict:
    """`n` submits (no webhook) for the deployment, FILL_CONNS at a time."""
    headers = {"Host": HOST, **HEADERS}
    accepted = 0
    errors: collections.Counter[str] = collections.Counter()
    todo = iter(range(n))
    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=FILL_CONNS)) as session:

        async def worker() -> None:
            nonlocal accepted
            for _ in todo:
                try:
                    async with session.post(gw.url + ASYNC_PATH, data=H.REQUEST_BODY, headers=headers) as r:
                        await r.read()
                        if r.status == 201:
                            accepted += 1
                        else:
                            errors[f"HTTP {r.status}"] += 1
                except (aiohttp.ClientError, TimeoutError) as e:
                    errors[type(e).__name__] += 1

        await asyncio.gather(*(worker() for _ in range(FILL_CONNS)))
    return {"submitted": n, "accepted": accepted, "errors": dict(errors), "seconds": time.perf_counter() - started}


def sync_window(procs: H.Procs, gw: Gateway, name: str, args) -> dict:
    H.log(f"[precedence] {name}: {args.sync_clients} sync clients for {args.duration:g} s")
    before = store_counts(gw.store)
    noise = H.CpuNoise({p.pid for p in procs.procs})
    ticks0, t0 = H.session_cpu_ticks(gw.proc.pid), time.monotonic()
    latencies, errors = runner()(sync_calls(gw, args.sync_clients, args.duration))
    elapsed = time.monotonic() - t0
    cpu_s = (H.session_cpu_ticks(gw.proc.pid) - ticks0) / os.sysconf("SC_CLK_TCK")
    row_noise = noise.stop()
    after = store_counts(gw.store)
    ended = sum(after.get(s, 0) - before.get(s, 0) for s in ("SUCCEEDED", "FAILED"))
    slow = sum(1 for v in latencies if v > 2 * args.plane_delay_ms + 5)
    return {
        "condition": name, "calls": len(latencies), "errors": errors, "p50_ms": pct(latencies, 50),
        "p90_ms": pct(latencies, 90), "p99_ms": pct(latencies, 99), "max_ms": max(latencies, default=None),
        "mean_ms": statistics.fmean(latencies) if latencies else None, "slow_calls": slow,
        "queued_start": before.get("QUEUED", 0), "queued_end": after.get("QUEUED", 0),
        "async_runs_ended": ended, "async_runs_per_s": round(ended / elapsed, 1),
        "gateway_cpu_pct": round(100 * cpu_s / elapsed), "noise": row_noise,
    }  # fmt: skip


def phase_precedence(procs: H.Procs, args) -> dict:
    plane, plane_port = start_role(procs, args.python, "plane", "--plane-delay-ms", str(args.plane_delay_ms))
    table = table_yaml(f"http://127.0.0.1:{plane_port}", concurrency=args.concurrency_target)
    gw = start_gateway(procs, args.python, "gw-precedence", table)
    try:
        runner()(sync_calls(gw, args.sync_clients, 1.0))  # warm-up
        baseline = sync_window(procs, gw, "no backlog", args)
        H.log(f"[precedence] filling the queue with {args.backlog} submits")
        filled = runner()(fill(gw, args.backlog))
        loaded = sync_window(procs, gw, f"{args.backlog} async queued", args)
        if not gw.proc.alive():
            loaded["failed"] = "gateway exited during the run"
    finally:
        procs.stop(gw.proc)
        procs.stop(plane)
    return {"plane_delay_ms": args.plane_delay_ms, "concurrency_target": args.concurrency_target,
            "sync_clients": args.sync_clients, "fill": filled, "windows": [baseline, loaded]}  # fmt: skip


# --------------------------------------------------------------------------- report


def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _errors(row: dict) -> str:
    if row.get("failed") and row.get("rps") is None:
        return "FAILED"
    parts = [f"non2xx:{row['non2xx']}"] if row.get("non2xx") else []
    parts += [f"{k}:{v}" for k, v in (row.get("socket_errors") or {}).items() if v]
    return " ".join(parts) or "0"


def _trend(row: dict) -> str:
    per_second = row.get("durable_per_second") or []
    return f"{per_second[0]:,}>{per_second[-1]:,}" if len(per_second) >= 2 else "-"


def _counts(errors: dict) -> str:
    return " ".join(f"{k}:{v}" for k, v in errors.items()) or "0"


def print_submits(doc: dict) -> None:
    print(f"\n1. Durable submits, wrk {WRK_CONNS} connections, {len(H.REQUEST_BODY)} B body (no webhook)\n")
    hdr = (f"{'run':<28} | {'req/s':>7} | {'p50 ms':>6} | {'p99 ms':>6} | {'errors':<7} | {'durable':>7} | "
           f"{'fsyncs':>6} | {'sub/fsync':>9} | {'1st s>last s':>12} | {'runs/s':>6} | {'cpu us/call':>11} | noise")  # fmt: skip
    print(hdr)
    print("-" * len(hdr))
    for r in doc["submits"]:
        is_async = r["path"] == ASYNC_PATH
        print(f"{r['run']:<28} | {_f(r['rps'], ',.0f'):>7} | {_f(r['p50_ms'], '.2f'):>6} | "
              f"{_f(r['p99_ms'], '.2f'):>6} | {_errors(r):<7} | {_f(r.get('durable_rows'), ',d'):>7} | "
              f"{_f(r.get('fsyncs'), ',d'):>6} | {_f(r.get('submits_per_fsync'), '.1f'):>9} | {_trend(r):>12} | "
              f"{_f(r.get('runs_per_s') if is_async else None, ',.0f'):>6} | {_f(r['cpu_us_per_call'], '.0f'):>11} | "
              f"{H.noise_cell(r['noise'])}")  # fmt: skip
    for r in doc["submits"]:
        if r.get("failed"):
            print(f"  ! {r['run']}: {r['failed'].splitlines()[0][:200]}")
        if r.get("lost"):
            print(f"  ! {r['run']}: {r['lost']} submits answered 201 are not in the store file")
        if r.get("fsync_problem"):
            print(f"  ! {r['run']}: fsyncs not counted: {r['fsync_problem'][:200]}")
    for label, ratio in doc["ratios"].items():
        print(f"  {label}: {_f(ratio, '.2f')}")
    print("  durable = rows added to the SQLite file over the window (SELECT COUNT(*) FROM requests);")
    print("  sub/fsync = durable / fsync+fdatasync syscalls of the gateway (perf), a lower bound of submits/commit;")
    print("  1st s>last s = rows added in the first and in the last second of the window (the backlog grows)")


def print_e2e(e: dict) -> None:
    print(f"\n2. Submit -> webhook received, {e['rate']:g} submits/s open loop for {e['seconds']:g} s, instant plane\n")
    hdr = (f"{'accepted':>8} | {'delivered':>9} | {'p50 ms':>6} | {'p90 ms':>6} | {'p99 ms':>6} | {'max ms':>7} | "
           f"{'201 p50/p99 ms':>14} | {'signed ok':>9} | {'errors':<6} | noise")  # fmt: skip
    print(hdr)
    print("-" * len(hdr))
    submit = f"{_f(e['submit_p50_ms'], '.2f')}/{_f(e['submit_p99_ms'], '.2f')}"
    print(f"{e['accepted']:>8} | {e['delivered']:>9} | {_f(e['p50_ms'], '.2f'):>6} | {_f(e['p90_ms'], '.2f'):>6} | "
          f"{_f(e['p99_ms'], '.2f'):>6} | {_f(e['max_ms'], '.1f'):>7} | {submit:>14} | {e['signature_ok']:>9} | "
          f"{_counts(e['errors']):<6} | {H.noise_cell(e['noise'])}")  # fmt: skip


def print_precedence(p: dict) -> None:
    print(f"\n3. Sync predict under an async backlog: plane {p['plane_delay_ms']:g} ms, concurrency_target "
          f"{p['concurrency_target']}, {p['sync_clients']} sync clients back to back; fill: {p['fill']['accepted']} "
          f"accepted in {p['fill']['seconds']:.1f} s\n")  # fmt: skip
    hdr = (f"{'condition':<20} | {'calls':>6} | {'p50 ms':>6} | {'p99 ms':>6} | {'max ms':>6} | {'slow':>4} | "
           f"{'queued start>end':>16} | {'async runs/s':>12} | {'gw cpu':>6} | {'errors':<6} | noise")  # fmt: skip
    print(hdr)
    print("-" * len(hdr))
    for w in p["windows"]:
        queued = f"{w['queued_start']}>{w['queued_end']}"
        print(f"{w['condition']:<20} | {w['calls']:>6} | {_f(w['p50_ms'], '.2f'):>6} | {_f(w['p99_ms'], '.2f'):>6} | "
              f"{_f(w['max_ms'], '.1f'):>6} | {w['slow_calls']:>4} | {queued:>16} | {w['async_runs_per_s']:>12,.0f} | "
              f"{w['gateway_cpu_pct']:>5}% | {_counts(w['errors']):<6} | {H.noise_cell(w['noise'])}")  # fmt: skip
    print("  slow = sync calls over 2 x plane delay + 5 ms (a sync call that waited for a slot)")


def print_report(doc: dict) -> None:
    print(f"\nAsync benchmark: {doc['duration_s']:g} s per measurement, {doc['environment']['cpus']} CPUs, one "
          f"gateway worker; fsync probe {doc['fsync_ms']:.2f} ms per 4 KiB write+fdatasync in the store's directory")  # fmt: skip
    if doc["submits"] is not None:
        print_submits(doc)
    if doc["e2e"] is not None:
        print_e2e(doc["e2e"])
    if doc["precedence"] is not None:
        print_precedence(doc["precedence"])
    print()
    for g in doc["goals"]:
        val = "n/a" if g["value"] is None else format(g["value"], g["fmt"])
        verdict = "n/a" if g["ok"] is None else ("goal met" if g["ok"] else "goal missed")
        note = f"  ({g['note']})" if g["note"] else ""
        print(f"{g['label']:<40} {val:>8}   goal {g['goal']:<10} {verdict}{note}")
    noisy = [n for n in doc["noise_all"] if H.noise_cell(n)]
    if noisy:
        print("  ! noise: CPU used during a measurement by processes outside this benchmark (other, % of the")
        print("    machine) or taken by the hypervisor (steal); those rows are unreliable, rerun on an idle machine.")
        hogs = {h["pid"]: h for n in noisy for h in n.get("other_top", [])}
        for h in sorted(hogs.values(), key=lambda h: -h["cpu_pct"])[:5]:
            print(f"    busy: pid {h['pid']} {h['cmd']} (up to {h['cpu_pct']}% of a CPU)")
    steal = max((n.get("steal_pct", 0) for n in doc["noise_all"]), default=0)
    print(f"  machine: steal at most {steal:.1f}% of the CPUs during the measurements")


Goal = dict


def _goal(label: str, value, fmt: str, ok, goal: str, note: str = "") -> Goal:
    return {"label": label, "value": value, "fmt": fmt, "ok": ok, "goal": goal, "note": note}


def submit_goals(submits: list[dict]) -> list[Goal]:
    out = []
    by_run = {r["run"]: r for r in submits}
    for run in ("async submit, runs parked", "async submit, runs draining"):
        r = by_run.get(run, {})
        value = r.get("rps")
        bad = r.get("errors_total") or r.get("failed") or r.get("lost")
        note = "errors answered or requests lost" if bad else ""
        if run.endswith("draining"):
            note = ", ".join(x for x in (note, "for comparison: runs compete with submits") if x)
        ok = None if value is None else value >= GOAL_SUBMITS_PER_S and not bad
        out.append(_goal(f"durable submits/s ({run.split(', ')[1]})", value, ",.0f", ok,
                         f">= {GOAL_SUBMITS_PER_S:,.0f}", note))  # fmt: skip
    return out


def e2e_goals(e: dict) -> list[Goal]:
    complete = e["missing"] == 0 and not e["errors"] and e["signature_ok"] == e["delivered"]
    note = "" if complete else f"{e['missing']} webhooks missing, errors {_counts(e['errors'])}"
    out = []
    for key, goal in (("p50_ms", GOAL_E2E_P50_MS), ("p99_ms", GOAL_E2E_P99_MS)):
        v = e[key]
        out.append(_goal(f"submit -> webhook {key[:3]} (ms)", v, ".1f", None if v is None else v <= goal and complete,
                         f"<= {goal:g}", note))  # fmt: skip
    return out


def precedence_goals(p: dict) -> list[Goal]:
    base, loaded = p["windows"]
    ratio = loaded["p50_ms"] / base["p50_ms"] if base["p50_ms"] and loaded["p50_ms"] else None
    failed = bool(base["errors"] or loaded["errors"])
    notes = [f"{base['p50_ms']:.2f} -> {loaded['p50_ms']:.2f} ms"] if ratio else []
    if loaded["queued_end"] == 0:
        notes.append("the backlog ran out during the window")
    if failed:
        notes.append("sync calls failed")
    ok = None if ratio is None else ratio <= GOAL_SYNC_RATIO and not failed
    return [_goal("sync p50 with backlog / without", ratio, ".3f", ok, f"<= {GOAL_SYNC_RATIO:.2f}", ", ".join(notes))]


# --------------------------------------------------------------------------- main

PHASES = ("submits", "e2e", "precedence")
SETTINGS = ("rate", "backlog", "plane_delay_ms", "concurrency_target", "sync_clients", "perf", "phases")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=None, help="seconds per measurement (default 10, --quick 3)")
    ap.add_argument("--quick", action="store_true", help="3 s per measurement (unless --duration is given)")
    ap.add_argument("--only", default=",".join(PHASES), help=f"comma-separated phases (default {','.join(PHASES)})")
    ap.add_argument("--rate", type=float, default=100.0, help="submits/s of the latency phase (default 100)")
    ap.add_argument("--backlog", type=int, default=5000, help="async requests queued in phase 3 (default 5000)")
    ap.add_argument("--plane-delay-ms", type=float, default=20.0, help="phase 3 plane's answer delay (default 20)")
    ap.add_argument("--concurrency-target", type=int, default=4, help="phase 3 concurrency_target (default 4)")
    ap.add_argument("--sync-clients", type=int, default=2, help="phase 3 sync clients (default 2)")
    ap.add_argument("--no-perf", dest="perf", action="store_false", help="do not count fsyncs with perf stat")
    ap.add_argument("--max-seconds", type=float, default=None, help="time budget of the run (default 240, --quick 100)")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the peers and the gateway")
    ap.add_argument("--output", default=str(H.RESULTS_DIR / "async-latest.json"))
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (tables, stores, logs)")
    ap.add_argument("--role", choices=("plane", "receiver"), help=argparse.SUPPRESS)
    ap.add_argument("--role-port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.phases = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(args.phases) - set(PHASES))
    if unknown or not args.phases:
        ap.error(f"--only: choose from {','.join(PHASES)}")
    if args.duration is None:
        args.duration = 3.0 if args.quick else 10.0
    if args.max_seconds is None:
        args.max_seconds = 100.0 if args.quick else 240.0
    return args


def ratios(submits: list[dict]) -> dict:
    by_run = {r["run"]: r for r in submits}
    sync_rps = by_run["sync predict (no queue)"].get("rps")
    out = {}
    for run in ("async submit, runs parked", "async submit, runs draining"):
        rps = by_run[run].get("rps")
        out[f"async/sync req/s ({run.split(', ')[1]})"] = rps / sync_rps if sync_rps and rps else None
    return out


def main() -> int:
    args = parse_args()
    if args.role == "plane":
        plane_role(args.role_port, args.plane_delay_ms)
        return 0
    if args.role == "receiver":
        receiver_role(args.role_port)
        return 0
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    if not shutil.which("wrk"):
        H.log("wrk not found (apt-get install -y wrk)")
        return 1
    problem = H.gateway_cli_problem(args.python)
    if problem:
        H.log(f"gateway not runnable: {problem}")
        return 1
    H.install_signal_handlers()

    def out_of_time(signum, frame):  # noqa: ARG001
        raise OutOfTime(f"the run exceeded its time budget of {args.max_seconds:g} s")

    signal.signal(signal.SIGALRM, out_of_time)
    signal.setitimer(signal.ITIMER_REAL, args.max_seconds)
    started = time.time()
    submits = e2e_result = precedence = None
    direct_url = ""
    try:
        with H.Procs(keep_tmp=args.keep_tmp) as procs:
            fsync_ms = fsync_probe(procs.tmp)
            if "submits" in args.phases or "e2e" in args.phases:
                _, direct_port = H.start_direct_nginx(procs)
                direct_url = f"http://127.0.0.1:{direct_port}"
            if "submits" in args.phases:
                submits = phase_submits(procs, direct_url, wrk_lua(procs.tmp / "post.lua"), args)
            if "e2e" in args.phases:
                _, hook_port = start_role(procs, args.python, "receiver")
                e2e_result = phase_e2e(procs, direct_url, hook_port, args)
            if "precedence" in args.phases:
                precedence = phase_precedence(procs, args)
    except H.StartupError as e:
        H.log(f"run_async: could not start: {e}")
        return 1
    except OutOfTime as e:
        H.log(f"run_async: {e}; every process was stopped")
        return 1
    except KeyboardInterrupt as e:
        H.log(f"run_async: interrupted ({e or 'SIGINT'}); every process was stopped")
        return 130
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)

    doc: dict = {
        "benchmark": "async",
        "timestamp": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "duration_s": args.duration,
        "wall_s": round(time.time() - started, 1),
        "fsync_ms": round(fsync_ms, 3),
        "environment": H.versions({"python": [args.python, "-V"], "nginx": ["nginx", "-v"], "wrk": ["wrk", "-v"]}),
        "settings": {k: getattr(args, k) for k in SETTINGS},
        "submits": submits,
        "ratios": ratios(submits) if submits else None,
        "e2e": e2e_result,
        "precedence": precedence,
        "noise_all": [],
        "goals": [],
    }
    broken = False
    if submits is not None:
        doc["noise_all"] += [r["noise"] for r in submits]
        doc["goals"] += submit_goals(submits)
        broken |= any(bool(r.get("failed")) for r in submits)
    if e2e_result is not None:
        doc["noise_all"].append(e2e_result["noise"])
        doc["goals"] += e2e_goals(e2e_result)
        broken |= bool(e2e_result.get("failed"))
    if precedence is not None:
        doc["noise_all"] += [w["noise"] for w in precedence["windows"]]
        doc["goals"] += precedence_goals(precedence)
        broken |= bool(precedence["windows"][1].get("failed"))
    print_report(doc)
    for g in doc["goals"]:
        g.pop("fmt")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nresults written to {out} (wall {doc['wall_s']:g} s)")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
