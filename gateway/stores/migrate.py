"""Schema migrations of the fleet's databases, shipped in the package (`migrations/NNNN_name.sql`).

Two sets, versioned apart: the control database's (`CONTROL`: the admin overlay, promotions;
`gateway/stores/migrations/`, recorded in `schema_version`) and a region's async queue database's
(`QUEUE`: `gateway/asyncq/migrations/`, recorded in `queue_schema_version`), so that a queue
database may be the control database's server, or even the same database, without their versions
mixing. `gateway store migrate` applies the ones a database lacks, in order, each recorded in its
set's table, all in one transaction under an advisory lock: running it twice, or from two machines
at once, applies each migration once. A database whose schema is newer than this binary knows is
refused (an older gateway must not write a schema it does not understand).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

import psycopg

from gateway.stores.db import StoreUnavailable, connect, one_line


class SchemaMismatch(Exception):
    """The database's schema is not the one this gateway knows (message: what to do)."""


@dataclass(frozen=True)
class MigrationSet:
    what: str  # "store", "queue store": how messages name the database
    package: str  # where the migrations/ folder is shipped
    table: str  # the versions applied
    lock: int  # pg_advisory_xact_lock key: one migration run of this set at a time per database
    command: str  # what to run when the database is behind

    def migrations(self) -> list[tuple[int, str, str]]:
        """(version, name, SQL) of every shipped migration, in order."""
        found = []
        for entry in resources.files(self.package).joinpath("migrations").iterdir():
            match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
            if match:
                found.append((int(match[1]), match[2], entry.read_text()))
        return sorted(found)

    @property
    def latest(self) -> int:
        return self.migrations()[-1][0]


CONTROL = MigrationSet("store", "gateway.stores", "schema_version", 0x6761_7465, "gateway store migrate --store URL")
QUEUE = MigrationSet(
    "queue store",
    "gateway.asyncq",
    "queue_schema_version",
    0x6761_7471,
    "gateway store migrate --queue-store REGION=URL",
)


def migrations() -> list[tuple[int, str, str]]:
    return CONTROL.migrations()


LATEST = CONTROL.latest


def current_version(conn: psycopg.Connection, kind: MigrationSet = CONTROL) -> int:
    if conn.execute("SELECT to_regclass(%s)", (kind.table,)).fetchone() == (None,):
        return 0
    row = conn.execute(f"SELECT coalesce(max(version), 0) FROM {kind.table}").fetchone()
    return int(row[0]) if row else 0


def migrate(url: str, kind: MigrationSet = CONTROL) -> tuple[int, list[int]]:
    """Bring the database to `kind.latest`: (version before, versions applied). Raises SchemaMismatch."""
    try:
        with connect(url) as conn:
            before, applied = migrate_in(conn, kind)
            conn.commit()
            return before, applied
    except psycopg.Error as exc:
        raise StoreUnavailable(f"cannot migrate the {kind.what}: {one_line(exc)}") from None


def migrate_in(conn: psycopg.Connection, kind: MigrationSet) -> tuple[int, list[int]]:
    """`migrate` inside the caller's transaction (it commits)."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (kind.lock,))
    before = current_version(conn, kind)
    if before > kind.latest:
        raise SchemaMismatch(too_new(before, kind))
    conn.execute(f"CREATE TABLE IF NOT EXISTS {kind.table} "
                 "(version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")  # fmt: skip
    applied = []
    for version, name, sql in kind.migrations():
        if version > before:
            conn.execute(sql.encode())  # no parameters: several statements in one query
            conn.execute(f"INSERT INTO {kind.table} (version, name) VALUES (%s, %s)", (version, name))
            applied.append(version)
    return before, applied


def check_schema(conn: psycopg.Connection, url_shown: str, kind: MigrationSet = CONTROL) -> None:
    """Refuse a database this gateway cannot use: unmigrated, behind, or newer than it knows."""
    version = current_version(conn, kind)
    if version > kind.latest:
        raise SchemaMismatch(too_new(version, kind))
    if version < kind.latest:
        raise SchemaMismatch(
            f"the {kind.what} {url_shown} is at schema version {version}, this gateway needs {kind.latest}: "
            f"run `{kind.command}` first"
        )


def too_new(version: int, kind: MigrationSet = CONTROL) -> str:
    return (
        f"the {kind.what}'s schema is at version {version}, newer than this gateway knows ({kind.latest}): "
        "upgrade the gateway (a newer gateway migrated it)"
    )
