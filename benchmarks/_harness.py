"""Shared plumbing for the benchmark scripts (process control, ports, nginx, gateway).

Everything here binds to 127.0.0.1 only. Every process started through `Procs` runs in its own
process group and is stopped (SIGTERM, then SIGKILL) when the `Procs` context exits, whatever the
reason (normal end, exception, Ctrl-C, SIGTERM to the benchmark script).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
PEERS_DIR = BENCH_DIR / "peers"
RESULTS_DIR = BENCH_DIR / "results"

# The tree `python -m gateway` runs from (its cwd, which comes first on sys.path, so it is the tree
# imported even though the venv's editable install points at REPO_ROOT). `--gateway-root DIR` in
# run_http.py / run_grpc.py sets it, e.g. to a `git archive` export of another revision (ab.py).
GATEWAY_ROOT = REPO_ROOT

API_KEY = "bench-key"
MODEL_ID = "abc123"
DOMAIN = "bench.local"
MODEL_HOST = f"model-{MODEL_ID}.{DOMAIN}"
GATEWAY_PATH = "/production/predict"
DIRECT_PATH = "/predict"
REQUEST_BODY = b'{"model_input": {"x": [1,2,3]}}'
REQUEST_HEADERS = {
    "Host": MODEL_HOST,
    "Content-Type": "application/json",
    "Authorization": f"Api-Key {API_KEY}",
}


class StartupError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def install_signal_handlers() -> None:
    """Turn SIGTERM/SIGHUP into KeyboardInterrupt so `finally` blocks run and children get stopped."""

    def _raise(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise)
    # Also when started with SIGINT ignored (background job of a non-interactive shell).
    signal.signal(signal.SIGINT, signal.default_int_handler)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _affinity_preexec(cpus: set[int] | None):
    if not cpus:
        return None

    def _pre():
        os.sched_setaffinity(0, cpus)

    return _pre


class Proc:
    def __init__(self, name: str, popen: subprocess.Popen, log_path: Path):
        self.name = name
        self.popen = popen
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self, limit: int = 8000) -> str:
        try:
            data = self.log_path.read_text(errors="replace")
        except OSError as e:
            return f"<cannot read {self.log_path}: {e}>"
        return data[-limit:]

    def dump_log(self, header: str = "") -> None:
        log(f"----- {self.name} log ({self.log_path}) {header}-----")
        log(self.log_text() or "<empty>")
        log(f"----- end of {self.name} log -----")

    def stop(self, timeout: float = 5.0) -> None:
        if self.popen.poll() is not None:
            return
        # The child is a session/group leader (start_new_session=True): its pid is the pgid.
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.popen.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Reap stragglers left in the group (e.g. nginx workers) even if the leader is gone.
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class Procs:
    """Context manager owning a temp dir and every process started through it."""

    def __init__(self, keep_tmp: bool = False, server_cpus: set[int] | None = None):
        self.keep_tmp = keep_tmp
        self.server_cpus = server_cpus
        self.tmp = Path(tempfile.mkdtemp(prefix="gw-bench-"))
        self.procs: list[Proc] = []

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()
        if self.keep_tmp:
            log(f"temp dir kept: {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            try:
                p.stop()
            except Exception as e:  # keep stopping the others
                log(f"error stopping {p.name}: {e}")
        self.procs.clear()

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    def start(self, name: str, argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> Proc:
        log_path = self.tmp / f"{name}.log"
        logf = open(log_path, "wb")
        full_env = dict(os.environ)
        full_env["PYTHONUNBUFFERED"] = "1"
        if env:
            full_env.update(env)
        try:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=str(cwd) if cwd else None,
                env=full_env,
                start_new_session=True,
                preexec_fn=_affinity_preexec(self.server_cpus),
            )
        finally:
            logf.close()
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc


# --------------------------------------------------------------------------- HTTP helpers


def http_request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_ready(
    proc: Proc,
    port: int,
    method: str = "GET",
    path: str = "/",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    ok=lambda status: True,
    timeout: float = 15.0,
) -> tuple[int, bytes]:
    """Poll until an HTTP request to port gets an answer accepted by `ok`; fail fast if proc dies."""
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while time.monotonic() < deadline:
        if not proc.alive():
            proc.dump_log("(process exited) ")
            raise StartupError(f"{proc.name} exited with code {proc.popen.returncode} during startup")
        try:
            status, data = http_request(port, method, path, body, headers, timeout=2.0)
            if ok(status):
                return status, data
            last = f"HTTP {status}: {data[:200]!r}"
        except (OSError, http.client.HTTPException) as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.1)
    proc.dump_log("(not ready) ")
    raise StartupError(f"{proc.name} not ready on port {port} after {timeout:.0f}s (last: {last})")


# --------------------------------------------------------------------------- nginx


def nginx_binary() -> str:
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if not path:
        raise StartupError("nginx not found (apt-get install -y nginx)")
    return path


def _nginx_conf(tmp: Path, name: str, port: int, server_block: str, http_extra: str = "") -> str:
    user = "user root;" if os.geteuid() == 0 else ""
    t = tmp / f"{name}-temp"
    t.mkdir(exist_ok=True)
    return f"""
{user}
worker_processes 1;
daemon off;
master_process on;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}-error.log warn;
events {{ worker_connections 8192; multi_accept on; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_body_temp_path {t}/body;
    proxy_temp_path {t}/proxy;
    fastcgi_temp_path {t}/fastcgi;
    uwsgi_temp_path {t}/uwsgi;
    scgi_temp_path {t}/scgi;
    {http_extra}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        {server_block}
    }}
}}
"""


def start_nginx(
    procs: Procs, name: str, server_block: str, http_extra: str = "", ready_path: str = "/predict"
) -> tuple[Proc, int]:
    port = free_port()
    conf = procs.tmp / f"{name}.conf"
    conf.write_text(_nginx_conf(procs.tmp, name, port, server_block, http_extra))
    prefix = procs.tmp / f"{name}-prefix"
    prefix.mkdir(exist_ok=True)
    # -e: startup error log in tmp too (otherwise nginx touches /var/log/nginx/error.log first).
    proc = procs.start(
        name, [nginx_binary(), "-c", str(conf), "-p", str(prefix), "-e", str(procs.tmp / f"{name}-error.log")]
    )
    try:
        wait_ready(proc, port, "POST", ready_path, REQUEST_BODY, REQUEST_HEADERS, ok=lambda s: s == 200, timeout=15.0)
    except StartupError:
        err = procs.tmp / f"{name}-error.log"
        if err.exists():
            log(f"----- {name} error_log -----\n{err.read_text(errors='replace')[-4000:]}")
        raise
    return proc, port


def start_direct_nginx(procs: Procs) -> tuple[Proc, int]:
    block = """
        location = /predict {
            default_type application/json;
            return 200 '{"output": [1,2,3]}';
        }
        location / { return 404; }
    """
    return start_nginx(procs, "nginx-direct", block)


def start_proxy_nginx(procs: Procs, upstream_port: int) -> tuple[Proc, int]:
    extra = f"upstream u {{ server 127.0.0.1:{upstream_port}; keepalive 64; keepalive_requests 1000000; }}"
    block = """
        location / {
            proxy_pass http://u;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    """
    return start_nginx(procs, "nginx-proxy", block, http_extra=extra)


# --------------------------------------------------------------------------- gateway


def sha256_hex(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def gateway_table(plane_url: str) -> str:
    return f"""version: 1
domains: [{DOMAIN}]
regions: {{us: {{}}}}
planes: {{p1: {{region: us, url: "{plane_url}"}}}}
teams: {{bench: {{}}}}
api_keys:
  - {{name: bench, team: bench, sha256: "{sha256_hex(API_KEY)}"}}
models:
  {MODEL_ID}:
    team: bench
    deployments: {{v1: {{plane: p1}}}}
    environments: {{production: {{deployment: v1}}}}
"""


def add_gateway_root_arg(ap) -> None:
    ap.add_argument(
        "--gateway-root",
        default=None,
        metavar="DIR",
        help="run `python -m gateway` with cwd=DIR so that it imports DIR/gateway (default: this checkout)",
    )


def gateway_import_path(python: str, root: Path, timeout: float = 30.0) -> str:
    """The `gateway.__file__` a `python` started with cwd=root imports (same environment as `Procs`)."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    r = subprocess.run(
        [python, "-c", "import gateway; print(gateway.__file__)"],
        cwd=root,
        env=env,
        capture_output=True,
        timeout=timeout,
        start_new_session=True,
    )
    if r.returncode != 0:
        raise StartupError(f"`import gateway` with cwd={root} failed: {r.stderr.decode(errors='replace')[-1000:]}")
    return r.stdout.decode().strip().splitlines()[-1]


def set_gateway_root(root: str | Path | None, python: str) -> None:
    """Point the gateway at another tree, after checking that a process started there imports it."""
    global GATEWAY_ROOT
    if root is None:
        return
    path = Path(root).resolve()
    if not (path / "gateway" / "__init__.py").exists():
        raise StartupError(f"--gateway-root {path}: no gateway/__init__.py there")
    imported = Path(gateway_import_path(python, path)).resolve()
    if not imported.is_relative_to(path / "gateway"):
        raise StartupError(f"with cwd={path}, `import gateway` imports {imported}, not the tree under {path}")
    log(f"gateway root: {path} (gateway.__file__ = {imported})")
    GATEWAY_ROOT = path


def gateway_cli_problem(python: str) -> str | None:
    """None if `python -m gateway serve --help` works, else a description of what is missing."""
    for rel in ("gateway/__main__.py", "gateway/cli.py"):
        if not (GATEWAY_ROOT / rel).exists():
            return f"{rel} does not exist"
    try:
        r = subprocess.run(
            [python, "-m", "gateway", "serve", "--help"],
            cwd=GATEWAY_ROOT,
            capture_output=True,
            timeout=30,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired:
        return "`python -m gateway serve --help` timed out"
    if r.returncode != 0:
        out = (r.stdout + r.stderr).decode(errors="replace")[-2000:]
        return f"`python -m gateway serve --help` failed (exit {r.returncode}):\n{out}"
    return None


def start_gateway(
    procs: Procs, python: str, plane_url: str, name: str = "gateway", extra_args: list[str] | None = None
) -> tuple[Proc, int]:
    cfg = procs.tmp / f"{name}-table.yaml"
    cfg.write_text(gateway_table(plane_url))
    port, admin = free_port(), free_port()
    while admin == port:
        admin = free_port()
    argv = [
        python,
        "-m",
        "gateway",
        "serve",
        "--config",
        str(cfg),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--admin-port",
        str(admin),
    ] + list(extra_args or [])
    log(f"starting {name}: {' '.join(argv)}")
    # cwd = the gateway root (this checkout unless --gateway-root) so `-m gateway` imports that tree.
    proc = procs.start(name, argv, cwd=GATEWAY_ROOT)
    wait_ready(proc, admin, "GET", "/readyz", ok=lambda s: s == 200, timeout=30.0)
    return proc, port


def smoke_check(name: str, port: int, path: str) -> str | None:
    """One request like the load generator's; returns a problem description or None."""
    try:
        status, body = http_request(port, "POST", path, REQUEST_BODY, REQUEST_HEADERS)
    except (OSError, http.client.HTTPException) as e:
        return f"{name}: smoke request failed: {type(e).__name__}: {e}"
    if not 200 <= status < 300:
        return f"{name}: smoke request got HTTP {status}: {body[:300]!r}"
    return None


# --------------------------------------------------------------------------- CPU of a target


def _stat(pid: int | str) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name (state first); None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2 :].split()


def session_pids(sid: int) -> list[int]:
    """The processes of a session (a target started by `Procs` leads its own: it and its children)."""
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and (r := _stat(e)) is not None and int(r[3]) == sid]


