"""The access log (SPEC §12 `--access-log FILE|-`, `--access-log-format json|combined`, issue 13).

One line per call, written off the hot path: a call's end appends one tuple to a bounded in-memory
queue (`Record`: the call's `CallInfo`, labels, status and two loop times; no formatting, no clock
read, no I/O); a background thread formats what has gathered and writes it in batches of whole
lines. When the queue is full the line is dropped and counted in `gateway_access_log_dropped_total`:
a call never waits for the disk. `close()` writes what is left (drain and SIGTERM), so a clean stop
loses no line.

The file is opened with O_APPEND and every write holds whole lines (at most WRITE_BYTES), so the
workers of `--workers N` append to one file without tearing each other's lines (Linux serialises
O_APPEND writes to a regular file; nginx's workers share their access log the same way).

Measured (`benchmarks/calls_per_call.py --variant access-log`): a Python call on the loop thread or
on the writer's costs the same, since both hold the GIL to run; so the call's side builds no
record object of its own (the `CallInfo` it already has goes into the queue as it is), reads no
wall clock (the writer turns loop times into wall time once per batch), and the writer formats a
line in one expression, with the time's text cached per second.
"""

from __future__ import annotations

import collections
import functools
import os
import sys
import threading
import time
from json.encoder import encode_basestring_ascii as _q  # type: ignore[attr-defined]  # the C escaper
from typing import TYPE_CHECKING

from gateway.metrics import Counter

if TYPE_CHECKING:
    from gateway.calls.info import CallInfo

FORMATS = ("json", "combined")
CAPACITY = 65536  # lines waiting for the writer; past this, lines are dropped (counted)
FLUSH_SECONDS = 0.1  # the writer's period; it also wakes when BATCH lines are waiting
BATCH = 4096
WRITE_BYTES = 65536  # one os.write of whole lines at most: appends of workers stay whole lines
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

# One call as the loop hands it over: its CallInfo (no longer changed once the call ended), its
# labels (model, environment, deployment, region, protocol), its status (HTTP status or gRPC code
# name), and the loop times (`loop.time()`, CLOCK_MONOTONIC, as asyncio's and uvloop's) of its start
# and end.
Record = tuple["CallInfo", tuple, str, float, float]


def wall_offset() -> float:
    """Wall clock minus the loop's clock: a loop time plus this is epoch seconds."""
    return time.time() - time.monotonic()


def format_json(r: Record, offset: float) -> str:
    # Written out rather than json.dumps of a dict (measured 43 -> ~10 µs a line). What the client
    # sends (host, method, target, user agent, referer) goes through json's C escaper; the rest is
    # the gateway's own: hex request ids, addresses, status codes, and route names that the table's
    # schema restricts to [A-Za-z0-9_-] (model, environment, deployment, region).
    info, labels, code, started, ended = r
    t = started + offset
    first = info.first_byte
    key = (info.host, info.method, info.target, info.protocol, labels)
    route = _ROUTES.get(key) or _route_json(key)
    return (
        f'{{"time":"{_second(int(t))}.{int(t * 1000) % 1000:03d}Z","request_id":"{info.request_id}",'
        f'"client":"{info.client}",{route},"status":"{code}","bytes_in":{info.bytes_in},'
        f'"bytes_out":{info.bytes_out},"ttfb_ms":{"null" if first is None else f"{(first - started) * 1000:.3f}"},'
        f'"total_ms":{(ended - started) * 1000:.3f},"upstream":"{info.upstream}","side":"{info.side}",'
        f'"shadow":{"true" if info.shadowed else "false"},"user_agent":{_q(info.agent) if info.agent else EMPTY},'
        f'"referer":{_q(info.referer) if info.referer else EMPTY}}}'
    )


EMPTY = '""'
ROUTES = 4096  # distinct (host, method, target, route) segments kept by the writer
_ROUTES: dict[tuple, str] = {}  # the writer thread's only


def _route_json(key: tuple) -> str:
    """The JSON fields a call shares with the other calls of its host, target and route (most of
    a line: measured ~15% less time a line, same output)."""
    host, method, target, protocol, labels = key
    if len(_ROUTES) >= ROUTES:
        _ROUTES.clear()
    segment = _ROUTES[key] = (
        f'"host":{_q(host)},"method":{_q(method)},"target":{_q(target)},"protocol":"{protocol}",'
        f'"model":"{labels[0]}","environment":"{labels[1]}","deployment":"{labels[2]}","region":"{labels[3]}"'
    )
    return segment


