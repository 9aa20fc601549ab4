"""A loop that runs in the background for one deployment's replicas (SRV discovery, health probes)."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("gateway.upstream")


class BackgroundLoop:
    """Runs `self._run()` as a task from `start` to `stop`; a crash is logged, never silent."""

    _task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        raise NotImplementedError

    def _begin(self, name: str) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=name)
        self._task.add_done_callback(_log_crash)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("task %s crashed", task.get_name(), exc_info=task.exception())
