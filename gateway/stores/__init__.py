"""Where a gateway keeps its shared state: the embedded JSON store, or PostgreSQL (fleet mode, SPEC §13).

`--store FILE` (or nothing: next to the table) is the embedded `JsonFileStore`; `--store
postgresql://...` is `PostgresAdminStore`, shared by every gateway of a fleet.
"""

from __future__ import annotations

from gateway.environments.overlay import default_store_path
from gateway.environments.store import JsonFileStore
from gateway.metrics import Metrics

DATABASE_SCHEMES = ("postgresql://", "postgres://")


def is_database(spec: str | None) -> bool:
    return spec is not None and spec.startswith(DATABASE_SCHEMES)


def cache_path(config: str) -> str:
    """The local copy of the last overlay a fleet gateway served: next to the table file (or `--store-cache`)."""
    return default_store_path(config).removesuffix(".admin.json") + ".store-cache.json"


def open_store(spec: str | None, config: str, metrics: Metrics | None = None, cache: str | None = None):
    """The admin store `--store` names (None: the JSON file next to the table); `cache`: `--store-cache`."""
    if is_database(spec):
        from gateway.stores.postgres import PostgresAdminStore

        return PostgresAdminStore(str(spec), cache or cache_path(config), metrics)
    return JsonFileStore(spec or default_store_path(config))
