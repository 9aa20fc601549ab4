"""`process_*` on /metrics: the standard process collector's names, read from /proc at scrape time."""

from __future__ import annotations

import http.client
import re
import socket
from pathlib import Path

import psutil

from gateway import process
from tests.support import GatewayProcess, example_doc, free_port, running_gateway, wait_for, write_table

SAMPLE = re.compile(r'^(process_\w+)(?:\{worker="(\w+)"\})? (\S+)$', re.M)
NAMES = {name for name, _, _ in process.FAMILIES}


def scrape(gw: GatewayProcess) -> dict[tuple[str, str], float]:
    """(name, worker label or "") -> value of every process_* sample."""
    status, text = gw.admin("GET", "/metrics")
    assert status == 200 and isinstance(text, str)
    assert all(f"# TYPE {name} " in text for name in NAMES)
    return {(m.group(1), m.group(2) or ""): float(m.group(3)) for m in SAMPLE.finditer(text)}


def table(tmp_path: Path) -> Path:
    dead = f"http://127.0.0.1:{free_port()}"  # no plane needed: the calls below are refused before one
    return write_table(tmp_path / "t.yaml", example_doc(dead, dead))


def work(port: int, calls: int) -> None:
    """`calls` requests on one keep-alive connection (each answered 404: no such host)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for _ in range(calls):
            conn.request("POST", "/production/predict", body=b"{}", headers={"Host": "nothing.example.net"})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 404
    finally:
        conn.close()


def test_process_metrics_are_this_process_and_move_with_work(tmp_path: Path) -> None:
    with running_gateway(table(tmp_path)) as gw:
        assert gw.proc is not None
        proc = psutil.Process(gw.proc.pid)
        before = scrape(gw)
        assert {name for name, _ in before} == NAMES and {label for _, label in before} == {""}
        assert before["process_resident_memory_bytes", ""] > 0
        assert before["process_virtual_memory_bytes", ""] >= before["process_resident_memory_bytes", ""]
        assert before["process_max_fds", ""] == proc.rlimit(psutil.RLIMIT_NOFILE)[0]
        assert abs(before["process_start_time_seconds", ""] - proc.create_time()) < 1.0  # one clock tick apart

        work(gw.port, 400)
        after = scrape(gw)
        assert after["process_cpu_seconds_total", ""] > before["process_cpu_seconds_total", ""]

        clients = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(20)]
        try:
            for client in clients:  # one answer on each: every connection has been accepted
                client.sendall(b"GET /x HTTP/1.1\r\nHost: nothing.example.net\r\n\r\n")
                assert client.recv(65536).startswith(b"HTTP/1.1 404")
            held = scrape(gw)["process_open_fds", ""]
            assert held >= after["process_open_fds", ""] + 20
        finally:
            for client in clients:
                client.close()
        wait_for(lambda: scrape(gw)["process_open_fds", ""] <= held - 20, "the closed connections' fds to go")


def test_workers_show_the_supervisor_and_each_worker(tmp_path: Path) -> None:
    with running_gateway(table(tmp_path), "--workers", "2") as gw:
        assert gw.proc is not None
        routing = wait_for(lambda: (r := gw.admin("GET", "/v1/routing")[1])["workers"] and len(r["workers"]) == 2 and r)
        samples = scrape(gw)
        assert {label for _, label in samples} == {"", "0", "1"}
        for w in routing["workers"]:
            start = samples["process_start_time_seconds", str(w["index"])]
            assert abs(start - psutil.Process(w["pid"]).create_time()) < 1.0  # the label names that worker
        assert abs(samples["process_start_time_seconds", ""] - psutil.Process(gw.proc.pid).create_time()) < 1.0
        assert all(samples["process_resident_memory_bytes", label] > 0 for label in ("", "0", "1"))


def test_a_process_that_has_gone_is_left_out() -> None:
    limit = int(Path("/proc/sys/kernel/pid_max").read_text())
    assert process.read(limit + 1) is None
    lines = process.render([("", limit + 1)])  # beyond the kernel's pid limit: surely not running
    assert not [line for line in lines if not line.startswith("#")]
