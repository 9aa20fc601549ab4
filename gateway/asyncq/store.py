"""The embedded async queue store (SPEC §10): one SQLite file per region, WAL mode, group commit.

The store is the only state of the queue: a request is written (and fsync'd: WAL with
`synchronous=FULL`) before its 201, and every transition after it (claimed, retried, ended,
webhook delivered) is written before the gateway acts on it. A gateway SIGKILLed at any moment
and restarted finds every accepted request: a QUEUED one runs, an IN_PROGRESS one whose owner is
gone is claimed again and retried with the same request id.

Writes go through one writer thread per file, which commits everything waiting as one
transaction (group commit: one fsync for many submits arriving together) and resolves each
writer's future after the commit. Reads use their own connection on the event loop (WAL readers
never wait for the writer). Several worker processes may share a file: SQLite's lock serialises
their commits, and a claim is one UPDATE, so a request is never claimed twice.

Ownership: a claimed request carries `owner` ("<host>:<pid>:<start>") and `lease_until`. The owner
renews its leases while it runs them; another process may take a request over once its lease
passed, or at once when its owner is a process of this host that is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from gateway.asyncq.request import AsyncRequest, Retry

log = logging.getLogger("gateway.asyncq.store")

SCHEMA_VERSION = 1
LEASE_SECONDS = 30.0
MAX_GROUP = 512  # writes committed together at most

_COLUMNS = (
    "request_id", "team", "region", "model_id", "kind", "environment", "deployment_id", "caller", "priority",
    "max_time_in_queue_seconds", "retry", "webhook_endpoint", "body", "created_at", "status", "webhook_status",
    "status_at", "attempts", "next_at", "errors", "result", "webhook_attempts", "completed_at",
)  # fmt: skip
_MUTABLE = ("deployment_id", "status", "webhook_status", "status_at", "attempts", "next_at", "errors", "result",
            "webhook_attempts", "completed_at")  # fmt: skip

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL UNIQUE,
    team TEXT NOT NULL, region TEXT NOT NULL, model_id TEXT NOT NULL, kind TEXT NOT NULL,
    environment TEXT NOT NULL, deployment_id TEXT NOT NULL, caller TEXT NOT NULL,
    priority INTEGER NOT NULL, max_time_in_queue_seconds INTEGER NOT NULL, retry TEXT NOT NULL,
    webhook_endpoint TEXT, body BLOB NOT NULL, created_at REAL NOT NULL,
    status TEXT NOT NULL, webhook_status TEXT NOT NULL, status_at REAL NOT NULL,
    attempts INTEGER NOT NULL, next_at REAL NOT NULL, errors TEXT NOT NULL, result BLOB,
    webhook_attempts INTEGER NOT NULL, completed_at REAL,
    owner TEXT, lease_until REAL
);
CREATE INDEX IF NOT EXISTS requests_queue ON requests (status, model_id, environment, priority, seq);
CREATE INDEX IF NOT EXISTS requests_team ON requests (team, status);
CREATE INDEX IF NOT EXISTS requests_due ON requests (webhook_status, next_at);
INSERT OR IGNORE INTO meta VALUES ('schema_version', '{SCHEMA_VERSION}');
"""


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{int(time.time() * 1000)}"


def _owner_gone(owner: str | None, me: str) -> bool:
    """A claim whose owner is a process of this host that no longer runs (its lease need not pass):
    another pid that is not alive, or this pid in an earlier life (a restarted container's pid 1)."""
    if not owner:
        return True
    if owner == me:
        return False
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _row(req: AsyncRequest) -> tuple:
    return (
        req.request_id, req.team, req.region, req.model_id, req.kind, req.environment, req.deployment_id,
        req.caller, req.priority, req.max_time_in_queue_seconds, json.dumps(list(req.retry)), req.webhook_endpoint,
        req.body, req.created_at, req.status, req.webhook_status, req.status_at, req.attempts, req.next_at,
        json.dumps(req.errors), req.result, req.webhook_attempts, req.completed_at,
    )  # fmt: skip


