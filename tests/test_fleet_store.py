"""Fleet mode, the store (SPEC §13, issue 14): migrations, and the admin store in real PostgreSQL.

Each test gets a database of its own on the system PostgreSQL (tests/fleet.py); no mock stands in
for the database.
"""

from __future__ import annotations

import threading
from pathlib import Path

import psycopg
import pytest

from gateway.environments.store import AdminStore, StoreConflict
from gateway.stores.db import StoreUnavailable, redact
from gateway.stores.migrate import LATEST, migrations
from gateway.stores.postgres import PostgresAdminStore
from tests.fleet import fresh_database, run_cli
from tests.support import GatewayProcess, write_table
from tests.test_environments import table_doc


def overlay(revision: int, note: str = "x") -> dict:
    return {"revision": revision, "models": {"m1": {"environments": {"staging": {"note": note}}}}}


def test_migrate_is_versioned_and_idempotent() -> None:
    with fresh_database(migrated=False) as url:
        first = run_cli("store", "migrate", "--store", url)
        assert first.returncode == 0 and f"migrated from schema version 0 to {LATEST}" in first.stdout, first
        again = run_cli("store", "migrate", "--store", url)
        assert again.returncode == 0 and f"schema version {LATEST}, up to date" in again.stdout, again
        with psycopg.connect(url) as conn:
            versions = [row[0] for row in conn.execute("SELECT version FROM schema_version ORDER BY version")]
            assert versions == [v for v, _, _ in migrations()]
            assert conn.execute("SELECT revision, models FROM admin_overlay").fetchall() == [(0, {})]


def test_concurrent_migrations_apply_each_version_once() -> None:
    with fresh_database(migrated=False) as url:
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(run_cli("store", "migrate", "--store", url).returncode))
                   for _ in range(3)]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [0, 0, 0]
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM schema_version").fetchone() == (LATEST,)


def test_a_schema_newer_than_the_binary_is_refused(tmp_path: Path) -> None:
    with fresh_database() as url:
        with psycopg.connect(url) as conn:
            conn.execute("INSERT INTO schema_version (version, name) VALUES (%s, 'from_the_future')", (LATEST + 1,))
        done = run_cli("store", "migrate", "--store", url)
        assert done.returncode == 1
        assert f"newer than this gateway knows ({LATEST})" in done.stderr, done.stderr
        config = write_table(tmp_path / "t.yaml", table_doc("http://127.0.0.1:9", "http://127.0.0.1:9"))
        served = run_cli("serve", "--config", str(config), "--store", url, "--port", "0", "--admin-port", "0")
        assert served.returncode == 2 and "newer than this gateway knows" in served.stderr, served.stderr


def test_serve_refuses_an_unmigrated_database_and_names_the_command(tmp_path: Path) -> None:
    config = write_table(tmp_path / "t.yaml", table_doc("http://127.0.0.1:9", "http://127.0.0.1:9"))
    with fresh_database(migrated=False) as url:
        served = run_cli("serve", "--config", str(config), "--store", url, "--port", "0", "--admin-port", "0")
        assert served.returncode == 2
        lines = served.stderr.strip().splitlines()
        assert len(lines) == 1 and "run `gateway store migrate --store URL` first" in lines[0], served.stderr


def test_migrate_refuses_what_is_not_a_database_url_and_an_unreachable_one() -> None:
    bad = run_cli("store", "migrate", "--store", "/tmp/admin.json")
    assert bad.returncode == 2 and "takes a postgresql:// URL" in bad.stderr
    gone = run_cli("store", "migrate", "--store", "postgresql://postgres:secret@127.0.0.1:1/nothing")
    assert gone.returncode == 1 and "cannot reach the store" in gone.stderr
    assert "secret" not in gone.stderr and "postgres:***@127.0.0.1:1" in gone.stderr


def test_the_store_is_a_compare_and_swap_on_the_revision(tmp_path: Path) -> None:
    with fresh_database() as url:
        first: AdminStore = PostgresAdminStore(url, str(tmp_path / "cache.json"))
        second = PostgresAdminStore(url, str(tmp_path / "cache2.json"))
        try:
            assert first.load() == {"revision": 0, "models": {}} and first.revision() == 0
            first.save(overlay(1, "mine"))
            with pytest.raises(StoreConflict) as refused:
                second.save(overlay(1, "theirs"))  # based on revision 0, but the store is at 1
            assert (refused.value.based_on, refused.value.current) == (0, 1)
            assert second.load() == overlay(1, "mine")
            second.save(overlay(2, "theirs"))
            assert first.load() == overlay(2, "theirs") and first.revision() == 2
        finally:
            first.close()  # type: ignore[attr-defined]
            second.close()


def test_a_write_notifies_the_fleet(tmp_path: Path) -> None:
    with fresh_database() as url:
        store = PostgresAdminStore(url, str(tmp_path / "cache.json"))
        with psycopg.connect(url, autocommit=True) as listener:
            listener.execute("LISTEN gateway_admin")
            store.save(overlay(1))
            notes = list(listener.notifies(timeout=10, stop_after=1))
        store.close()
        assert [(n.channel, n.payload) for n in notes] == [("gateway_admin", "1")]


def test_an_unreachable_store_says_so_and_the_cache_serves(tmp_path: Path) -> None:
    gone = PostgresAdminStore("postgresql://postgres@127.0.0.1:1/nothing", str(tmp_path / "cache.json"))
    with pytest.raises(StoreUnavailable, match="unreachable"):
        gone.load()
    assert gone.health.describe()["state"] == "unreachable"
    with pytest.raises(Exception, match="no local cache"):
        gone.cached()
    gone.remember(overlay(7))
    assert gone.cached() == overlay(7) and gone.health.serving_from == "local cache"
    gone.close()
    assert redact("postgresql://u:p@h:5/d?x=1") == "postgresql://u:***@h:5/d?x=1"


def test_a_gateway_serves_and_persists_admin_changes_in_the_database(tmp_path: Path) -> None:
    config = write_table(tmp_path / "t.yaml", table_doc("http://127.0.0.1:9", "http://127.0.0.1:9"))
    with fresh_database() as url:
        gw = GatewayProcess(config, "--store", url).start()
        try:
            status, _ = gw.admin("PATCH", "/v1/models/m1/environments/staging",
                                 body={"canary": {"deployment": "v2", "percent": 10}})  # fmt: skip
            assert status == 200
            routing = gw.admin("GET", "/v1/routing")[1]
            assert isinstance(routing, dict)
            assert routing["admin_store"] == url and routing["admin_revision"] == 1
            assert routing["store"]["state"] == "ok" and routing["store"]["serving_from"] == "database"
        finally:
            gw.stop()
        with psycopg.connect(url) as conn:
            revision, models = conn.execute("SELECT revision, models FROM admin_overlay").fetchone()
        assert revision == 1 and models["m1"]["environments"]["staging"]["set"]["canary"]["deployment"] == "v2"
        assert not (tmp_path / "t.yaml.admin.json").exists()  # nothing in the embedded store
        assert (tmp_path / "t.yaml.store-cache.json").exists()  # the local cache of what it served
