"""The serving routing table: loaded, validated on the side, swapped by one assignment."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.metrics import Metrics
from gateway.routing.loader import TableInvalid, load_table
from gateway.routing.model import Table

log = logging.getLogger("gateway.table")


@dataclass(frozen=True, slots=True)
class ReloadResult:
    ok: bool
    changed: bool
    problems: tuple[str, ...] = ()


class TableState:
    """Holds the current `Table`. Readers take `state.table` once per call and keep it."""

    def __init__(self, path: str, metrics: Metrics, table: Table | None = None) -> None:
        self.path = path
        self.metrics = metrics
        self.table: Table = table if table is not None else load_table(path)
        self.generation = 1
        self.loaded_at = time.time()
        self.last_error: tuple[str, ...] = ()
        self.on_swap: list[Callable[[Table], None]] = []
        self._lock = asyncio.Lock()
        self._stat = self._file_stat()
        metrics.reloads.inc(("success",))
        self._publish()

    def __repr__(self) -> str:
        return f"<TableState gen={self.generation} {self.table!r}>"

    def _file_stat(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _publish(self) -> None:
        self.metrics.table_info.values.clear()
        self.metrics.table_info.set((self.table.digest, str(self.generation)), 1)

    async def reload(self, reason: str) -> ReloadResult:
        """Load the file again; swap on success, keep serving the old table on failure."""
        async with self._lock:
            self._stat = self._file_stat()
            loop = asyncio.get_running_loop()
            try:
                table = await loop.run_in_executor(None, load_table, self.path)
            except TableInvalid as exc:
                self.last_error = tuple(exc.problems)
                self.metrics.reloads.inc(("failure",))
                log.error(
                    "routing table reload (%s) refused; still serving %s:\n%s", reason, self.table.digest[:12], exc
                )
                return ReloadResult(False, False, self.last_error)
            self.last_error = ()
            changed = table.digest != self.table.digest
            if changed:
                self.table = table  # the swap: one reference, calls in flight keep their snapshot
                self.generation += 1
                self.loaded_at = time.time()
                for callback in self.on_swap:
                    callback(table)
                self._publish()
            self.metrics.reloads.inc(("success",))
            log.info("routing table reload (%s): %s", reason, "swapped" if changed else "unchanged")
            return ReloadResult(True, changed)

    async def watch(self, interval: float = 1.0) -> None:
        """Reload when the file changes (mtime, size or inode: editors replace files)."""
        while True:
            await asyncio.sleep(interval)
            stat = self._file_stat()
            if stat is not None and stat != self._stat:
                await self.reload("file changed")

    def describe(self) -> dict:
        t = self.table
        return {
            "version": t.version,
            "digest": t.digest,
            "generation": self.generation,
            "source": t.source,
            "loaded_at": self.loaded_at,
            "models": len(t.models),
            "planes": sorted(t.planes),
            "domains": sorted(t.domains),
            "last_reload_error": list(self.last_error) or None,
        }
