"""Each HTTP/2 flood of the security review against a real gateway and a real grpcio plane, with the
gateway's RSS before and after and whether a concurrent well-behaved client kept getting answers.

    .venv/bin/python benchmarks/h2_floods.py [--scale 1.0]

Every flood is bounded in bytes and stops by itself (a send blocked for a second means the gateway
stopped reading). Results: benchmarks/h2_floods.md.
"""

from __future__ import annotations

import argparse
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402
import hpack  # noqa: E402
import psutil  # noqa: E402

from gateway.grpc import wire  # noqa: E402
from gateway.grpc.hpack_literal import encode_string  # noqa: E402
from tests.support import free_port, running_gateway, write_table  # noqa: E402
from tests.test_grpc import AUTH, HOST, GrpcPlane, table_doc  # noqa: E402
from tests.test_grpc_wire import RawClient  # noqa: E402

MIB = 1024 * 1024
CANCEL = struct.pack(">L", wire.CANCEL)
REQUEST = [(":method", "POST"), (":scheme", "http"), (":path", "/t.Plane/Echo"), (":authority", HOST),
           ("content-type", "application/grpc"), ("te", "trailers")]  # fmt: skip


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return wire.frame(kind, flags, stream_id, payload)


class Flooder(RawClient):
    def send_bounded(self, chunks, total: int) -> int:
        """Send chunks up to `total` bytes without reading; stop once a send blocks for 1 s or the gateway closes."""
        self.sock.settimeout(1.0)
        sent = 0
        try:
            for chunk in chunks:
                if sent >= total:
                    break
                self.sock.sendall(chunk)
                sent += len(chunk)
        except (TimeoutError, ConnectionResetError, BrokenPipeError):
            pass
        return sent

    def outcome(self) -> str:
        """What the gateway did to the connection: its GOAWAY code, closed, or still open (stalled)."""
        self.sock.settimeout(2.0)
        try:
            while (f := self.frame()) is not None:
                if f[0] == wire.GOAWAY:
                    return f"GOAWAY 0x{struct.unpack('>LL', f[3][:8])[1]:x}"
            return "closed"
        except TimeoutError:
            return "open"
        except (ConnectionResetError, BrokenPipeError):
            return "closed (reset)"


