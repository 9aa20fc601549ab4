"""A region's async queue in PostgreSQL (SPEC §10, §13; issue 14): `--queue-store REGION=postgresql://...`.

The same operations and contract as the embedded `RegionStore` (gateway.asyncq.store), for a fleet:
every gateway serving the region takes any queued request of it, and one SIGKILLed mid-request
loses nothing (its claim's lease passes, and another gateway runs the request again, same id).

Writes go through one writer thread and one connection: everything waiting is one transaction
(group commit: one WAL flush for many submits arriving together), its statements pipelined, and
each future is resolved after COMMIT. When a write of the group fails, the transaction is rolled
back and the group run again with each write in a savepoint, so that one bad write fails alone
(one that lost a deadlock to another gateway's transaction is tried again in the next group). Claims are
`SELECT ... FOR UPDATE SKIP LOCKED` inside that transaction: two gateways claiming at once lock
different rows, so a request is never claimed twice; a claim whose lease passed is takeable by
any gateway (owner ids carry host and pid; a gone process of this host is taken at once, as in
the embedded store).

Reads run on a small pool of reader threads with connections of their own: a slow or unreachable
database never stalls the event loop. When the database cannot be reached every operation raises
`StoreUnavailable` (fast, once one failed: for `DOWN_BACKOFF` seconds, doubling, no connection is
tried), the API answers 503, and the scheduler backs off and resumes when it answers again. A
write whose COMMIT was cut by the outage may or may not be durable: a submit that got a 503 may
run (the client did not get its id), an accepted one is never lost.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import psycopg
import psycopg.errors
from psycopg.rows import dict_row

from gateway.asyncq.request import AsyncRequest
from gateway.asyncq.store import (
    _COLUMNS,
    _MUTABLE,
    LEASE_SECONDS,
    MAX_GROUP,
    _claimed,
    _row,
    _settle,
    _takeable,
    _target,
    owner_id,
)
from gateway.asyncq.store import _record as _record_of
from gateway.environments.store import StoreError
from gateway.stores.db import CONNECT_TIMEOUT, StoreUnavailable, connect, one_line, redact
from gateway.stores.migrate import QUEUE, SchemaMismatch, check_schema, migrate_in

log = logging.getLogger("gateway.asyncq.store")

T = TypeVar("T")
WRITE_RETRIES = 5  # a write that lost a lock conflict (deadlock, serialization) is tried again this often
READERS = 2  # reader threads (and connections) per region's database
DOWN_BACKOFF = (0.25, 2.0)  # seconds operations fail fast after the database failed: first, at most
# A connection that goes silent (a partition, not a refusal) is given up within seconds, not minutes.
_CONNECT = {"connect_timeout": CONNECT_TIMEOUT, "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
            "keepalives_count": 2, "tcp_user_timeout": 10_000}  # fmt: skip
_LOST = (psycopg.OperationalError, psycopg.InterfaceError)
_EXPIRED_ERRORS = (
    '[{"code": "MODEL_NOT_READY", "message": "the request waited in the queue past its max_time_in_queue_seconds"}]'
)

Conn = psycopg.Connection[Any]  # rows as dicts (dict_row) once checked
Write = Callable[[Conn], Any]


class QueueRegionMismatch(SchemaMismatch):
    """The database holds another region's queue (or was never tagged with a region)."""


def check_queue_database(conn: psycopg.Connection, shown: str, region: str) -> None:
    """Refuse a database this gateway must not keep `region`'s queue in: unmigrated, newer, another region's."""
    check_schema(conn, shown, QUEUE)
    row = conn.execute("SELECT region FROM queue_region WHERE id = 1").fetchone()
    if row is None:
        raise QueueRegionMismatch(
            f"the queue store {shown} has no region: run `gateway store migrate --queue-store {region}=URL` first"
        )
    if row[0] != region:
        raise QueueRegionMismatch(
            f"the queue store {shown} holds region '{row[0]}''s async queue, not '{region}''s "
            "(one database per region: residency at rest)"
        )