def _record(row: sqlite3.Row) -> AsyncRequest:
    return AsyncRequest(
        request_id=row["request_id"], team=row["team"], region=row["region"], model_id=row["model_id"],
        kind=row["kind"], environment=row["environment"], deployment_id=row["deployment_id"],
        caller=row["caller"], priority=row["priority"], max_time_in_queue_seconds=row["max_time_in_queue_seconds"],
        retry=Retry(*json.loads(row["retry"])), webhook_endpoint=row["webhook_endpoint"], body=bytes(row["body"]),
        created_at=row["created_at"], status=row["status"], webhook_status=row["webhook_status"],
        status_at=row["status_at"], attempts=row["attempts"], next_at=row["next_at"],
        errors=json.loads(row["errors"]), result=None if row["result"] is None else bytes(row["result"]),
        webhook_attempts=row["webhook_attempts"], completed_at=row["completed_at"], seq=row["seq"],
    )  # fmt: skip


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # in WAL mode: the WAL is fsync'd at every commit
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


Write = Callable[[sqlite3.Connection], Any]


class RegionStore:
    """One region's queue file. `write(fn)` runs `fn(conn)` in the next group commit."""

    def __init__(self, path: Path, region: str) -> None:
        self.path = path
        self.region = region
        path.parent.mkdir(parents=True, exist_ok=True)
        self.reader = _connect(path)
        self.reader.executescript(_SCHEMA)
        version = int(self.reader.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{path}: queue store schema {version} is newer than this gateway's {SCHEMA_VERSION}")
        self.owner = owner_id()
        self.pending: queue.SimpleQueue = queue.SimpleQueue()
        self.commits = 0  # group commits done (for tests and the benchmark)
        self.thread = threading.Thread(target=self._writer, name=f"queue-store-{region}", daemon=True)
        self.thread.start()

    def __repr__(self) -> str:
        return f"<RegionStore {self.region} {self.path} | {self.commits} commits>"

    @property
    def where(self) -> str:
        """Where this region's queue lives (the admin queue report, the start's log line)."""
        return f"embedded file {self.path}"

    def close(self) -> None:
        self.pending.put(None)
        self.thread.join(timeout=10)
        self.reader.close()

    # -- writes (group commit) ----------------------------------------------------------------

    def write(self, fn: Write) -> asyncio.Future:
        """Run `fn(conn)` in a transaction with whatever else is waiting; the future gets its
        result once that transaction is committed (durable), or its exception."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.pending.put((fn, future, loop))
        return future

    def _writer(self) -> None:
        conn = _connect(self.path)
        try:
            while True:
                first = self.pending.get()
                if first is None:
                    return
                group = [first]
                stop = False
                while len(group) < MAX_GROUP:
                    try:
                        item = self.pending.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stop = True
                        break
                    group.append(item)
                self._commit(conn, group)
                if stop:
                    return
        finally:
            conn.close()

    def _commit(self, conn: sqlite3.Connection, group: list) -> None:
        outcomes: list[tuple[bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for i, (fn, _, _) in enumerate(group):
                conn.execute(f"SAVEPOINT w{i}")
                try:
                    outcomes.append((True, fn(conn)))
                    conn.execute(f"RELEASE w{i}")
                except Exception as exc:  # one bad write fails alone
                    conn.execute(f"ROLLBACK TO w{i}")
                    conn.execute(f"RELEASE w{i}")
                    outcomes.append((False, exc))
            conn.execute("COMMIT")
            self.commits += 1
        except Exception as exc:  # the commit itself failed: nothing of the group is durable
            log.error("queue store %s: commit failed: %s", self.path, exc)
            with contextlib.suppress(Exception):
                conn.execute("ROLLBACK")
            outcomes = [(False, exc)] * len(group)
        for (_, future, loop), (ok, value) in zip(group, outcomes, strict=True):
            loop.call_soon_threadsafe(_settle, future, ok, value)

    # -- the operations -----------------------------------------------------------------------

    def insert(self, req: AsyncRequest) -> asyncio.Future:
        row = _row(req)
        marks = ",".join("?" * len(_COLUMNS))
        sql = f"INSERT INTO requests ({','.join(_COLUMNS)}) VALUES ({marks})"
        return self.write(lambda conn: conn.execute(sql, row).lastrowid)

    def save(self, req: AsyncRequest, *, release: bool = False) -> asyncio.Future:
        """Write `req`'s mutable fields; `release` drops this process's claim on it."""
        values = [getattr(req, name) for name in _MUTABLE]
        values[_MUTABLE.index("errors")] = json.dumps(req.errors)
        sets = ",".join(f"{name}=?" for name in _MUTABLE)
        if release:
            sets += ",owner=NULL,lease_until=NULL"
        sql = f"UPDATE requests SET {sets} WHERE request_id=?"
        return self.write(lambda conn: conn.execute(sql, (*values, req.request_id)).rowcount)

    def claim_runs(self, model_id: str, environment: str, deployment_id: str, limit: int, now: float) -> asyncio.Future:
        """Up to `limit` runnable requests of one target, by priority then FIFO, claimed for this
        process (IN_PROGRESS, attempts + 1). Queued ones past their deadline end EXPIRED first."""
        owner, until = self.owner, now + LEASE_SECONDS

        def claim(conn: sqlite3.Connection) -> list[AsyncRequest]:
            target, args = _target(model_id, environment, deployment_id)
            conn.execute(
                f"UPDATE requests SET status='EXPIRED', status_at=?, completed_at=?, next_at=?,"
                f" errors=json_array(json_object('code','MODEL_NOT_READY','message',"
                f"'the request waited in the queue past its max_time_in_queue_seconds'))"
                f" WHERE status='QUEUED' AND attempts=0 AND {target} AND created_at + max_time_in_queue_seconds < ?",
                (now, now, now, *args, now),
            )
            # Requests a gone process was running come first (they were started), then the queue.
            running = conn.execute(
                f"SELECT * FROM requests WHERE {target} AND status='IN_PROGRESS' AND (owner IS NULL OR owner!=?)"
                f" ORDER BY priority, seq",
                (*args, owner),
            ).fetchall()
            rows = [r for r in running if _takeable(r, owner, now)][:limit]
            if len(rows) < limit:
                rows += conn.execute(
                    f"SELECT * FROM requests WHERE {target} AND status='QUEUED' AND next_at<=?"
                    f" ORDER BY priority, seq LIMIT ?",
                    (*args, now, limit - len(rows)),
                ).fetchall()
            out = []
            for row in rows:
                conn.execute(
                    "UPDATE requests SET status='IN_PROGRESS', status_at=?, attempts=attempts+1, owner=?, lease_until=?"
                    " WHERE seq=?",
                    (now, owner, until, row["seq"]),
                )
                out.append(_claimed(_record(row), now))
            return out

        return self.write(claim)

    def claim_webhooks(self, limit: int, now: float) -> asyncio.Future:
        """Requests whose run ended and whose webhook is due, claimed for this process."""
        owner, until = self.owner, now + LEASE_SECONDS

        def claim(conn: sqlite3.Connection) -> list[AsyncRequest]:
            rows = conn.execute(
                "SELECT * FROM requests WHERE webhook_status='PENDING' AND next_at<=?"
                " AND status IN ('SUCCEEDED','FAILED','EXPIRED') ORDER BY next_at LIMIT ?",
                (now, limit * 4 + 8),
            ).fetchall()
            out: list[AsyncRequest] = []
            for row in rows:
                if not _takeable(row, owner, now):  # being delivered (by this process too: it releases its claim)
                    continue
                if len(out) == limit:
                    break
                conn.execute("UPDATE requests SET owner=?, lease_until=? WHERE seq=?", (owner, until, row["seq"]))
                out.append(_record(row))
            return out

        return self.write(claim)

    def renew(self, request_ids: Iterable[str], now: float) -> asyncio.Future:
        ids = list(request_ids)
        owner, until = self.owner, now + LEASE_SECONDS

        def renew(conn: sqlite3.Connection) -> int:
            return conn.executemany(
                "UPDATE requests SET lease_until=? WHERE request_id=? AND owner=?", [(until, i, owner) for i in ids]
            ).rowcount

        return self.write(renew)

    def cancel(self, request_id: str, now: float) -> asyncio.Future:
        """QUEUED -> CANCELED (its webhook is not sent); the status it had, or None if unknown."""

        def cancel(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT status, webhook_status FROM requests WHERE request_id=?", (request_id,)
            ).fetchone()
            if row is None:
                return None
            if row["status"] == "QUEUED":
                webhook = "NO_WEBHOOK_PROVIDED" if row["webhook_status"] == "NO_WEBHOOK_PROVIDED" else "CANCELED"
                conn.execute(
                    "UPDATE requests SET status='CANCELED', webhook_status=?, status_at=?, completed_at=?"
                    " WHERE request_id=? AND status='QUEUED'",
                    (webhook, now, now, request_id),
                )
            return str(row["status"])

        return self.write(cancel)

    def purge(self, before: float) -> asyncio.Future:
        """Delete requests that ended (and whose webhook is settled) before `before`: their results go too."""
        return self.write(
            lambda conn: (
                conn.execute(
                    "DELETE FROM requests WHERE completed_at IS NOT NULL AND completed_at<? AND webhook_status!='PENDING'",
                    (before,),
                ).rowcount
            )
        )

    # -- reads (the loop's own connection: a local file, cheap; awaitable like the database's) --

    async def get(self, request_id: str) -> AsyncRequest | None:
        row = self.reader.execute("SELECT * FROM requests WHERE request_id=?", (request_id,)).fetchone()
        return None if row is None else _record(row)

    async def targets(self, now: float) -> list[tuple[str, str, str]]:
        """(model, environment, deployment) of every target with queued work or a request another
        process was running and may no longer be (lease passed, or its owner gone)."""
        key = "model_id, environment, CASE environment WHEN '' THEN deployment_id ELSE '' END"
        found = {
            (r[0], r[1], r[2])
            for r in self.reader.execute(f"SELECT DISTINCT {key} FROM requests WHERE status='QUEUED'").fetchall()
        }
        running = self.reader.execute(
            f"SELECT DISTINCT {key}, owner, lease_until FROM requests WHERE status='IN_PROGRESS' AND owner!=?",
            (self.owner,),
        ).fetchall()
        for r in running:
            if (r[4] or 0) < now or _owner_gone(r[3], self.owner):
                found.add((r[0], r[1], r[2]))
        return sorted(found)

    async def webhooks_due(self, now: float) -> bool:
        row = self.reader.execute(
            "SELECT 1 FROM requests WHERE webhook_status='PENDING' AND next_at<=?"
            " AND status IN ('SUCCEEDED','FAILED','EXPIRED') LIMIT 1",
            (now,),
        ).fetchone()
        return row is not None

    async def team_open(self, team: str) -> int:
        """Queued + in-progress requests of `team`."""
        return int(
            self.reader.execute(
                "SELECT COUNT(*) FROM requests WHERE team=? AND status IN ('QUEUED','IN_PROGRESS')", (team,)
            ).fetchone()[0]
        )

    async def queue_counts(self, model_id: str, environment: str, deployment_id: str) -> tuple[int, int]:
        """(queued, in progress) of one target."""
        target, args = _target(model_id, environment, deployment_id)
        rows = self.reader.execute(
            f"SELECT status, COUNT(*) FROM requests WHERE {target} AND status IN ('QUEUED','IN_PROGRESS')"
            " GROUP BY status",
            args,
        ).fetchall()
        counts = {r[0]: r[1] for r in rows}
        return counts.get("QUEUED", 0), counts.get("IN_PROGRESS", 0)

    async def depth(self) -> list[tuple[str, str, str, int, int]]:
        """(model, environment, deployment, priority, queued) for the depth gauge and the admin read."""
        rows = self.reader.execute(
            "SELECT model_id, environment, deployment_id, priority, COUNT(*) FROM requests WHERE status='QUEUED'"
            " GROUP BY model_id, environment, deployment_id, priority"
        ).fetchall()
        return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    async def in_progress(self) -> list[tuple[str, str, str, int]]:
        rows = self.reader.execute(
            "SELECT model_id, environment, deployment_id, COUNT(*) FROM requests WHERE status='IN_PROGRESS'"
            " GROUP BY model_id, environment, deployment_id"
        ).fetchall()
        return [(r[0], r[1], r[2], r[3]) for r in rows]


def _target(model_id: str, environment: str, deployment_id: str, mark: str = "?") -> tuple[str, tuple]:
    """The WHERE clause and arguments of one target: a model's environment, or a deployment of it;
    `mark` is the driver's placeholder (sqlite3's `?`, psycopg's `%s`)."""
    if environment:
        return f"model_id={mark} AND environment={mark}", (model_id, environment)
    return f"model_id={mark} AND environment={mark} AND deployment_id={mark}", (model_id, environment, deployment_id)


def _takeable(row: Any, me: str, now: float) -> bool:
    """A claim the process `me` may take: nobody's, its lease passed, or its owner a gone process of this host."""
    return not row["owner"] or (row["lease_until"] or 0) < now or _owner_gone(row["owner"], me)


def _claimed(req: AsyncRequest, now: float) -> AsyncRequest:
    """`req` as its claim for a run leaves it: IN_PROGRESS since `now`, one attempt more."""
    req.status, req.status_at, req.attempts = "IN_PROGRESS", now, req.attempts + 1
    return req


def _settle(future: asyncio.Future, ok: bool, value: Any) -> None:
    if future.done():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


def store_path(directory: Path, region: str) -> Path:
    """The file of `region`'s queue in `directory` (one per region: residency at rest)."""
    return directory / f"async-queue-{region}.sqlite3"
