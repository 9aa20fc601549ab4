"""Schema migrations of the fleet store, shipped in the package (`migrations/NNNN_name.sql`).

`gateway store migrate --store URL` applies the ones a database lacks, in order, each recorded
in `schema_version`, all in one transaction under an advisory lock: running it twice, or from two
machines at once, applies each migration once. A database whose schema is newer than this
binary knows is refused (an older gateway must not write a schema it does not understand).
"""

from __future__ import annotations

import re
from importlib import resources

import psycopg

from gateway.stores.db import StoreUnavailable, connect, one_line

MIGRATE_LOCK = 0x6761_7465  # pg_advisory_xact_lock key: one migration run at a time per database


class SchemaMismatch(Exception):
    """The database's schema is not the one this gateway knows (message: what to do)."""


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, SQL) of every shipped migration, in order."""
    found = []
    for entry in resources.files("gateway.stores").joinpath("migrations").iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if match:
            found.append((int(match[1]), match[2], entry.read_text()))
    return sorted(found)


LATEST = migrations()[-1][0]


def current_version(conn: psycopg.Connection) -> int:
    if conn.execute("SELECT to_regclass('schema_version')").fetchone() == (None,):
        return 0
    row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
    return int(row[0]) if row else 0


def migrate(url: str) -> tuple[int, list[int]]:
    """Bring the database to `LATEST`: (version before, versions applied). Raises SchemaMismatch."""
    try:
        with connect(url) as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
            before = current_version(conn)
            if before > LATEST:
                raise SchemaMismatch(too_new(before))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version "
                         "(version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")  # fmt: skip
            applied = []
            for version, name, sql in migrations():
                if version > before:
                    conn.execute(sql.encode())  # no parameters: several statements in one query
                    conn.execute("INSERT INTO schema_version (version, name) VALUES (%s, %s)", (version, name))
                    applied.append(version)
            conn.commit()
            return before, applied
    except psycopg.Error as exc:
        raise StoreUnavailable(f"cannot migrate the store: {one_line(exc)}") from None


def check_schema(conn: psycopg.Connection, url_shown: str) -> None:
    """Refuse a database this gateway cannot use: unmigrated, behind, or newer than it knows."""
    version = current_version(conn)
    if version > LATEST:
        raise SchemaMismatch(too_new(version))
    if version < LATEST:
        raise SchemaMismatch(
            f"the store {url_shown} is at schema version {version}, this gateway needs {LATEST}: "
            f"run `gateway store migrate --store URL` first"
        )


def too_new(version: int) -> str:
    return (
        f"the store's schema is at version {version}, newer than this gateway knows ({LATEST}): "
        "upgrade the gateway (a newer gateway migrated it)"
    )