def tag_region(conn: psycopg.Connection, shown: str, region: str) -> None:
    """Record which region's queue the database holds (`gateway store migrate`); refuse a retag."""
    conn.execute("INSERT INTO queue_region (id, region) VALUES (1, %s) ON CONFLICT (id) DO NOTHING", (region,))
    check_queue_database(conn, shown, region)


def migrate_queue(url: str, region: str) -> tuple[int, list[int]]:
    """`migrate(url, QUEUE)`, and the database tagged as `region`'s queue (refused if it holds another's)."""
    try:
        with connect(url) as conn:
            before, applied = migrate_in(conn, QUEUE)
            tag_region(conn, redact(url), region)
            conn.commit()
            return before, applied
    except psycopg.Error as exc:
        raise StoreUnavailable(f"cannot migrate the {QUEUE.what}: {one_line(exc)}") from None


def _record(row: dict) -> AsyncRequest:
    return _record_of(row)  # type: ignore[arg-type]  # a dict row reads like sqlite3.Row by name


class _Health:
    """Whether the database answered last; while it does not, operations fail fast for a while."""

    def __init__(self, shown: str, region: str) -> None:
        self.shown, self.region = shown, region
        self.up = True
        self.retry_at = 0.0
        self.delay = DOWN_BACKOFF[0]
        self.error = ""

    def gate(self) -> None:
        if not self.up and time.monotonic() < self.retry_at:
            raise StoreUnavailable(f"the async queue store of region '{self.region}' is unreachable: {self.error}")

    def ok(self) -> None:
        if not self.up:
            log.info("queue store %s (region %s) answers again", self.shown, self.region)
        self.up, self.delay = True, DOWN_BACKOFF[0]

    def failed(self, exc: BaseException) -> StoreUnavailable:
        if self.up:
            log.warning("queue store %s (region %s) is unreachable: %s", self.shown, self.region, one_line(exc))
        else:
            self.delay = min(self.delay * 2, DOWN_BACKOFF[1])
        self.up, self.error, self.retry_at = False, one_line(exc), time.monotonic() + self.delay
        return StoreUnavailable(f"the async queue store of region '{self.region}' is unreachable: {self.error}")


