"""Change propagation in a fleet (SPEC §13): every gateway serves another's admin change within a second.

A dedicated connection in a background thread LISTENs on `gateway_admin` (the store NOTIFYs it
on every write) and polls the stored revision every `POLL_SECONDS` as a fallback, which also
finds a connection that died silently. Either way it only tells the event loop that the store
moved on; the loop re-reads, composes and swaps (`TableState.refresh_store`). Nothing here is on
the hot path. A lost connection is retried with back-off, and after each reconnect the store is
read again (a NOTIFY sent while it was away is lost).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

import psycopg

from gateway.state import TableState
from gateway.stores.db import CHANNEL, StoreUnavailable, connect, one_line
from gateway.stores.postgres import PostgresAdminStore

log = logging.getLogger("gateway.store")

POLL_SECONDS = 2.0
BACKOFF_SECONDS = (0.25, 5.0)  # first and longest wait between reconnects


class StoreListener:
    """The background thread; `changed()` is called (in that thread) whenever the store may have moved on."""

    def __init__(self, store: PostgresAdminStore, revision: Callable[[], int], changed: Callable[[], object]) -> None:
        self.store = store
        self.revision = revision
        self.changed = changed
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="gateway-store-listener", daemon=True)

    def __repr__(self) -> str:
        return f"<StoreListener {self.store.path} {'stopping' if self.stopping.is_set() else 'running'}>"

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()  # seen within POLL_SECONDS; the thread is a daemon

    def _run(self) -> None:
        delay = BACKOFF_SECONDS[0]
        while not self.stopping.is_set():
            try:
                with connect(self.store.url, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    delay = BACKOFF_SECONDS[0]
                    self._listen(conn)
            except (StoreUnavailable, psycopg.Error) as exc:
                self.store.health.failed(one_line(exc))
                self.stopping.wait(delay)
                delay = min(delay * 2, BACKOFF_SECONDS[1])

    def _listen(self, conn: psycopg.Connection) -> None:
        self._poll(conn)  # whatever was written while this connection was away
        while not self.stopping.is_set():
            notified = False
            for _ in conn.notifies(timeout=POLL_SECONDS, stop_after=1):
                notified = True
            if notified:
                self.changed()
            else:
                self._poll(conn)

    def _poll(self, conn: psycopg.Connection) -> None:
        row = conn.execute("SELECT revision FROM admin_overlay WHERE id = 1").fetchone()
        self.store.health.ok()
        if row is not None and int(row[0]) != self.revision():
            self.changed()


async def follow_store(state: TableState) -> None:
    """Keep `state` serving what its database store holds (runs until cancelled)."""
    store = state.store
    if not isinstance(store, PostgresAdminStore):
        return
    loop = asyncio.get_running_loop()
    moved = asyncio.Event()

    def changed() -> None:
        try:
            loop.call_soon_threadsafe(moved.set)
        except RuntimeError:  # the loop closed: the gateway is gone
            listener.stop()

    listener = StoreListener(store, lambda: int(state.overlay.get("revision", 0)), changed)
    listener.start()
    try:
        while True:
            await moved.wait()
            moved.clear()
            await state.refresh_store()
    finally:
        listener.stop()
