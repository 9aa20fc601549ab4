"""The serving routing table: loaded, validated on the side, swapped by one assignment.

What serves is the table file composed with the admin API's changes (the overlay in the admin
store, `gateway.environments`). A reload reads both again; an admin change composes the new
overlay with the file already loaded. Either way the result is validated whole before the swap.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.environments.overlay import Base, compose, orphans, read_base
from gateway.metrics import Metrics
from gateway.routing.loader import TableInvalid
from gateway.routing.model import Table
from gateway.stores import open_store
from gateway.stores.db import StoreUnavailable

log = logging.getLogger("gateway.table")


@dataclass(frozen=True, slots=True)
class ReloadResult:
    ok: bool
    changed: bool
    problems: tuple[str, ...] = ()


# The file `load_serving_table` read last, for the TableState that serves it next: `gateway serve`
# validates the table before binding anything, then starts serving it, and compiling a 100,000-model
# table twice doubled the time to ready. One entry, taken by the first TableState of that path.
_checked: list[Base] = []


def load_serving_table(path: str, store_path: str | None = None, cache: str | None = None) -> Table:
    """What a gateway would serve: the table file composed with its admin store. Raises TableInvalid."""
    base = read_base(path)
    store = open_store(store_path, path, cache=cache)
    try:
        table = compose(base, first_overlay(store))
    finally:
        close_store(store)
    _checked[:] = [base]
    return table


def first_overlay(store) -> dict[str, Any]:
    """The overlay a starting gateway serves: the store's, or its local cache while the database is down."""
    try:
        return store.load()
    except StoreUnavailable:
        return store.cached()


def close_store(store) -> None:
    close = getattr(store, "close", None)  # a database store holds a connection pool
    if close is not None:
        close()


def _read_checked_base(path: str) -> Base:
    previous = _checked.pop() if _checked else None
    return read_base(path, previous)  # reused only when the file's bytes did not change since


class TableState:
    """Holds the current `Table`. Readers take `state.table` once per call and keep it."""

    def __init__(self, path: str, metrics: Metrics, store_path: str | None = None, cache: str | None = None) -> None:
        self.path = path
        self.metrics = metrics
        self.store = open_store(store_path, path, metrics, cache)
        self.on_overlay: list[Callable[[dict[str, Any]], None]] = []  # every overlay served, before its swap
        self.base: Base = _read_checked_base(path)
        self.overlay: dict[str, Any] = first_overlay(self.store)
        self.table: Table = compose(self.base, self.overlay)
        self._remember(self.overlay)
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
        """Load the file and the admin store again; swap on success, keep serving the old table on failure."""
        async with self._lock:
            self._stat = self._file_stat()
            loop = asyncio.get_running_loop()
            try:
                base, overlay, table = await loop.run_in_executor(None, self._load)
            except TableInvalid as exc:
                self.last_error = tuple(exc.problems)
                self.metrics.reloads.inc(("failure",))
                log.error(
                    "routing table reload (%s) refused; still serving %s:\n%s", reason, self.table.digest[:12], exc
                )
                return ReloadResult(False, False, self.last_error)
            self.last_error = ()
            self.base, self.overlay = base, overlay
            changed = self._swap(table)
            self.metrics.reloads.inc(("success",))
            log.info("routing table reload (%s): %s", reason, "swapped" if changed else "unchanged")
            return ReloadResult(True, changed)

    def _load(self) -> tuple[Base, dict[str, Any], Table]:
        base = read_base(self.path, self.base)  # the compiled file is reused when its bytes did not change
        try:
            overlay = self.store.load()
        except StoreUnavailable as exc:  # the file's changes still apply, over the last good overlay
            log.warning("%s; composing the file with the last good admin changes", exc)
            overlay = self.overlay
        table = compose(base, overlay)
        self._remember(overlay)
        return base, overlay, table

    async def refresh_store(self) -> None:
        """Serve what the admin store holds now, if it moved on (another gateway of the fleet wrote it)."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            try:
                overlay = await loop.run_in_executor(None, self.store.load)
            except StoreUnavailable:
                return  # the store's health says so; the last good table keeps serving
            if overlay.get("revision") == self.overlay.get("revision"):
                return
            try:
                table = await loop.run_in_executor(None, compose, self.base, overlay)
            except TableInvalid as exc:
                self.last_error = tuple(exc.problems)
                self.metrics.reloads.inc(("failure",))
                log.error("admin store revision %s refused; still serving %s:\n%s",
                          overlay.get("revision"), self.table.digest[:12], exc)  # fmt: skip
                return
            self.last_error = ()
            self.overlay = overlay
            await loop.run_in_executor(None, self._remember, overlay)
            if self._swap(table):
                self.metrics.reloads.inc(("success",))
                log.info("admin store revision %s: serving %s", overlay.get("revision"), table.digest[:12])

    async def apply(self, overlay: dict[str, Any], reason: str) -> Table:
        """Serve the file with a new overlay: validate, persist, then swap (the admin API's changes).

        Raises TableInvalid (nothing changes) or StoreError (not persisted, nothing changes).
        """
        async with self._lock:
            base = self.base
            loop = asyncio.get_running_loop()
            table = await loop.run_in_executor(None, compose, base, overlay)
            await loop.run_in_executor(None, self.store.save, overlay)  # a database store: never block the loop
            self.overlay = overlay
            await loop.run_in_executor(None, self._remember, overlay)
            if self._swap(table):
                log.info("admin change (%s): serving %s", reason, table.digest[:12])
            return table

    def moved_on(self) -> bool:
        """Whether the file or the store changed since this state last read them (a cheap look, no reload)."""
        return self._file_stat() != self._stat or self.store.revision() != self.overlay.get("revision", 0)

    def close(self) -> None:
        """Let go of the store (a database store's connection pool)."""
        close_store(self.store)

    def _remember(self, overlay: dict[str, Any]) -> None:
        """A database store keeps a local copy of what serves (`PostgresAdminStore.remember`); a file is one."""
        remember = getattr(self.store, "remember", None)
        if remember is not None:
            remember(overlay)
        for callback in self.on_overlay:
            callback(overlay)

    def _swap(self, table: Table) -> bool:
        if table.digest == self.table.digest:
            return False
        self.table = table  # the swap: one reference, calls in flight keep their snapshot
        self.generation += 1
        self.loaded_at = time.time()
        for callback in self.on_swap:
            callback(table)
        self._publish()
        return True

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
            "file_digest": self.base.digest,
            "admin_store": str(self.store.path),
            "admin_revision": self.overlay.get("revision", 0),
            "admin_changes_waiting": orphans(self.base, self.overlay) or None,
            "generation": self.generation,
            "source": t.source,
            "loaded_at": self.loaded_at,
            "models": len(t.models),
            "planes": sorted(t.planes),
            "domains": sorted(t.domains),
            "last_reload_error": list(self.last_error) or None,
            **self.store_status(),
        }

    def store_status(self) -> dict[str, Any]:
        """`{"store": {...}}` with a shared store's health (fleet mode), else nothing."""
        health = getattr(self.store, "health", None)
        return {} if health is None else {"store": health.describe()}
