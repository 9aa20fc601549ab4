"""`PostgresAdminStore`: the admin store in PostgreSQL, shared by a fleet of gateways (SPEC §13).

The overlay is one JSONB row (`admin_overlay`); `save` is a compare-and-swap on its revision in
one transaction, which also NOTIFYs `gateway_admin` so that every gateway re-reads it at once
(`gateway.stores.sync`). The store never sits on the hot path: calls are routed on the composed
table in memory; the database is read by the sync thread, admin writes, reloads and promotions.

When the database cannot be reached, `load` and `save` raise `StoreUnavailable` (the gateway keeps
its last good table) and `health` says so. Every overlay the gateway served is also copied to a
local cache file next to the table (`remember`), from which a gateway that starts while the
database is down serves.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from gateway.environments.overlay import empty_overlay
from gateway.environments.store import JsonFileStore, StoreConflict, StoreError
from gateway.metrics import Metrics
from gateway.routing.loader import TableInvalid
from gateway.stores.db import CHANNEL, CONNECT_TIMEOUT, StoreUnavailable, one_line, redact
from gateway.stores.migrate import SchemaMismatch, check_schema

log = logging.getLogger("gateway.store")

POOL_WAIT = 2.0  # seconds an admin write or reload waits for a connection before it fails
T = TypeVar("T")


class StoreHealth:
    """Whether the database answers, when it last did, and what the gateway serves from."""

    def __init__(self, metrics: Metrics | None) -> None:
        self.metrics = metrics
        self.up: bool | None = None  # None: not tried yet
        self.last_sync: float | None = None
        self.last_error: str | None = None
        self.serving_from = "database"

    def __repr__(self) -> str:
        return f"<StoreHealth {self.state} from {self.serving_from}>"

    @property
    def state(self) -> str:
        return {None: "connecting", True: "ok", False: "unreachable"}[self.up]

    def ok(self) -> None:
        if self.up is False:
            log.info("the store answers again")
        self.up, self.last_sync, self.serving_from = True, time.time(), "database"
        if self.metrics is not None:
            self.metrics.store_up.set((), 1)

    def failed(self, error: str) -> None:
        if self.up is not False:
            log.warning("the store is unreachable (%s); serving the last good table", error)
        self.up, self.last_error = False, error
        if self.metrics is not None:
            self.metrics.store_up.set((), 0)
            self.metrics.store_errors.inc(())

    def describe(self) -> dict[str, Any]:
        return {"state": self.state, "serving_from": self.serving_from, "last_sync": self.last_sync,
                "last_error": self.last_error}  # fmt: skip


class PostgresAdminStore:
    """An `AdminStore` in PostgreSQL. `path` is the URL without its password (what `/v1/routing` shows)."""

    def __init__(self, url: str, cache: str, metrics: Metrics | None = None) -> None:
        self.url = url
        self.path = redact(url)
        self.cache = JsonFileStore(cache)
        self.health = StoreHealth(metrics)
        self._pool: ConnectionPool | None = None
        self._pool_lock = threading.Lock()
        self._schema_checked = False
        self._remembered: int | None = None

    def __repr__(self) -> str:
        return f"<PostgresAdminStore {self.path} {self.health.state}>"

    def _connections(self) -> ConnectionPool:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ConnectionPool(
                    self.url, min_size=1, max_size=4, timeout=POOL_WAIT, name="gateway-store", open=True,
                    kwargs={"connect_timeout": CONNECT_TIMEOUT}, check=ConnectionPool.check_connection,
                )  # fmt: skip
            return self._pool

    def run(self, work: Callable[[psycopg.Connection], T]) -> T:
        """`work` in one transaction (committed when it returns). Raises StoreUnavailable or StoreError."""
        try:
            try:
                with self._connections().connection() as conn:
                    result = self._checked(work, conn)
            except (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout):
                # After the database came back, the pool may still be backing off between reconnects
                # (seconds): go directly, and start a fresh pool when that works. Safe for writes too:
                # a save is a compare-and-swap, so a retry of one that did commit is refused, not doubled.
                with psycopg.connect(self.url, connect_timeout=CONNECT_TIMEOUT) as conn:
                    result = self._checked(work, conn)
                self._reset_pool()
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            error = one_line(exc)
            self.health.failed(error)
            raise StoreUnavailable(f"the store {self.path} is unreachable: {error}") from None
        except SchemaMismatch as exc:
            raise StoreError(str(exc)) from None
        except psycopg.Error as exc:
            raise StoreError(f"the store {self.path} refused: {one_line(exc)}") from None
        self.health.ok()
        return result

    def _checked(self, work: Callable[[psycopg.Connection], T], conn: psycopg.Connection) -> T:
        if not self._schema_checked:
            check_schema(conn, self.path)
            self._schema_checked = True
        return work(conn)

    def _reset_pool(self) -> None:
        with self._pool_lock:
            stale, self._pool = self._pool, None
        if stale is not None:
            threading.Thread(target=stale.close, name="gateway-store-pool-close", daemon=True).start()

    def check(self) -> None:
        """Connect and check the schema now. Raises SchemaMismatch, or StoreUnavailable."""
        try:
            with psycopg.connect(self.url, connect_timeout=CONNECT_TIMEOUT) as conn:
                check_schema(conn, self.path)
        except psycopg.Error as exc:
            self.health.failed(one_line(exc))
            raise StoreUnavailable(f"cannot reach the store {self.path}: {one_line(exc)}") from None

    def load(self) -> dict[str, Any]:
        row = self.run(lambda conn: conn.execute("SELECT revision, models FROM admin_overlay WHERE id = 1").fetchone())
        if row is None:
            return empty_overlay()
        return {"revision": int(row[0]), "models": row[1]}

    def revision(self) -> int:
        return int(self.load()["revision"])

    def save(self, overlay: dict[str, Any], based_on: int | None = None) -> None:
        expected = int(overlay["revision"]) - 1 if based_on is None else based_on

        def write(conn: psycopg.Connection) -> None:
            updated = conn.execute(
                "UPDATE admin_overlay SET revision = %s, models = %s, updated_at = now() WHERE id = 1 AND revision = %s",
                (overlay["revision"], Jsonb(overlay["models"]), expected),
            )
            if updated.rowcount != 1:
                row = conn.execute("SELECT revision FROM admin_overlay WHERE id = 1").fetchone()
                raise StoreConflict(expected, int(row[0]) if row else 0)
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(overlay["revision"])))  # sent at commit

        self.run(write)

    def remember(self, overlay: dict[str, Any]) -> None:
        """Keep a local copy of an overlay this gateway serves (for a start while the database is down)."""
        if overlay.get("revision") == self._remembered:
            return
        try:
            self.cache.write(overlay)
            self._remembered = overlay.get("revision")
        except StoreError as exc:
            log.warning("cannot write the local store cache: %s", exc)

    def cached(self) -> dict[str, Any]:
        """The overlay of the local cache; TableInvalid when there is none (never served from the database)."""
        if not self.cache.path.exists():
            raise TableInvalid([
                f"the store {self.path} is unreachable ({self.health.last_error}) and there is no local "
                f"cache ({self.cache.path}) yet: start the gateway once while the database is up"
            ])  # fmt: skip
        overlay = self.cache.load()
        self.health.serving_from = "local cache"
        self._remembered = overlay.get("revision")
        log.warning("the store is unreachable: serving revision %s from the local cache %s",
                    overlay.get("revision"), self.cache.path)  # fmt: skip
        return overlay

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None
