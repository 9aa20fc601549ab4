"""The access log (SPEC §12 `--access-log FILE|-`, `--access-log-format json|combined`, issue 13).

One line per call, formatted and written by another process (`gateway.obs.logwriter`, one per
worker, started when the log opens): a call's end appends its `CallInfo` to a queue (its labels,
status and two loop times set on it; no tuple, no formatting, no clock read, no I/O), and as soon as
BATCH_LINES wait (every FLUSH_SECONDS when fewer) the loop hands them to the writer as ONE
`marshal.dumps` of a batch behind its length, all C code: `list(map(attrgetter(*FIELDS), queue))`
(the logged fields of each call as one tuple) and the marshalling of that list. Every field is a
str, int, float, bool, None or tuple of str, marshal's own types (~0.2 µs a call, where pickle took
~0.5), and the writer runs the gateway's own interpreter, so both read one format; a field of
another type (a str subclass) sends its batch through `_plain` first. A call never waits: a pipe
that takes no more leaves the lines waiting, and past `capacity` they are dropped and counted in
`gateway_access_log_dropped_total`. A writer that dies is started again (at most once per
RESTART_SECONDS); the lines it had not read are counted as dropped. `close()` (drain, SIGTERM) hands
over what is left, closes the pipe and waits for the writer to write it and exit (at most
CLOSE_SECONDS): a clean stop loses no line.

The writer opens the file with O_APPEND and every write holds whole lines (at most WRITE_BYTES),
so the writers of `--workers N` append to one file without tearing each other's lines (Linux
serialises O_APPEND writes to a regular file; nginx's workers share their access log the same way).

Measured (`benchmarks/calls_per_call.py --variant access-log`): with a writer thread in the
gateway, formatting (~6.6 Python calls a line) held the GIL that the calls need; in a process of
its own it runs on the other core, and the gateway's part is the append and ~1/750 of a batch.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import functools
import marshal
import operator
import os
import select
import struct
import subprocess
import sys
import termios
import time
from json.encoder import encode_basestring_ascii as _q  # type: ignore[attr-defined]  # the C escaper
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.metrics import Counter

if TYPE_CHECKING:
    from gateway.calls.info import CallInfo

FORMATS = ("json", "combined")
CAPACITY = 65536  # lines waiting for the writer; past this, lines are dropped (counted)
FLUSH_SECONDS = 0.05  # the loop hands a batch to the writer this often, and as soon as BATCH_LINES wait
# A batch is handed over as soon as this many lines wait: ended calls are not kept for the whole
# FLUSH_SECONDS (750 of them at 15,000 calls/s took the gateway ~5 µs more a call, measured with
# benchmarks/run_obs.py: their memory was no longer reused while in the CPU's cache), and the writer
# still gets batches large enough that its per-batch cost (~50 µs: a read, a write) stays small.
BATCH_LINES = 256
RESTART_SECONDS = 1.0  # a writer that dies is started again, at most this often
CLOSE_SECONDS = 10.0  # how long close() waits for the writer to write everything
PIPE_BYTES = 1 << 20  # the pipe's buffer (Linux's default pipe-max-size): ~3,000 lines
SOURCE = str(Path(__file__).resolve().parents[2])  # where the writer imports `gateway` from
WRITE_BYTES = 65536  # one os.write of whole lines at most: appends of workers stay whole lines
FRAME = struct.Struct("<I")  # a batch's length, before its marshalled bytes
MARSHAL_VERSION = 4
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

# What the writer reads of a CallInfo (the formatters' attributes), in this order: the loop hands
# it one tuple of these per call, which the formatters read.
FIELDS = (
    "request_id", "client", "host", "method", "target", "protocol", "agent", "referer", "bytes_in", "bytes_out",
    "first_byte", "upstream", "side", "shadowed", "labels", "code", "started", "ended",
)  # fmt: skip
_fields = operator.attrgetter(*FIELDS)


def wall_offset() -> float:
    """Wall clock minus the loop's clock: a loop time plus this is epoch seconds."""
    return time.time() - time.monotonic()


def format_json(fields: tuple, offset: float) -> str:
    """One JSON line of a call's logged `fields` (in FIELDS order, as the writer receives them).
    Written out rather than json.dumps of a dict (measured 43 -> ~2 µs a line). What the client
    sends (host, method, target, user agent, referer) goes through json's C escaper, once per
    distinct value (`_ROUTES`, `_AGENTS`); the rest is the gateway's own: hex request ids,
    addresses, status codes, and route names that the table's schema restricts to [A-Za-z0-9_-]
    (model, environment, deployment, region)."""
    (request_id, client, host, method, target, protocol, agent, referer, bytes_in, bytes_out, first, upstream, side,
     shadowed, labels, code, started, ended) = fields  # fmt: skip
    ms = int((started + offset) * 1000)
    key = (host, method, target, protocol, labels)
    return (
        f'{{"time":"{_MILLIS.get(ms) or _millis(ms)}","request_id":"{request_id}","client":"{client}",'
        f'{_ROUTES.get(key) or _route_json(key)},"status":"{code}","bytes_in":{bytes_in},"bytes_out":{bytes_out},'
        f'"ttfb_ms":{"null" if first is None else f"{(first - started) * 1000:.3f}"},'
        f'"total_ms":{(ended - started) * 1000:.3f},"upstream":"{upstream}","side":"{side}",'
        f'"shadow":{"true" if shadowed else "false"},{_AGENTS.get((agent, referer)) or _agent_json(agent, referer)}}}'
    )