def process_cpu_ticks(pid: int) -> int:
    """utime+stime (clock ticks, all threads) of the process `pid` alone, not its children; 0 once gone."""
    rest = _stat(pid)
    return 0 if rest is None else int(rest[11]) + int(rest[12])


def session_cpu_ticks(sid: int) -> int:
    """utime+stime (clock ticks, all threads) of the processes of a session.

    A target started by `Procs` leads its own session, so this covers it and its children (workers).
    """
    return sum(process_cpu_ticks(pid) for pid in session_pids(sid))


# --------------------------------------------------------------------------- machine noise


def _proc_cpu_ticks(exclude_sids: set[int]) -> dict[int, int]:
    """utime+stime (clock ticks) of every user-space process not in exclude_sids and not us."""
    me = os.getpid()
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        rest = data[data.rfind(b")") + 2 :].split()
        ppid, sid = int(rest[1]), int(rest[3])
        if pid == 2 or ppid == 2 or sid in exclude_sids:  # kernel threads work for everyone
            continue
        ticks[pid] = int(rest[11]) + int(rest[12])
    return ticks


def _stat_cpu() -> list[int]:
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


class CpuNoise:
    """CPU used by processes that are not part of the benchmark, and hypervisor steal, over an interval.

    other_pct / steal_pct are percentages of the whole machine (all CPUs).
    """

    def __init__(self, exclude_sids: set[int]):
        self.exclude = set(exclude_sids)
        self.t0 = time.monotonic()
        self.stat0 = _stat_cpu()
        self.ticks0 = _proc_cpu_ticks(self.exclude)

    def stop(self) -> dict:
        elapsed = time.monotonic() - self.t0
        stat1 = _stat_cpu()
        ticks1 = _proc_cpu_ticks(self.exclude)
        hz = os.sysconf("SC_CLK_TCK")
        ncpu = os.cpu_count() or 1
        other = sum(t - self.ticks0[p] for p, t in ticks1.items() if p in self.ticks0)
        d = [b - a for a, b in zip(self.stat0, stat1, strict=False)]
        total = sum(d[:8]) or 1
        steal = d[7] if len(d) > 7 else 0
        top = sorted(((t - self.ticks0[p], p) for p, t in ticks1.items() if p in self.ticks0), reverse=True)[:3]
        hogs = []
        for t, p in top:
            if t / hz / max(elapsed, 1e-9) < 0.05:
                continue
            try:
                cmd = open(f"/proc/{p}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")[:80]
            except OSError:
                cmd = "?"
            hogs.append({"pid": p, "cmd": cmd.strip(), "cpu_pct": round(100 * t / hz / elapsed)})
        return {
            "other_pct": round(100 * other / hz / max(elapsed, 1e-9) / ncpu, 1),
            "steal_pct": round(100 * steal / total, 1),
            "other_top": hogs,
        }


