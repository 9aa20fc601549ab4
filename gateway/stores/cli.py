"""`gateway store migrate --store URL --queue-store REGION=URL`, and the checks before `serve` binds anything."""

from __future__ import annotations

import argparse
import sys

from gateway.stores import is_database
from gateway.stores.db import StoreUnavailable, redact


def add_store_commands(sub: argparse._SubParsersAction) -> None:
    st = sub.add_parser("store", help="the fleet's databases (PostgreSQL, SPEC §13)")
    actions = st.add_subparsers(dest="store_command", required=True)
    m = actions.add_parser("migrate", help="create or upgrade the databases' schemas (idempotent)")
    m.add_argument("--store", default=None, help="the control database: postgresql://USER@HOST[:PORT]/DATABASE[?...]")
    m.add_argument(
        "--queue-store", action="append", default=[], metavar="REGION=URL",
        help="a region's async queue database (repeatable: one per region); tagged with its region",
    )  # fmt: skip
    m.set_defaults(func=_migrate)


def _migrate(args: argparse.Namespace) -> int:
    from gateway.asyncq.placement import parse_queue_stores

    if args.store is None and not args.queue_store:
        print("gateway store migrate: give --store URL and/or --queue-store REGION=URL", file=sys.stderr)
        return 2
    if args.store is not None and not is_database(args.store):
        print(f"gateway store migrate: --store takes a postgresql:// URL, got {args.store!r}", file=sys.stderr)
        return 2
    try:
        queues = parse_queue_stores(args.queue_store)
    except ValueError as exc:
        print(f"gateway store migrate: {exc}", file=sys.stderr)
        return 2
    if queues.directory is not None:
        print(f"gateway store migrate: --queue-store takes REGION=postgresql://..., got {queues.directory!r}",
              file=sys.stderr)  # fmt: skip
        return 2
    status = 0
    if args.store is not None:
        status = max(status, _migrate_one(args.store, None))
    for region, url in queues.databases.items():
        status = max(status, _migrate_one(url, region))
    return status


def _migrate_one(url: str, region: str | None) -> int:
    """Migrate the control database (`region` None) or `region`'s queue database; 0, or 1 (said why)."""
    from gateway.asyncq.pgstore import migrate_queue
    from gateway.stores.migrate import CONTROL, QUEUE, SchemaMismatch, migrate

    kind = CONTROL if region is None else QUEUE
    shown = redact(url) + ("" if region is None else f" (async queue of region {region})")
    try:
        before, applied = migrate(url) if region is None else migrate_queue(url, region)
    except (SchemaMismatch, StoreUnavailable) as exc:
        print(f"gateway store migrate: {exc}", file=sys.stderr)
        return 1
    if applied:
        print(
            f"{shown}: migrated from schema version {before} to {kind.latest} (applied {', '.join(map(str, applied))})"
        )
    else:
        print(f"{shown}: schema version {before}, up to date")
    return 0


def check_store(spec: str | None) -> bool:
    """Before `serve` binds: a database store must have this gateway's schema (False: refused, said why).

    An unreachable one is not refused here: the gateway starts from its local cache (SPEC §13).
    """
    if not is_database(spec):
        return True
    from gateway.stores.migrate import SchemaMismatch
    from gateway.stores.postgres import PostgresAdminStore

    try:
        PostgresAdminStore(str(spec), "").check()
    except SchemaMismatch as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return False
    except StoreUnavailable as exc:
        print(f"gateway: {exc}; starting from the local cache", file=sys.stderr)
    return True


def check_queue_stores(databases: dict[str, str]) -> bool:
    """Before `serve` binds: each region's queue database has this gateway's queue schema and holds
    that region's queue (False: refused, one line said why). An unreachable one is not refused: the
    gateway starts, its submits answer 503 until the database answers."""
    from gateway.asyncq.pgstore import check_queue_database
    from gateway.stores.db import connect
    from gateway.stores.migrate import SchemaMismatch

    for region, url in sorted(databases.items()):
        try:
            with connect(url) as conn:
                check_queue_database(conn, redact(url), region)
        except SchemaMismatch as exc:
            print(f"gateway: {exc}", file=sys.stderr)
            return False
        except StoreUnavailable as exc:
            print(f"gateway: {exc}; starting anyway: region {region}'s async submits answer 503 until it answers",
                  file=sys.stderr)  # fmt: skip
    return True
