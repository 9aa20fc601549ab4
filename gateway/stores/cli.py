"""`gateway store migrate --store URL`, and the fleet store's check before `serve` binds anything."""

from __future__ import annotations

import argparse
import sys

from gateway.stores import is_database
from gateway.stores.db import StoreUnavailable, redact


def add_store_commands(sub: argparse._SubParsersAction) -> None:
    st = sub.add_parser("store", help="the fleet store (PostgreSQL, SPEC §13)")
    actions = st.add_subparsers(dest="store_command", required=True)
    m = actions.add_parser("migrate", help="create or upgrade the store's schema (idempotent)")
    m.add_argument("--store", required=True, help="postgresql://USER@HOST[:PORT]/DATABASE[?...]")
    m.set_defaults(func=_migrate)


def _migrate(args: argparse.Namespace) -> int:
    from gateway.stores.migrate import LATEST, SchemaMismatch, migrate

    if not is_database(args.store):
        print(f"gateway store migrate: --store takes a postgresql:// URL, got {args.store!r}", file=sys.stderr)
        return 2
    try:
        before, applied = migrate(args.store)
    except (SchemaMismatch, StoreUnavailable) as exc:
        print(f"gateway store migrate: {exc}", file=sys.stderr)
        return 1
    shown = redact(args.store)
    if applied:
        print(f"{shown}: migrated from schema version {before} to {LATEST} (applied {', '.join(map(str, applied))})")
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
