"""The worker's observer of calls: the access log and tracing as sinks of `CallRecord` (issue 13).

`Pipeline.observer` is one of these when `--access-log` or `--otel` is on, and None otherwise;
adapters build a `CallInfo` only when it is set. Every hook is called by the pipeline, once per
call (or per attempt), whatever protocol carried it. The tracing hooks do nothing for a call not
traced (`CallInfo.traced`, decided once by `wanted`), and the access log's costs the call one
`CallInfo` (built anyway), four attributes set at its end and one `deque.append`.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from gateway.calls.info import CallInfo
from gateway.errors import GatewayError
from gateway.obs.accesslog import BATCH_LINES, AccessLog

if TYPE_CHECKING:
    from gateway.obs.tracing import Tracing


class Observer:
    def __init__(self, access_log: AccessLog | None, tracing: Tracing | None) -> None:
        self.access_log = access_log
        self.queue = access_log.queue if access_log is not None else None
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
        if info.traced:
            self.tracing.server(info, labels, self._wall_ns(started))  # type: ignore[union-attr]

    def attempt(self, info: CallInfo, upstream: str) -> None:
        info.upstream = upstream
        info.attempts += 1
        if info.traced:
            self.tracing.attempt(info)  # type: ignore[union-attr]

    def attempt_failed(self, info: CallInfo, error: GatewayError) -> None:
        if info.traced:
            self.tracing.attempt_ended(info, str(error.status), type(error).__name__)  # type: ignore[union-attr]

    def ended(
        self, info: CallInfo, labels: tuple, code: str, started: float, error: GatewayError | None, now: float
    ) -> None:  # fmt: skip
        """The call is over at loop time `now` (the pipeline's, read once for its duration too)."""
        if info.traced:
            error_type = type(error).__name__ if error is not None else None
            self.tracing.ended(info, code, error_type, time.time_ns())  # type: ignore[union-attr]
        queue = self.queue
        if queue is not None:  # no tuple, no call of ours: the flush reads the fields in C
            info.labels, info.code, info.started, info.ended = labels, code, started, now
            queue.append(info)
            if len(queue) >= BATCH_LINES:  # handed over soon: a call's memory is reused while cache-hot
                self.access_log.flush()  # type: ignore[union-attr]

    def unadmitted(self, info: CallInfo, labels: tuple, code: str, started: float) -> None:
        """A call the pipeline never admitted (refused, answered by the gateway, held and dropped)."""
        self.started(info, labels, started)
        self.ended(info, labels, code, started, None, self.loop.time())

    def _wall_ns(self, started: float) -> int:
        return time.time_ns() - int((self.loop.time() - started) * 1e9)
