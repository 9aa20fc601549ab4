"""Where each region's async queue lives (SPEC §10, §13; issue 14): `--queue-store`.

`--queue-store DIR` (or nothing: the table's directory) keeps every region's queue in an embedded
SQLite file of its own there; `--queue-store REGION=postgresql://...` (repeatable) puts that
region's queue in a database, shared by every gateway serving the region. A served region without
a database entry stays in its embedded file. Residency at rest: one database per region, never a
shared global one, so the same database named for two regions is refused (and each database is
tagged with its region by `gateway store migrate`, which a gateway checks before using it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict

from gateway.asyncq.pgstore import PgRegionStore
from gateway.asyncq.store import RegionStore, store_path
from gateway.routing.model import Table
from gateway.state import TableState
from gateway.stores import is_database
from gateway.stores.db import StoreUnavailable, redact

Store = RegionStore | PgRegionStore
_REGION = re.compile(r"[a-z0-9][a-z0-9-]*")


@dataclass(frozen=True)
class QueuePlacement:
    directory: str | None = None  # the embedded files' directory (None: the table's)
    databases: dict[str, str] = field(default_factory=dict)  # region -> its queue database URL


def parse_queue_stores(values: Iterable[str]) -> QueuePlacement:
    """The `--queue-store` values: at most one DIR, and REGION=URL entries. Raises ValueError (one line)."""
    directory: str | None = None
    databases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for value in values:
        region, sep, url = value.partition("=")
        if is_database(value):
            raise ValueError(f"--queue-store {redact(value)}: name its region, --queue-store REGION={redact(value)} "
                             "(one database per region)")  # fmt: skip
        if not (sep and is_database(url)):
            if directory is not None:
                raise ValueError(f"--queue-store: one directory at most (got {directory!r} and {value!r})")
            directory = value
            continue
        if not _REGION.fullmatch(region):
            raise ValueError(f"--queue-store {region}=...: {region!r} is not a region name")
        if region in databases:
            raise ValueError(f"--queue-store: region '{region}' is given twice")
        key = database_key(url)
        if key in seen:
            raise ValueError(
                f"--queue-store: regions '{seen[key]}' and '{region}' name the same database {redact(url)}: "
                "each region's queue lives in a database of its own (residency at rest)"
            )
        seen[key] = region
        databases[region] = url
    return QueuePlacement(directory, databases)


def database_key(url: str) -> tuple:
    """What identifies a database in a URL: host, port and name (spellings of one URL compare equal)."""
    try:
        info = conninfo_to_dict(url)
    except Exception as exc:  # psycopg.ProgrammingError: a URL libpq cannot parse
        raise ValueError(f"--queue-store: {redact(url)} is not a valid database URL ({exc})") from None
    host = str(info.get("host") or "localhost").lower()
    host = "127.0.0.1" if host in ("localhost", "::1") else host
    return host, str(info.get("port") or "5432"), str(info.get("dbname") or info.get("user") or "")


def check_regions(placement: QueuePlacement, table: Table) -> None:
    """Every REGION= entry names a region of the table. Raises ValueError."""
    unknown = sorted(set(placement.databases) - set(table.regions))
    if unknown:
        raise ValueError(f"--queue-store {unknown[0]}=...: the table has no region '{unknown[0]}' "
                         f"(regions: {', '.join(sorted(table.regions))})")  # fmt: skip


def open_region_store(directory: Path, databases: dict[str, str], region: str) -> Store:
    """`region`'s queue: in its own database when `--queue-store REGION=URL` names one, else the embedded file."""
    url = databases.get(region)
    return PgRegionStore(url, region) if url else RegionStore(store_path(directory, region), region)


def served_regions(table: Table) -> list[str]:
    """The regions whose async requests this gateway stores and runs (`gateway.regions`, else all)."""
    regions = table.gateway.regions
    return sorted(table.regions if regions is None else regions & set(table.regions))


async def queue_report(directory: Path, stores: dict[str, Store]) -> dict:
    """Every region's queues by target, and where each region's queue lives: what `GET
    /v1/async/queues` shows (a worker's, or the supervisor's over the same stores under --workers N)."""
    out = []
    places: dict[str, dict] = {}
    for region, store in sorted(stores.items()):
        places[region] = {"store": store.where, "reachable": True}
        try:
            running = {(m, e, d): n for m, e, d, n in await store.in_progress()}
            depth = await store.depth()
        except StoreUnavailable as exc:
            places[region] = {"store": store.where, "reachable": False, "error": str(exc)}
            continue
        for model, env, dep, priority, queued in depth:
            out.append({"region": region, "model_id": model, "environment": env, "deployment_id": dep,
                        "priority": priority, "queued": queued, "in_progress": running.pop((model, env, dep), 0)})  # fmt: skip
        for (model, env, dep), n in running.items():
            out.append({"region": region, "model_id": model, "environment": env, "deployment_id": dep,
                        "priority": None, "queued": 0, "in_progress": n})  # fmt: skip
    return {"store": str(directory), "regions": sorted(stores), "placement": places, "queues": out}


class QueueFiles:
    """The served regions' queue stores, for reading: the supervisor's `GET /v1/async/queues` under
    --workers N, where the workers own the queues and share the files (or the databases)."""

    def __init__(self, directory: Path, state: TableState, databases: dict[str, str] | None = None) -> None:
        self.directory = directory
        self.state = state
        self.databases = dict(databases or {})
        self.stores: dict[str, Store] = {}

    async def queues(self) -> dict:
        for region in served_regions(self.state.table):
            if region not in self.stores and (region in self.databases or store_path(self.directory, region).exists()):
                self.stores[region] = open_region_store(self.directory, self.databases, region)
        return await queue_report(self.directory, self.stores)