ROUTES = 4096  # distinct (host, method, target, route) segments kept by the writer, and (agent, referer) ones
_ROUTES: dict[tuple, str] = {}  # the writer process's
_AGENTS: dict[tuple[str, str], str] = {}
_MILLIS: dict[int, str] = {}


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


def _agent_json(agent: str, referer: str) -> str:
    if len(_AGENTS) >= ROUTES:
        _AGENTS.clear()
    segment = _AGENTS[agent, referer] = f'"user_agent":{_q(agent)},"referer":{_q(referer)}'
    return segment


def _millis(ms: int) -> str:
    """`ms` (epoch milliseconds) as ISO 8601 UTC; the last few hundred kept (calls of a batch end
    within a few milliseconds of each other)."""
    if len(_MILLIS) >= 256:
        _MILLIS.clear()
    text = _MILLIS[ms] = f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(ms // 1000))}.{ms % 1000:03d}Z"
    return text


def format_combined(fields: tuple, offset: float) -> str:
    """Apache/nginx "combined" (`%h - - [%t] "%r" %>s %b "%{Referer}i" "%{User-agent}i"`), then the
    gateway's fields as key="value" pairs, which combined-format parsers ignore."""
    (request_id, client, host, method, target, protocol, agent, referer, bytes_in, bytes_out, first, upstream, side,
     shadowed, labels, code, started, ended) = fields  # fmt: skip
    ttfb = "-" if first is None else f"{(first - started) * 1000:.3f}"
    version = "HTTP/2.0" if protocol == "grpc" else "HTTP/1.1"
    return (
        f'{client or "-"} - - [{_stamp(int(started + offset))}] "{_quote(method)} {_quote(target)} '
        f'{version}" {code} {bytes_out or "-"} "{_quote(referer) or "-"}" "{_quote(agent) or "-"}" '
        f'request_id="{request_id}" host="{_quote(host)}" protocol="{protocol}" model="{labels[0]}" '
        f'environment="{labels[1]}" deployment="{labels[2]}" region="{labels[3]}" side="{side}" '
        f'shadow="{"yes" if shadowed else "no"}" upstream="{upstream}" bytes_in="{bytes_in}" '
        f'ttfb_ms="{ttfb}" total_ms="{(ended - started) * 1000:.3f}"'
    )


FORMATTERS = {"json": format_json, "combined": format_combined}


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
    """The gateway's side: calls append to `queue` (the loop thread only); `flush` (every
    FLUSH_SECONDS on the loop, `loop` given) hands what gathered to the writer process."""

    def __init__(
        self, path: str, fmt: str, dropped: Counter, capacity: int = CAPACITY, loop: asyncio.AbstractEventLoop | None = None
    ) -> None:  # fmt: skip
        if fmt not in FORMATTERS:
            raise ValueError(f"--access-log-format must be one of {', '.join(FORMATS)}, not {fmt!r}")
        self.path = path
        self.fmt = fmt
        self.dropped = dropped
        dropped.inc((), 0)  # exported as 0 from the start, not only after a first drop
        self.capacity = capacity
        self.queue: collections.deque[CallInfo] = collections.deque()  # ended calls
        self.offset = wall_offset  # read once per batch (tests: a fixed clock)
        self.child: subprocess.Popen | None = None
        self.fd = -1  # the pipe to the child (non-blocking)
        self.pending = memoryview(b"")  # the part of the last batch the pipe did not take yet
        self.sent: collections.deque[tuple[int, int]] = collections.deque()  # (byte end, lines) per batch
        self.planned = 0  # bytes of every batch made for this child
        self.handed = 0  # bytes the pipe took
        self.spawned = -RESTART_SECONDS
        self.starts = 0  # writer processes started: the first, then one per restart
        self.written = 0  # lines handed over in whole batches
        self.closing = False
        self._spawn()
        self.loop = loop
        self.timer = loop.call_later(FLUSH_SECONDS, self._tick) if loop is not None else None

    def __repr__(self) -> str:
        pid = self.child.pid if self.child is not None else None
        return (
            f"<AccessLog {self.path} | writer pid {pid}, {len(self.queue)} waiting, {self.written} handed over, "
            f"{self.starts - 1} restarts>"
        )

    def close(self) -> None:
        """Hand every line still waiting to the child and wait for it to write them (drain, SIGTERM),
        at most CLOSE_SECONDS."""
        self.closing = True
        if self.timer is not None:
            self.timer.cancel()
        deadline = time.monotonic() + CLOSE_SECONDS
        while (self.queue or self.pending) and time.monotonic() < deadline:
            self.flush()
            if self.pending and self.fd >= 0:
                select.select([], [self.fd], [], max(0.0, deadline - time.monotonic()))
        child, left = self.child, len(self.queue)
        unread = self._not_read(_unread(self.fd))
        if left:  # the child could not take them in time (stopped, or restarting fails)
            self.queue.clear()
            self.dropped.inc((), left)
        if child is None:
            return
        os.close(self.fd)  # end of file: the child writes what it has and exits
        self.fd, self.child = -1, None
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            self.dropped.inc((), unread)  # at most: it may have read some
            print("gateway: access log writer did not finish in time; killed", file=sys.stderr)

    def _tick(self) -> None:
        self.timer = self.loop.call_later(FLUSH_SECONDS, self._tick)  # type: ignore[union-attr]
        self.flush()

    def flush(self) -> None:
        """Hand the waiting lines to the child in one marshalled batch, never waiting: a pipe that takes
        no more leaves them waiting (past `capacity`, the newest are dropped and counted)."""
        if self.child is not None and self.child.poll() is not None:
            self._lost()
        if self.child is None and (self.closing or time.monotonic() >= self.spawned + RESTART_SECONDS):
            self._spawn()
        if self.child is None or (self.pending and not self._send()):
            self._bound()
            return
        queue = self.queue
        if not queue:
            return
        batch = list(map(_fields, queue))
        queue.clear()
        try:
            data = marshal.dumps((self.offset(), batch), MARSHAL_VERSION)
        except ValueError:  # a field of a type marshal refuses (a str subclass): this batch the slow way
            data = marshal.dumps((self.offset(), [tuple(map(_plain, fields)) for fields in batch]), MARSHAL_VERSION)
        frame = FRAME.pack(len(data)) + data
        self.planned += len(frame)
        self.sent.append((self.planned, len(batch)))
        self.pending = memoryview(frame)
        self._send()
        if len(self.sent) > 64:  # forget the batches the child has read
            read = self.handed - _unread(self.fd)
            while self.sent and self.sent[0][0] <= read:
                self.sent.popleft()

    def _send(self) -> bool:
        """Write what the pipe takes of the pending batch; whether all of it went."""
        try:
            taken = os.write(self.fd, self.pending)
        except BlockingIOError:
            return False
        except OSError:  # EPIPE: the child is gone
            self._lost()
            return False
        self.handed += taken
        self.pending = self.pending[taken:]
        if self.pending:
            return False
        self.written += self.sent[-1][1]
        return True

    def _bound(self) -> None:
        excess = len(self.queue) - self.capacity
        if excess > 0:
            for _ in range(excess):
                self.queue.pop()
            self.dropped.inc((), excess)

    def _not_read(self, unread: int) -> int:
        """Lines of the batches the child has not read in full, `unread` bytes still in the pipe."""
        read = self.handed - unread
        return sum(lines for end, lines in self.sent if end > read)

    def _lost(self) -> None:
        """The child died: count the lines it had not read, start another at the next flush."""
        child = self.child
        lost = self._not_read(_unread(self.fd))
        os.close(self.fd)
        self.fd, self.child, self.pending = -1, None, memoryview(b"")
        if child is not None:
            if child.poll() is None:  # EPIPE with the process still there: it closed its input
                child.kill()
            child.wait()
            print(f"gateway: access log writer exited ({child.returncode}), {lost} lines lost; restarting",
                  file=sys.stderr)  # fmt: skip
        self.dropped.inc((), lost)

    def _spawn(self) -> None:
        self.spawned = time.monotonic()
        read, write = os.pipe2(os.O_CLOEXEC)
        try:
            fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:  # above /proc/sys/fs/pipe-max-size: the default 64 KiB
            pass
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (SOURCE, os.environ.get("PYTHONPATH")))))
        try:
            self.child = subprocess.Popen(
                [sys.executable, "-m", "gateway.obs.logwriter", self.path, self.fmt], stdin=read, env=env
            )
        except OSError as exc:
            os.close(write)
            print(f"gateway: access log writer could not start: {exc}", file=sys.stderr)
            return
        finally:
            os.close(read)
        os.set_blocking(write, False)
        self.fd = write
        self.planned = self.handed = 0
        self.sent.clear()
        self.starts += 1


def _plain(value: object) -> object:
    """A logged field as one of marshal's exact types: a str subclass (a str enum) as its string,
    an int or float subclass as its number, a tuple's items so, anything else as its text."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)  # the string itself, not the subclass's __str__ ("Side.CANARY")
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, tuple):
        return tuple(map(_plain, value))
    return str(value)


def _unread(fd: int) -> int:
    """Bytes written to the pipe `fd` and not read yet (FIONREAD works on a pipe's write end too)."""
    if fd < 0:
        return 0
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return 0