def noise_cell(noise: dict | None, threshold: float = 5.0) -> str:
    if not noise:
        return ""
    parts = []
    if noise.get("other_pct", 0) >= threshold:
        parts.append(f"other {noise['other_pct']:.0f}%")
    if noise.get("steal_pct", 0) >= threshold:
        parts.append(f"steal {noise['steal_pct']:.0f}%")
    return " ".join(parts)


# --------------------------------------------------------------------------- environment


def versions(commands: dict[str, list[str]]) -> dict:
    """The first output line of each version command (or why it failed), plus kernel and CPUs."""

    def out(cmd: list[str]) -> str:
        try:
            r = subprocess.run(cmd, capture_output=True, timeout=10, check=False)
            return (r.stdout + r.stderr).decode(errors="replace").strip().splitlines()[0]
        except (OSError, subprocess.TimeoutExpired, IndexError) as e:
            return f"unavailable: {e}"

    info: dict = {name: out(cmd) for name, cmd in commands.items()}
    info["kernel"] = platform.release()
    info["cpus"] = os.cpu_count()
    return info


def write_results(path: str | Path, benchmark: str, started: float, **fields) -> Path:
    """benchmarks/results/<name>-latest.json: the benchmark's name, a UTC stamp, the wall time, `fields`."""
    import datetime as _dt
    import json

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    doc = {"benchmark": benchmark, "timestamp": stamp, "wall_s": round(time.time() - started, 1), **fields}
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nresults written to {out}")
    return out


def run_main(main) -> None:
    """sys.exit(main()), turning Ctrl-C / SIGTERM into exit 130 once every process is stopped."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; all started processes were stopped")
        sys.exit(130)
