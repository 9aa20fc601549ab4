"""Listener ports that cannot be bound: one line naming the port and its flag, not a traceback."""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterator

EXIT_CODE = 2  # like every other start-up refusal of `gateway serve` (a flag to change)
REASONS = {
    errno.EADDRINUSE: "is already in use",
    errno.EACCES: "needs privileges this process lacks",
    errno.EADDRNOTAVAIL: "is on an address this machine does not have",
}


class PortUnavailable(Exception):
    """A listener's address could not be bound; the message is the one line `gateway` prints."""

    def __init__(self, flag: str, host: str, port: int, reason: str) -> None:
        super().__init__(f"cannot listen on {host}:{port}: port {port} {reason} (change {flag})")
        self.flag, self.host, self.port = flag, host, port


@contextlib.contextmanager
def binding(flag: str, host: str, port: int) -> Iterator[None]:
    """Turn the bind failures an operator fixes with `flag` into `PortUnavailable`."""
    try:
        yield
    except OSError as exc:
        reason = REASONS.get(exc.errno or 0)
        if reason is None:
            raise
        raise PortUnavailable(flag, host, port, reason) from None


def check_free(flag: str, host: str, port: int | None, *, reuse_port: bool = False) -> None:
    """Bind and release `host:port` as the listener will (`--workers N` checks before starting workers)."""
    if not port:
        return
    with binding(flag, host, port):
        for family, kind, proto, _, addr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's create_server
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind(addr)
