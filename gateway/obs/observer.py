"""The worker's observer of calls: the access log and tracing as sinks of `CallRecord` (issue 13).

`Pipeline.observer` is one of these when `--access-log` or `--otel` is on, and None otherwise;
adapters build a `CallInfo` only when it is set. Every hook is called by the pipeline, once per
call (or per attempt), whatever protocol carried it.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from gateway.calls.info import CallInfo
from gateway.errors import GatewayError
from gateway.obs.accesslog import AccessLog, Entry

if TYPE_CHECKING:
    from gateway.obs.tracing import Tracing


class Observer:
    def __init__(self, access_log: AccessLog | None, tracing: Tracing | None) -> None:
        self.access_log = access_log
        self.tracing = tracing
        self.loop = asyncio.get_running_loop()

    def __repr__(self) -> str:
        return f"<Observer log={self.access_log!r} tracing={'on' if self.tracing else 'off'}>"

    def close(self) -> None:
        """Flush and stop the sinks (drain, SIGTERM): no line and no batched span is lost."""
        if self.access_log is not None:
            self.access_log.close()
        if self.tracing is not None:
            self.tracing.close()

    def wanted(self, parent: str) -> bool | None:
        """Whether an adapter should build a `CallInfo` for a call whose client sent the traceparent
        `parent` ("" for none): None for no (no access log, not traced: a call costs nothing more),
        else whether it is traced (the one sampling decision, `CallInfo.traced`)."""
        traced = self.tracing is not None and self.tracing.sampled(parent)
        return traced if traced or self.access_log is not None else None

    def started(self, info: CallInfo, labels: tuple, started: float) -> None:
        if self.tracing is not None:
            self.tracing.server(info, labels, self._wall_ns(started))

    def attempt(self, info: CallInfo, upstream: str) -> None:
        info.upstream = upstream
        info.attempts += 1
        if self.tracing is not None:
            self.tracing.attempt(info)

    def attempt_failed(self, info: CallInfo, error: GatewayError) -> None:
        if self.tracing is not None:
            self.tracing.attempt_ended(info, str(error.status), type(error).__name__)

    def ended(self, info: CallInfo, labels: tuple, code: str, started: float, error: GatewayError | None) -> None:
        now = self.loop.time()
        if self.tracing is not None:
            self.tracing.ended(info, code, type(error).__name__ if error is not None else None, time.time_ns())
        if self.access_log is not None:
            first = None if info.first_byte is None else info.first_byte - started
            self.access_log.append(Entry(
                time.time() - (now - started), info.request_id, info.client, info.host, info.method, info.target,
                info.protocol, labels[0], labels[1], labels[2], labels[3], code, info.bytes_in, info.bytes_out,
                first, now - started, info.upstream, info.side, info.shadowed, info.agent, info.referer,
            ))  # fmt: skip

    def unadmitted(self, info: CallInfo, labels: tuple, code: str, started: float) -> None:
        """A call the pipeline never admitted (refused, answered by the gateway, held and dropped)."""
        self.started(info, labels, started)
        self.ended(info, labels, code, started, None)

    def _wall_ns(self, started: float) -> int:
        return time.time_ns() - int((self.loop.time() - started) * 1e9)
