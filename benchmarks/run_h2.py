#!/usr/bin/env python3
"""HTTP/2 on the public listener (issue 13): the gateway against nginx's h2 proxy, one run.

Run from the repo root:

    .venv/bin/python benchmarks/run_h2.py             # 10 s per target
    .venv/bin/python benchmarks/run_h2.py --quick     # 3 s per target

Targets (127.0.0.1, started and stopped by this script), both in front of the same plane:
  direct        nginx answering POST /predict with a fixed JSON over HTTP/1.1 (the plane)
  nginx-h2      nginx `listen ... http2` (h2c prior knowledge), proxy_pass to `direct` (upstream keepalive)
  gateway       `python -m gateway serve` (one worker), h2c prior knowledge on its public port

Load: h2load, 32 streams over 4 connections (-c 4 -m 8), small JSON POST, 1 s warm-up first.
Prints each target's req/s and the gateway's ratio to nginx (goal >= 0.3x), and writes
benchmarks/results/h2-latest.json.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as H  # noqa: E402

GOAL_RATIO_NGINX = 0.3
CONNECTIONS, STREAMS = 4, 8  # 32 streams in flight


def h2load(port: int, path: str, body: Path, seconds: float) -> dict:
    argv = ["h2load", "-c", str(CONNECTIONS), "-m", str(STREAMS), "-D", str(max(1, round(seconds))), "-d", str(body),
            "-H", f":authority: {H.MODEL_HOST}", "-H", f"authorization: Api-Key {H.API_KEY}",
            "-H", "content-type: application/json", f"http://127.0.0.1:{port}{path}"]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60).stdout
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if rps is None or done is None or codes is None:
        return {"rps": None, "failed": out[-800:]}
    errors = int(done.group(3)) + int(done.group(4)) + int(codes.group(3)) + int(codes.group(4))
    return {"rps": float(rps.group(1)), "requests": int(done.group(1)), "errors": errors}


def start_h2_nginx(procs: H.Procs, upstream_port: int) -> tuple[H.Proc, int]:
    """nginx's h2 proxy: `listen ... http2` without TLS speaks h2c with prior knowledge only."""
    port = H.free_port()
    extra = f"upstream u {{ server 127.0.0.1:{upstream_port}; keepalive 64; keepalive_requests 1000000; }}"
    block = 'location / { proxy_pass http://u; proxy_http_version 1.1; proxy_set_header Connection ""; }'
    conf = H._nginx_conf(procs.tmp, "nginx-h2", port, block, extra).replace("backlog=4096;", "backlog=4096 http2;")
    path = procs.tmp / "nginx-h2.conf"
    path.write_text(conf)
    prefix = procs.tmp / "nginx-h2-prefix"
    prefix.mkdir(exist_ok=True)
    argv = [H.nginx_binary(), "-c", str(path), "-p", str(prefix), "-e", str(procs.tmp / "nginx-h2-error.log")]
    proc = procs.start("nginx-h2", argv)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        probe = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--http2-prior-knowledge",
                                f"http://127.0.0.1:{port}/predict", "-d", "{}"], capture_output=True, text=True)  # fmt: skip
        if probe.stdout == "200":
            return proc, port
        time.sleep(0.1)
    raise H.StartupError("nginx-h2 did not answer over h2c")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=None, help="seconds per target (default 10)")
    ap.add_argument("--quick", action="store_true", help="3 s per target")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the gateway")
    ap.add_argument("--output", default=str(H.RESULTS_DIR / "h2-latest.json"))
    args = ap.parse_args()
    seconds = args.duration or (3.0 if args.quick else 10.0)
    H.install_signal_handlers()
    rows: dict[str, dict] = {}
    with H.Procs() as procs:
        body = procs.tmp / "body.json"
        body.write_bytes(H.REQUEST_BODY)
        _, direct = H.start_direct_nginx(procs)
        _, nginx = start_h2_nginx(procs, direct)
        _, gateway = H.start_gateway(procs, args.python, f"http://127.0.0.1:{direct}")
        for name, port, path in [("nginx-h2", nginx, H.DIRECT_PATH), ("gateway", gateway, H.GATEWAY_PATH)]:
            h2load(port, path, body, 1)  # warm-up
            H.log(f"[{name}] h2load {seconds:g} s, {CONNECTIONS * STREAMS} streams over {CONNECTIONS} connections")
            rows[name] = h2load(port, path, body, seconds)
    nginx_rps, gateway_rps = rows["nginx-h2"].get("rps"), rows["gateway"].get("rps")
    ratio = round(gateway_rps / nginx_rps, 3) if nginx_rps and gateway_rps else None
    for name, row in rows.items():
        print(f"{name:10} {row.get('rps') or 0:>10.0f} req/s  errors {row.get('errors', '-')}")
    print(f"gateway / nginx-h2: {ratio}x (goal >= {GOAL_RATIO_NGINX}x)")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"seconds": seconds, "rows": rows, "ratio": ratio}, indent=2) + "\n")
    return 0 if ratio is not None and all(not row.get("errors") for row in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