def format_combined(r: Record, offset: float) -> str:
    """Apache/nginx "combined" (`%h - - [%t] "%r" %>s %b "%{Referer}i" "%{User-agent}i"`), then the
    gateway's fields as key="value" pairs, which combined-format parsers ignore."""
    info, labels, code, started, ended = r
    first = info.first_byte
    ttfb = "-" if first is None else f"{(first - started) * 1000:.3f}"
    version = "HTTP/2.0" if info.protocol == "grpc" else "HTTP/1.1"
    return (
        f'{info.client or "-"} - - [{_stamp(int(started + offset))}] "{_quote(info.method)} {_quote(info.target)} '
        f'{version}" {code} {info.bytes_out or "-"} "{_quote(info.referer) or "-"}" "{_quote(info.agent) or "-"}" '
        f'request_id="{info.request_id}" host="{_quote(info.host)}" protocol="{info.protocol}" model="{labels[0]}" '
        f'environment="{labels[1]}" deployment="{labels[2]}" region="{labels[3]}" side="{info.side}" '
        f'shadow="{"yes" if info.shadowed else "no"}" upstream="{info.upstream}" bytes_in="{info.bytes_in}" '
        f'ttfb_ms="{ttfb}" total_ms="{(ended - started) * 1000:.3f}"'
    )


FORMATTERS = {"json": format_json, "combined": format_combined}


@functools.lru_cache(maxsize=4)
def _second(t: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t))


@functools.lru_cache(maxsize=4)
def _stamp(t: int) -> str:
    g = time.gmtime(t)
    return f"{g.tm_mday:02d}/{MONTHS[g.tm_mon - 1]}/{g.tm_year}:{g.tm_hour:02d}:{g.tm_min:02d}:{g.tm_sec:02d} +0000"


def _quote(text: str) -> str:
    """nginx's escaping of logged strings: `"`, `\\` and non-printable characters as \\xHH."""
    if text.isprintable() and '"' not in text and "\\" not in text:
        return text
    return "".join(
        c if c.isprintable() and c not in '"\\' else "".join(f"\\x{b:02X}" for b in c.encode()) for c in text
    )


class AccessLog:
    """The writer: `append` on the loop thread, never blocking; a thread formats and writes."""

    def __init__(self, path: str, fmt: str, dropped: Counter, capacity: int = CAPACITY) -> None:
        if fmt not in FORMATTERS:
            raise ValueError(f"--access-log-format must be one of {', '.join(FORMATS)}, not {fmt!r}")
        self.path = path
        self.format = FORMATTERS[fmt]
        self.dropped = dropped
        dropped.inc((), 0)  # exported as 0 from the start, not only after a first drop
        self.capacity = capacity
        self.fd = 1 if path == "-" else os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.queue: collections.deque[Record] = collections.deque()  # append/popleft are thread-safe
        self.wakeup = threading.Event()
        self.stopping = False
        self.written = 0
        self.offset = wall_offset  # read once per batch (tests: a fixed clock)
        self.thread = threading.Thread(target=self._run, name="access-log", daemon=True)
        self.thread.start()

    def __repr__(self) -> str:
        return f"<AccessLog {self.path} | {len(self.queue)} waiting, {self.written} written>"

    def append(self, record: Record) -> None:
        queue = self.queue
        waiting = len(queue)
        if waiting >= self.capacity:
            self.dropped.inc(())
            return
        queue.append(record)
        if waiting == BATCH - 1:
            self.wakeup.set()

    def close(self) -> None:
        """Write every line still waiting, then stop (drain, SIGTERM)."""
        self.stopping = True
        self.wakeup.set()
        self.thread.join(10)
        if self.fd != 1:
            os.close(self.fd)

    def _run(self) -> None:
        while not self.stopping:
            self.wakeup.wait(FLUSH_SECONDS)
            self.wakeup.clear()
            self._flush()
        self._flush()

    def _flush(self) -> None:
        queue, fmt, offset = self.queue, self.format, self.offset()
        carried: list[str] = []  # the line that did not fit in the previous write
        while queue or carried:
            lines, carried = carried, []
            size = sum(len(line) + 1 for line in lines)
            while queue:
                line = fmt(queue.popleft(), offset)
                size += len(line) + 1
                if size > WRITE_BYTES and lines:
                    carried.append(line)
                    break
                lines.append(line)
            data = ("\n".join(lines) + "\n").encode("utf-8", "backslashreplace")
            if len(data) <= WRITE_BYTES or len(lines) == 1:
                self._write(data)
            else:  # characters past ASCII (combined keeps printable ones): more bytes than characters
                for line in lines:
                    self._write((line + "\n").encode("utf-8", "backslashreplace"))
            self.written += len(lines)

    def _write(self, data: bytes) -> None:
        try:
            while data:
                data = data[os.write(self.fd, data) :]
        except OSError as exc:  # disk full, closed stdout: the lines are lost, the calls are not
            self.dropped.inc((), data.count(b"\n"))
            if not self.stopping:
                print(f"gateway: access log write failed: {exc}", file=sys.stderr)
