"""The standard Prometheus process metrics (`process_*`), read from /proc when /metrics is scraped.

Same names, types and units as prometheus_client's `ProcessCollector`, so stock dashboards and
alerts work. Nothing runs per call: the files are read only when a scrape renders them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

PROC = Path("/proc")
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

FAMILIES = (
    ("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds."),
    ("process_resident_memory_bytes", "gauge", "Resident memory size in bytes."),
    ("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes."),
    ("process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds."),
    ("process_open_fds", "gauge", "Number of open file descriptors."),
    ("process_max_fds", "gauge", "Maximum number of open file descriptors."),
)


def _boot_time() -> float:
    for line in (PROC / "stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise OSError("no btime in /proc/stat")


def read(pid: int) -> dict[str, float] | None:
    """The process metrics of `pid`; None when it has gone (or there is no /proc)."""
    base = PROC / str(pid)
    try:
        # Fields after the command name, which is in parentheses and may hold spaces (proc(5)).
        stat = (base / "stat").read_text().rpartition(")")[2].split()
        size, resident = (int(v) for v in (base / "statm").read_text().split()[:2])
        open_fds = sum(1 for _ in os.scandir(base / "fd"))
        max_fds = next(
            line.split()[3] for line in (base / "limits").read_text().splitlines() if line.startswith("Max open files")
        )
        boot = _boot_time()
    except (OSError, StopIteration, ValueError):
        return None
    return {
        # stat fields 14 and 15 (utime, stime) and 22 (starttime), counted from 1 with pid and comm first
        "process_cpu_seconds_total": (int(stat[11]) + int(stat[12])) / TICKS,
        "process_resident_memory_bytes": resident * PAGE,
        "process_virtual_memory_bytes": size * PAGE,
        "process_start_time_seconds": boot + int(stat[19]) / TICKS,
        "process_open_fds": open_fds,
        "process_max_fds": float("inf") if max_fds == "unlimited" else float(max_fds),
    }


def render(processes: Iterable[tuple[str, int]]) -> list[str]:
    """Exposition lines for `(label, pid)` pairs: label "" is unlabelled, else `{worker="<label>"}`."""
    rows = [(label, values) for label, pid in processes if (values := read(pid)) is not None]
    lines: list[str] = []
    for name, kind, help in FAMILIES:
        lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]
        for label, values in rows:
            labels = f'{{worker="{label}"}}' if label else ""
            value = values[name]
            lines.append(f"{name}{labels} {'+Inf' if value == float('inf') else repr(float(value))}")
    return lines