class Prober(threading.Thread):
    """A well-behaved client calling Echo in a loop while a flood runs."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port, self.ok, self.failed, self.stop = port, 0, 0, threading.Event()
        self.errors: set[str] = set()

    def run(self) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{self.port}", options=[("grpc.default_authority", HOST)]) as ch:
            echo = ch.unary_unary("/t.Plane/Echo")
            while not self.stop.is_set():
                try:
                    echo(b"probe", metadata=AUTH, timeout=5)
                    self.ok += 1
                except grpc.RpcError as error:
                    self.failed += 1
                    self.errors.add(f"{error.code().name}: {error.details()}")
                time.sleep(0.05)


def settle(proc: psutil.Process) -> int:
    before = sum(proc.cpu_times()[:2])
    for _ in range(100):
        time.sleep(0.3)
        now = sum(proc.cpu_times()[:2])
        if now - before < 0.03:
            break
        before = now
    return proc.memory_info().rss


def cheap_headers():
    encoder, stream = hpack.Encoder(), 1
    while True:
        yield b"".join(
            frame(wire.HEADERS, wire.END_HEADERS | wire.END_STREAM, stream + 2 * i, encoder.encode(REQUEST))
            for i in range(1000)
        )
        stream += 2000


def pings():
    chunk = frame(wire.PING, 0, 0, b"12345678") * 10_000
    while True:
        yield chunk


def settings():
    chunk = frame(wire.SETTINGS, 0, 0) * 10_000
    while True:
        yield chunk


def continuation():
    yield frame(wire.HEADERS, 0, 1, hpack.Encoder().encode([(":method", "POST")]))
    chunk = frame(wire.CONTINUATION, 0, 1) * 100_000
    while True:
        yield chunk


def big_blocks(client: Flooder, n: int):
    # Stream 1 is opened and answered at once (no key): the blocks below are on a closed stream.
    client.send(frame(wire.HEADERS, wire.END_HEADERS | wire.END_STREAM, 1, client.encoder.encode(REQUEST)))
    client.until(wire.HEADERS, wire.END_STREAM, 1)
    for i in range(n):
        name, value = b"x-field", (b"%08d" % i).ljust(60_000, b"v")
        yield frame(wire.HEADERS, wire.END_HEADERS, 1, b"\x00" + encode_string(name) + encode_string(value))


def rapid_reset(n: int):
    encoder = hpack.Encoder()
    fields = [*REQUEST, *AUTH]
    fields[2] = (":path", "/t.Plane/Hang")
    yield b"".join(
        frame(wire.HEADERS, wire.END_HEADERS, i, encoder.encode(fields)) + frame(wire.RST_STREAM, 0, i, CANCEL)
        for i in range(1, 2 * n, 2)
    )


def run(gw, plane: CountingPlane, name: str, scale: float) -> None:
    proc = psutil.Process(gw.proc.pid)
    before = settle(proc)
    prober = Prober(gw.grpc_port)
    prober.start()
    calls = plane.calls
    clients, sent = [], 0
    if name == "unread HEADERS (no key)":
        c = Flooder(gw.grpc_port)
        clients.append(c)
        sent = c.send_bounded(cheap_headers(), int(14 * MIB * scale))
    elif name in ("PING", "SETTINGS"):
        c = Flooder(gw.grpc_port)
        clients.append(c)
        sent = c.send_bounded(pings() if name == "PING" else settings(), int(14 * MIB * scale))
    elif name == "empty CONTINUATION":
        c = Flooder(gw.grpc_port)
        clients.append(c)
        sent = c.send_bounded(continuation(), int(171 * MIB * scale))
    elif name == "HPACK 60 KB literals, 6 connections":
        for _ in range(6):
            c = Flooder(gw.grpc_port)
            clients.append(c)
        for c in clients:
            sent += c.send_bounded(big_blocks(c, int(300 * scale)), 1 << 40)
    elif name == "rapid reset (5000 pairs)":
        c = Flooder(gw.grpc_port)
        clients.append(c)
        sent = c.send_bounded(rapid_reset(5000), 1 << 40)
    time.sleep(0.5)
    after = settle(proc)
    outcomes = sorted({c.outcome() for c in clients})
    time.sleep(0.3)
    prober.stop.set()
    prober.join()
    for c in clients:
        c.close()
    if prober.errors:
        print(f"  probe errors: {sorted(prober.errors)}", file=sys.stderr)
    extra = f", plane calls started {plane.calls - calls - prober.ok}" if "reset" in name else ""
    print(
        f"| {name} | {sent / MIB:.1f} MiB | {before / MIB:.0f} MiB | {after / MIB:.0f} MiB | {(after - before) / MIB:+.0f} MiB "
        f"| {', '.join(outcomes)}{extra} | {prober.ok} answered, {prober.failed} failed |",
        flush=True,
    )


class CountingPlane(GrpcPlane):
    def __init__(self, name: str) -> None:
        self.calls = 0
        self.lock = threading.Lock()
        super().__init__(name)

    def service(self, details):
        with self.lock:
            self.calls += 1
        return super().service(details)


FLOODS = ["unread HEADERS (no key)", "PING", "SETTINGS", "empty CONTINUATION", "HPACK 60 KB literals, 6 connections",
          "rapid reset (5000 pairs)"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply each flood's size")
    args = parser.parse_args()
    us, eu = CountingPlane("us-east-1"), GrpcPlane("eu-west-1")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            table = write_table(Path(tmp) / "table.yaml", table_doc(us, eu, f"127.0.0.1:{free_port()}"))
            print("| flood | sent | RSS before | RSS after | growth | connection | concurrent client |")
            print("|---|---|---|---|---|---|---|")
            for name in FLOODS:  # a fresh gateway per flood: each starts from the same RSS
                with running_gateway(table, grpc_port=free_port()) as gw:
                    run(gw, us, name, args.scale)
    finally:
        us.stop()
        eu.stop()


if __name__ == "__main__":
    main()