class PgRegionStore:
    """One region's queue in its own PostgreSQL database. `write(fn)` runs `fn(conn)` in the next group commit."""

    def __init__(self, url: str, region: str) -> None:
        self.url = url
        self.path = redact(url)
        self.region = region
        self.owner = owner_id()
        self.health = _Health(self.path, region)
        self.pending: queue.SimpleQueue = queue.SimpleQueue()
        self.commits = 0  # group commits done (for tests and the benchmark)
        self.readers = ThreadPoolExecutor(READERS, thread_name_prefix=f"queue-read-{region}")
        self.local = threading.local()
        self.reader_conns: list[Conn] = []
        self.thread = threading.Thread(target=self._writer, name=f"queue-store-{region}", daemon=True)
        self.thread.start()

    def __repr__(self) -> str:
        return (
            f"<PgRegionStore {self.region} {self.path} | {self.commits} commits, {'up' if self.health.up else 'down'}>"
        )

    @property
    def where(self) -> str:
        return f"database {self.path}"

    def close(self) -> None:
        self.pending.put(None)
        self.thread.join(timeout=10)
        self.readers.shutdown(wait=True, cancel_futures=True)
        for conn in self.reader_conns:
            conn.close()

    def _connect(self, *, autocommit: bool) -> Conn:
        self.health.gate()
        try:
            conn: Conn = psycopg.connect(self.url, autocommit=autocommit, **_CONNECT)  # type: ignore[arg-type]
        except psycopg.Error as exc:
            raise self.health.failed(exc) from None
        try:
            check_queue_database(conn, self.path, self.region)
            if not autocommit:
                conn.commit()
            conn.row_factory = dict_row  # the store's queries read columns by name
        except SchemaMismatch as exc:
            conn.close()
            raise StoreError(str(exc)) from None
        except psycopg.Error as exc:
            conn.close()
            raise self.health.failed(exc) from None
        return conn

    # -- writes (group commit) ----------------------------------------------------------------

    def write(self, fn: Write) -> asyncio.Future:
        """Run `fn(conn)` in a transaction with whatever else is waiting; the future gets its
        result once that transaction is committed (durable), or its exception."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.pending.put((fn, future, loop, 0))
        return future

    def _writer(self) -> None:
        conn: Conn | None = None
        try:
            while True:
                first = self.pending.get()
                if first is None:
                    return
                group, stop = [first], False
                while len(group) < MAX_GROUP:
                    try:
                        item = self.pending.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stop = True
                        break
                    group.append(item)
                conn = self._commit_group(conn, group)
                if stop:
                    return
        finally:
            if conn is not None:
                conn.close()

    def _commit_group(self, conn: Conn | None, group: list) -> Conn | None:
        """Commit `group` (connecting first if need be); the connection to use next (None: lost)."""
        try:
            if conn is None or conn.closed:
                conn = self._connect(autocommit=False)
            outcomes = self._commit_fast(conn, group)
            if outcomes is None:  # a write failed: the group again, each write in a savepoint
                outcomes = self._commit(conn, group)
            self.health.ok()
        except _LOST as exc:  # nothing of the group is known durable: each writer gets the error
            if conn is not None:
                conn.close()
            conn, outcomes = None, [(False, self.health.failed(exc))] * len(group)
        except StoreError as exc:  # unreachable (fast), or a database this gateway must not use
            conn, outcomes = None, [(False, exc)] * len(group)
        for item, (ok, value) in zip(group, outcomes, strict=True):
            fn, future, loop, tries = item
            if ok is None:  # lost a lock conflict to another gateway's transaction: in the next group
                self.pending.put((fn, future, loop, tries + 1))
            else:
                loop.call_soon_threadsafe(_settle, future, ok, value)
        return conn

    def _commit_fast(self, conn: Conn, group: list) -> list[tuple[bool | None, Any]] | None:
        """The group in one pipelined transaction, no savepoints (measured: 0.1 ms per insert, where a
        savepoint, the insert and its release were 1.9 ms); None when a write failed (rolled back)."""
        try:
            with conn.pipeline():
                values = [fn(conn) for fn, _, _, _ in group]
            conn.commit()
        except Exception:
            if conn.broken or conn.closed:
                raise
            conn.rollback()
            return None
        self.commits += 1
        return [(True, _value(v)) for v in values]

    def _commit(self, conn: Conn, group: list) -> list[tuple[bool | None, Any]]:
        outcomes: list[tuple[bool | None, Any]] = []
        try:
            for i, (fn, _, _, tries) in enumerate(group):
                conn.execute(f"SAVEPOINT w{i}")
                try:
                    outcomes.append((True, _value(fn(conn))))
                    conn.execute(f"RELEASE w{i}")
                except Exception as exc:  # one bad write fails alone (unless the connection went)
                    if conn.broken or conn.closed:
                        raise
                    conn.execute(f"ROLLBACK TO w{i}")
                    conn.execute(f"RELEASE w{i}")
                    if isinstance(exc, psycopg.errors.TransactionRollback) and tries < WRITE_RETRIES:
                        outcomes.append((None, exc))  # a deadlock or serialization failure: try again
                    elif isinstance(exc, psycopg.Error):
                        outcomes.append((False, StoreError(f"the queue store refused: {one_line(exc)}")))
                    else:
                        outcomes.append((False, exc))
            conn.commit()
        except psycopg.Error as exc:
            if conn.broken or conn.closed:
                raise
            try:  # the transaction itself failed (not the connection): roll it back
                conn.rollback()
            except psycopg.Error:
                raise exc from None
            return [(False, StoreError(f"the queue store refused the commit: {one_line(exc)}"))] * len(group)
        self.commits += 1
        return outcomes

    # -- the operations -----------------------------------------------------------------------

    def insert(self, req: AsyncRequest) -> asyncio.Future:
        row = _row(req)
        sql = f"INSERT INTO async_requests ({','.join(_COLUMNS)}) VALUES ({','.join(['%s'] * len(_COLUMNS))})"

        return self.write(lambda conn: _rowcount(conn.execute(sql, row)))  # 1 (no RETURNING: it stays pipelined)

    def save(self, req: AsyncRequest, *, release: bool = False) -> asyncio.Future:
        """Write `req`'s mutable fields; `release` drops this process's claim on it."""
        values = [getattr(req, name) for name in _MUTABLE]
        values[_MUTABLE.index("errors")] = _row(req)[_COLUMNS.index("errors")]
        sets = ",".join(f"{name}=%s" for name in _MUTABLE)
        if release:
            sets += ",owner=NULL,lease_until=NULL"
        sql = f"UPDATE async_requests SET {sets} WHERE request_id=%s"
        return self.write(lambda conn: _rowcount(conn.execute(sql, (*values, req.request_id))))

    def claim_runs(self, model_id: str, environment: str, deployment_id: str, limit: int, now: float) -> asyncio.Future:
        """Up to `limit` runnable requests of one target, by priority then FIFO, claimed for this
        process (IN_PROGRESS, attempts + 1). Queued ones past their deadline end EXPIRED first."""
        owner, until = self.owner, now + LEASE_SECONDS
        target, args = _target(model_id, environment, deployment_id, "%s")
        here = owner.partition(":")[0] + ":%"

        def claim(conn: Conn) -> list[AsyncRequest]:
            conn.execute(
                f"UPDATE async_requests SET status='EXPIRED', status_at=%s, completed_at=%s, next_at=%s, errors=%s"
                f" WHERE seq IN (SELECT seq FROM async_requests WHERE status='QUEUED' AND attempts=0 AND {target}"
                f" AND created_at + max_time_in_queue_seconds < %s FOR UPDATE SKIP LOCKED)",
                (now, now, now, _EXPIRED_ERRORS, *args, now),
            )
            # Requests a gone process was running come first (they were started), then the queue.
            # Rows another claimer holds locked are skipped, never waited for, never taken twice.
            # Only the rows to take are locked: a lock on another live gateway's running request would
            # make its renewals wait on this transaction, and two groups could wait on each other.
            running = conn.execute(
                f"SELECT seq, owner, lease_until FROM async_requests WHERE {target} AND status='IN_PROGRESS'"
                f" AND owner IS DISTINCT FROM %s AND (owner IS NULL OR coalesce(lease_until, 0) < %s OR owner LIKE %s)"
                f" ORDER BY priority, seq",
                (*args, owner, now, here),
            ).fetchall()
            stale = [r["seq"] for r in running if _takeable(r, owner, now)]
            rows = []
            if stale:
                locked = conn.execute(
                    "SELECT * FROM async_requests WHERE seq = ANY(%s) AND status='IN_PROGRESS'"
                    " ORDER BY priority, seq FOR UPDATE SKIP LOCKED",
                    (stale,),
                ).fetchall()  # as they are now (renewed meanwhile? then not taken)
                rows = [r for r in locked if _takeable(r, owner, now)][:limit]
            if len(rows) < limit:
                rows += conn.execute(
                    f"SELECT * FROM async_requests WHERE {target} AND status='QUEUED' AND next_at<=%s"
                    f" ORDER BY priority, seq LIMIT %s FOR UPDATE SKIP LOCKED",
                    (*args, now, limit - len(rows)),
                ).fetchall()
            if not rows:
                return []
            conn.execute(
                "UPDATE async_requests SET status='IN_PROGRESS', status_at=%s, attempts=attempts+1, owner=%s,"
                " lease_until=%s WHERE seq = ANY(%s)",
                (now, owner, until, [r["seq"] for r in rows]),
            )
            return [_claimed(_record(row), now) for row in rows]

        return self.write(claim)

    def claim_webhooks(self, limit: int, now: float) -> asyncio.Future:
        """Requests whose run ended and whose webhook is due, claimed for this process."""
        owner, until = self.owner, now + LEASE_SECONDS
        here = owner.partition(":")[0] + ":%"

        def claim(conn: Conn) -> list[AsyncRequest]:
            due = conn.execute(
                "SELECT seq, owner, lease_until FROM async_requests WHERE webhook_status='PENDING' AND next_at<=%s"
                " AND status IN ('SUCCEEDED','FAILED','EXPIRED')"
                " AND (owner IS NULL OR coalesce(lease_until, 0) < %s OR (owner LIKE %s AND owner != %s))"
                " ORDER BY next_at LIMIT %s",
                (now, now, here, owner, limit * 4 + 8),
            ).fetchall()
            free = [r["seq"] for r in due if _takeable(r, owner, now)]
            taken = []
            if free:
                locked = conn.execute(
                    "SELECT * FROM async_requests WHERE seq = ANY(%s) AND webhook_status='PENDING'"
                    " ORDER BY next_at FOR UPDATE SKIP LOCKED",
                    (free,),
                ).fetchall()
                taken = [r for r in locked if _takeable(r, owner, now)][:limit]
            if taken:
                conn.execute("UPDATE async_requests SET owner=%s, lease_until=%s WHERE seq = ANY(%s)",
                             (owner, until, [r["seq"] for r in taken]))  # fmt: skip
            return [_record(r) for r in taken]

        return self.write(claim)

    def renew(self, request_ids: Iterable[str], now: float) -> asyncio.Future:
        ids = sorted(request_ids)  # one order for every gateway: no lock cycles between renewals
        owner, until = self.owner, now + LEASE_SECONDS
        return self.write(
            lambda conn: _rowcount(
                conn.execute(
                    "UPDATE async_requests SET lease_until=%s WHERE request_id = ANY(%s) AND owner=%s",
                    (until, ids, owner),
                )
            )
        )

    def cancel(self, request_id: str, now: float) -> asyncio.Future:
        """QUEUED -> CANCELED (its webhook is not sent); the status it had, or None if unknown."""

        def cancel(conn: Conn) -> str | None:
            done = conn.execute(
                "UPDATE async_requests SET status='CANCELED', status_at=%s, completed_at=%s, webhook_status="
                " CASE webhook_status WHEN 'NO_WEBHOOK_PROVIDED' THEN 'NO_WEBHOOK_PROVIDED' ELSE 'CANCELED' END"
                " WHERE request_id=%s AND status='QUEUED' RETURNING seq",
                (now, now, request_id),
            ).fetchone()
            if done is not None:
                return "QUEUED"
            row = conn.execute("SELECT status FROM async_requests WHERE request_id=%s", (request_id,)).fetchone()
            return None if row is None else str(row["status"])

        return self.write(cancel)

    def purge(self, before: float) -> asyncio.Future:
        """Delete requests that ended (and whose webhook is settled) before `before`: their results go too."""
        return self.write(
            lambda conn: _rowcount(
                conn.execute(
                    "DELETE FROM async_requests WHERE completed_at IS NOT NULL AND completed_at<%s"
                    " AND webhook_status!='PENDING'",
                    (before,),
                )
            )
        )

    # -- reads (reader threads: the event loop never waits on the network) ----------------------

    async def _read(self, work: Callable[[Conn], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.readers, self._read_here, work)

    def _read_here(self, work: Callable[[Conn], T]) -> T:
        conn = getattr(self.local, "conn", None)
        if conn is None or conn.closed:
            conn = self.local.conn = self._connect(autocommit=True)
            self.reader_conns.append(conn)
        try:
            result = work(conn)
        except _LOST as exc:
            conn.close()
            raise self.health.failed(exc) from None
        except psycopg.Error as exc:
            raise StoreError(f"the queue store refused a read: {one_line(exc)}") from None
        self.health.ok()
        return result

    async def get(self, request_id: str) -> AsyncRequest | None:
        row = await self._read(
            lambda c: c.execute("SELECT * FROM async_requests WHERE request_id=%s", (request_id,)).fetchone()
        )
        return None if row is None else _record(row)

    async def targets(self, now: float) -> list[tuple[str, str, str]]:
        """(model, environment, deployment) of every target with queued work or a request another
        process was running and may no longer be (lease passed, or its owner gone)."""
        key = "model_id, environment, CASE environment WHEN '' THEN deployment_id ELSE '' END AS dep"
        owner = self.owner

        def read(c: Conn) -> tuple[list, list]:
            queued = c.execute(f"SELECT DISTINCT {key} FROM async_requests WHERE status='QUEUED'").fetchall()
            running = c.execute(
                f"SELECT DISTINCT {key}, owner, lease_until FROM async_requests WHERE status='IN_PROGRESS' AND owner!=%s",
                (owner,),
            ).fetchall()
            return queued, running

        queued, running = await self._read(read)
        found = {(r["model_id"], r["environment"], r["dep"]) for r in queued}
        for r in running:
            if _takeable(r, owner, now):
                found.add((r["model_id"], r["environment"], r["dep"]))
        return sorted(found)

    async def webhooks_due(self, now: float) -> bool:
        row = await self._read(
            lambda c: c.execute(
                "SELECT 1 FROM async_requests WHERE webhook_status='PENDING' AND next_at<=%s"
                " AND status IN ('SUCCEEDED','FAILED','EXPIRED') LIMIT 1",
                (now,),
            ).fetchone()
        )
        return row is not None

    async def team_open(self, team: str) -> int:
        """Queued + in-progress requests of `team`."""
        row = await self._read(
            lambda c: c.execute(
                "SELECT COUNT(*) AS n FROM async_requests WHERE team=%s AND status IN ('QUEUED','IN_PROGRESS')", (team,)
            ).fetchone()
        )
        return int(row["n"]) if row else 0

    async def queue_counts(self, model_id: str, environment: str, deployment_id: str) -> tuple[int, int]:
        """(queued, in progress) of one target."""
        target, args = _target(model_id, environment, deployment_id, "%s")
        rows = await self._read(
            lambda c: c.execute(
                f"SELECT status, COUNT(*) AS n FROM async_requests WHERE {target}"
                " AND status IN ('QUEUED','IN_PROGRESS') GROUP BY status",
                args,
            ).fetchall()
        )
        counts = {r["status"]: r["n"] for r in rows}
        return counts.get("QUEUED", 0), counts.get("IN_PROGRESS", 0)

    async def depth(self) -> list[tuple[str, str, str, int, int]]:
        """(model, environment, deployment, priority, queued) for the depth gauge and the admin read."""
        rows = await self._read(
            lambda c: c.execute(
                "SELECT model_id, environment, deployment_id, priority, COUNT(*) AS n FROM async_requests"
                " WHERE status='QUEUED' GROUP BY model_id, environment, deployment_id, priority"
            ).fetchall()
        )
        return [(r["model_id"], r["environment"], r["deployment_id"], r["priority"], r["n"]) for r in rows]

    async def in_progress(self) -> list[tuple[str, str, str, int]]:
        rows = await self._read(
            lambda c: c.execute(
                "SELECT model_id, environment, deployment_id, COUNT(*) AS n FROM async_requests"
                " WHERE status='IN_PROGRESS' GROUP BY model_id, environment, deployment_id"
            ).fetchall()
        )
        return [(r["model_id"], r["environment"], r["deployment_id"], r["n"]) for r in rows]


class _Later:
    """A write's result read once the group's statements ran (a rowcount is known only then when pipelined)."""

    __slots__ = ("cursor",)

    def __init__(self, cursor: psycopg.Cursor) -> None:
        self.cursor = cursor


def _rowcount(cursor: psycopg.Cursor) -> _Later:
    return _Later(cursor)


def _value(value: Any) -> Any:
    return value.cursor.rowcount if isinstance(value, _Later) else value
