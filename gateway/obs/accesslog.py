"""The access log (SPEC §12 `--access-log FILE|-`, `--access-log-format json|combined`, issue 13).

One line per call, written off the hot path: a call's end appends one tuple of plain values to a
bounded in-memory queue (no formatting, no I/O); a background thread formats what has gathered
and writes it in batches of whole lines. When the queue is full the line is dropped and counted in
`gateway_access_log_dropped_total`: a call never waits for the disk. `close()` writes what is left
(drain and SIGTERM), so a clean stop loses no line.

The file is opened with O_APPEND and every write holds whole lines (at most WRITE_BYTES), so the
workers of `--workers N` append to one file without tearing each other's lines (Linux serialises
O_APPEND writes to a regular file; nginx's workers share their access log the same way).
"""

from __future__ import annotations

import collections
import functools
import os
import sys
import threading
import time
from json.encoder import encode_basestring_ascii as _q  # type: ignore[attr-defined]  # the C escaper
from typing import NamedTuple

from gateway.metrics import Counter

FORMATS = ("json", "combined")
CAPACITY = 65536  # lines waiting for the writer; past this, lines are dropped (counted)
FLUSH_SECONDS = 0.1  # the writer's period; it also wakes when BATCH lines are waiting
BATCH = 4096
WRITE_BYTES = 65536  # one os.write of whole lines at most: appends of workers stay whole lines
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class Entry(NamedTuple):
    """One call, as plain values (built on the loop thread, formatted on the writer's)."""

    time: float  # wall clock of the call's start (epoch seconds)
    request_id: str
    client: str
    host: str
    method: str
    target: str
    protocol: str  # http, websocket, grpc, async
    model: str
    environment: str
    deployment: str
    region: str
    status: str  # HTTP status, or the gRPC code name
    bytes_in: int
    bytes_out: int
    first_byte: float | None  # seconds from the start to the plane's first answer byte
    total: float  # seconds from the start to the end
    upstream: str
    side: str  # primary, canary, candidate; "" when not routed to an environment
    shadowed: bool
    agent: str
    referer: str


def format_json(e: Entry) -> str:
    # Written out rather than json.dumps of a dict (measured 43 -> ~10 µs a line). What the client
    # sends (host, method, target, user agent, referer) goes through json's C escaper; the rest is
    # the gateway's own: hex request ids, addresses, status codes, and route names that the table's
    # schema restricts to [A-Za-z0-9_-] (model, environment, deployment, region).
    ttfb = "null" if e.first_byte is None else f"{e.first_byte * 1000:.3f}"
    return (
        f'{{"time":"{_iso(e.time)}","request_id":"{e.request_id}","client":"{e.client}","host":{_q(e.host)},'
        f'"method":{_q(e.method)},"target":{_q(e.target)},"protocol":"{e.protocol}","model":"{e.model}",'
        f'"environment":"{e.environment}","deployment":"{e.deployment}","region":"{e.region}",'
        f'"status":"{e.status}","bytes_in":{e.bytes_in},"bytes_out":{e.bytes_out},"ttfb_ms":{ttfb},'
        f'"total_ms":{e.total * 1000:.3f},"upstream":"{e.upstream}","side":"{e.side}",'
        f'"shadow":{"true" if e.shadowed else "false"},"user_agent":{_q(e.agent)},"referer":{_q(e.referer)}}}'
    )


def format_combined(e: Entry) -> str:
    """Apache/nginx "combined" (`%h - - [%t] "%r" %>s %b "%{Referer}i" "%{User-agent}i"`), then the
    gateway's fields as key="value" pairs, which combined-format parsers ignore."""
    t = time.gmtime(e.time)
    stamp = f"{t.tm_mday:02d}/{MONTHS[t.tm_mon - 1]}/{t.tm_year}:{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"
    ttfb = "-" if e.first_byte is None else f"{e.first_byte * 1000:.3f}"
    version = "HTTP/2.0" if e.protocol == "grpc" else "HTTP/1.1"
    return (
        f'{e.client or "-"} - - [{stamp}] "{_quote(e.method)} {_quote(e.target)} {version}" {e.status} '
        f'{e.bytes_out or "-"} "{_quote(e.referer) or "-"}" "{_quote(e.agent) or "-"}" '
        f'request_id="{e.request_id}" host="{_quote(e.host)}" protocol="{e.protocol}" model="{e.model}" '
        f'environment="{e.environment}" deployment="{e.deployment}" region="{e.region}" side="{e.side}" '
        f'shadow="{"yes" if e.shadowed else "no"}" upstream="{e.upstream}" bytes_in="{e.bytes_in}" '
        f'ttfb_ms="{ttfb}" total_ms="{e.total * 1000:.3f}"'
    )


FORMATTERS = {"json": format_json, "combined": format_combined}


def _iso(t: float) -> str:
    ms = int(t * 1000) % 1000
    return _second(int(t)) + f".{ms:03d}Z"


@functools.lru_cache(maxsize=4)
def _second(t: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t))


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
        self.queue: collections.deque[Entry] = collections.deque()  # append/popleft are thread-safe
        self.wakeup = threading.Event()
        self.stopping = False
        self.written = 0
        self.thread = threading.Thread(target=self._run, name="access-log", daemon=True)
        self.thread.start()

    def __repr__(self) -> str:
        return f"<AccessLog {self.path} | {len(self.queue)} waiting, {self.written} written>"

    def append(self, entry: Entry) -> None:
        queue = self.queue
        if len(queue) >= self.capacity:
            self.dropped.inc(())
            return
        queue.append(entry)
        if len(queue) == BATCH:
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
        queue, fmt = self.queue, self.format
        while queue:
            parts: list[bytes] = []
            size = 0
            while queue and size < WRITE_BYTES:
                line = (fmt(queue.popleft()) + "\n").encode("utf-8", "backslashreplace")
                parts.append(line)
                size += len(line)
            self._write(b"".join(parts))
            self.written += len(parts)

    def _write(self, data: bytes) -> None:
        try:
            while data:
                data = data[os.write(self.fd, data) :]
        except OSError as exc:  # disk full, closed stdout: the lines are lost, the calls are not
            self.dropped.inc((), data.count(b"\n"))
            if not self.stopping:
                print(f"gateway: access log write failed: {exc}", file=sys.stderr)
