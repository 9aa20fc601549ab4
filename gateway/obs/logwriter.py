"""The access log's writer process: `python -m gateway.obs.logwriter FILE|- FORMAT` (issue 13).

The gateway (`accesslog.AccessLog`) starts one per worker and feeds it through a pipe on its
standard input: one marshalled batch `(offset, [fields, ...])` behind its length (`FRAME`) every
256 calls (~50 ms at most), `fields` a call's logged `CallInfo` attributes (`FIELDS`) and `offset`
the wall clock minus the loop's. This process formats the lines (`accesslog.format_json` /
`format_combined`) and writes them, whole lines per `os.write`, with O_APPEND: the formatting no
longer holds the gateway's GIL. At end of file (the gateway closed the pipe: drain, SIGTERM, or the
gateway died) it writes what it has and exits. SIGINT and SIGTERM are ignored: a terminal's Ctrl-C
reaches the whole process group, and the gateway's drain still has lines to hand over; the pipe's
end is what stops this process. `-` writes to the inherited standard output.

It runs at a lower priority (`NICE`, like a log shipper): when the cores are shared with the calls
(the gateway's workers, a plane or a load generator on the same machine), a woken process that
serves calls preempts it rather than waiting for its batch (measured with benchmarks/run_obs.py:
~2% more req/s with the log on, in three of three A/B runs). At +10 it still gets ~10% of a core
that a worker keeps busy, about twice what a worker's calls need at 12,000 a second (~4 µs a line);
behind that the lines wait in the pipe and the queue, and only past `accesslog.CAPACITY` are they
dropped (and counted).
"""

from __future__ import annotations

import marshal
import os
import signal
import sys

from gateway.obs.accesslog import FORMATTERS, FRAME, WRITE_BYTES

NICE = 10  # added to the gateway's niceness


def write_lines(fd: int, lines: list[str]) -> int:
    """Write `lines` to `fd` in writes of whole lines, at most WRITE_BYTES each (so that the workers'
    O_APPEND writes never tear each other's lines); the number of lines lost to a write error."""
    start, lost = 0, 0
    while start < len(lines):
        size, end = 0, start
        while end < len(lines) and (size + len(lines[end]) + 1 <= WRITE_BYTES or end == start):
            size += len(lines[end]) + 1
            end += 1
        data = ("\n".join(lines[start:end]) + "\n").encode("utf-8", "backslashreplace")
        if len(data) > WRITE_BYTES and end - start > 1:  # characters past ASCII: more bytes than characters
            end = start + max(1, (end - start) // 2)
            continue
        try:
            while data:
                data = data[os.write(fd, data) :]
        except OSError as exc:  # disk full, closed stdout: the lines are lost, not the process
            lost += data.count(b"\n")
            print(f"gateway: access log write failed: {exc}", file=sys.stderr)
        start = end
    return lost


def run(source: object, fd: int, fmt: str) -> None:
    """Format and write every batch read from `source` (a binary file) until its end."""
    format = FORMATTERS[fmt]
    while True:
        head = source.read(FRAME.size)  # type: ignore[attr-defined]
        if len(head) < FRAME.size:  # the gateway closed the pipe
            return
        (size,) = FRAME.unpack(head)
        data = source.read(size)  # type: ignore[attr-defined]
        if len(data) < size:  # the gateway died mid-batch
            return
        offset, batch = marshal.loads(data)
        lines = [format(fields, offset) for fields in batch]
        write_lines(fd, lines)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in FORMATTERS:
        print(f"usage: python -m gateway.obs.logwriter FILE|- {'|'.join(FORMATTERS)}", file=sys.stderr)
        return 2
    os.nice(NICE)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    path, fmt = argv
    try:
        fd = 1 if path == "-" else os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as exc:
        print(f"gateway: access log {path}: {exc.strerror}", file=sys.stderr)
        return 1
    run(sys.stdin.buffer, fd, fmt)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
