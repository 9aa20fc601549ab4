"""Fleet-mode test support (SPEC §13): real PostgreSQL, a fresh database per test, gateway processes.

The system PostgreSQL (127.0.0.1:5432, trust auth; `.ci/run` starts it) holds one uniquely named
database per test, dropped afterwards, so parallel runs never share state. Tests that stop or
restart the database use a private server of their own (`PrivatePostgres`: initdb + pg_ctl into a
temporary directory, on a free port), never the shared one. No PostgreSQL is a failure, not a skip.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.support import REPO, GatewayProcess, free_port, write_table
from tests.test_environments import AUTH, TestPlane, table_doc

SERVER = os.environ.get("GATEWAY_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
KEY = AUTH["Authorization"].removeprefix("Api-Key ")  # the API key of tests.test_environments' table


@pytest.fixture(scope="module")
def plane() -> Iterator[TestPlane]:
    """A plane answering every call with the deployment it was addressed to."""
    plane = TestPlane()
    yield plane
    plane.stop()


@pytest.fixture
def config(tmp_path: Path, plane: TestPlane) -> Path:
    """tests.test_environments' table (model m1, deployments v1..v6) over `plane`."""
    plane.fail_deployments.clear()
    return write_table(tmp_path / "table.yaml", table_doc(plane.url, plane.url))


def _admin_connection(server: str) -> psycopg.Connection:
    try:
        return psycopg.connect(f"{server}/postgres", autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:  # fail, never skip: CI starts PostgreSQL (.ci/run)
        raise RuntimeError(f"fleet tests need PostgreSQL at {server} (.ci/run starts it): {exc}") from None


@contextlib.contextmanager
def fresh_database(server: str = SERVER, *, migrated: bool = True) -> Iterator[str]:
    """A new, empty database on `server` (its URL), migrated unless told otherwise; dropped afterwards."""
    name = f"fleet_test_{uuid.uuid4().hex[:12]}"
    with _admin_connection(server) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = f"{server}/{name}"
    try:
        if migrated:
            run_cli("store", "migrate", "--store", url, check=True)
        yield url
    finally:
        with _admin_connection(server) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextlib.contextmanager
def fresh_queue_database(region: str, server: str = SERVER, *, migrated: bool = True) -> Iterator[str]:
    """A new database for `region`'s async queue (`gateway store migrate --queue-store REGION=URL`); dropped afterwards."""
    with fresh_database(server, migrated=False) as url:
        if migrated:
            run_cli("store", "migrate", "--queue-store", f"{region}={url}", check=True)
        yield url


def run_cli(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=60)  # fmt: skip
    if check and done.returncode != 0:
        raise AssertionError(f"gateway {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return done


def postgres_bin(tool: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"))
    if not found:
        raise RuntimeError(f"{tool} not found under /usr/lib/postgresql/*/bin (install postgresql)")
    return found[-1]


class PrivatePostgres:
    """A PostgreSQL server of this test alone, which it may stop and restart at will."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="gateway-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.user = None if os.getuid() != 0 else "postgres"  # the server refuses to run as root
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self._run(postgres_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-N", "-E", "UTF8")

    @property
    def server(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}"

    def _run(self, *cmd: str) -> None:
        if self.user is not None:
            cmd = ("runuser", "-u", self.user, "--", *cmd)
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)

    def _ctl(self, action: str, *extra: str) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(postgres_bin("pg_ctl"), action, "-D", str(self.data), "-w", "-t", "60", "-o", options,
                  "-l", str(self.dir / "log"), *extra)  # fmt: skip

    def start(self) -> PrivatePostgres:
        self._ctl("start")
        return self

    def stop(self) -> None:
        self._ctl("stop", "-m", "fast")

    def restart(self) -> None:
        self._ctl("restart", "-m", "fast")

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._ctl("stop", "-m", "immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


def start_fleet(config: Path, store: str, n: int = 3) -> list[GatewayProcess]:
    """`n` gateways over one table file and one database store (each its own process and ports)."""
    fleet: list[GatewayProcess] = []
    try:
        for _ in range(n):
            fleet.append(GatewayProcess(config, "--store", store).start())
    except BaseException:
        stop_fleet(fleet)
        raise
    return fleet


@contextlib.contextmanager
def private_fleet(config: Path, n: int) -> Iterator[tuple[PrivatePostgres, str, list[GatewayProcess]]]:
    """`n` gateways over a database on a private PostgreSQL server: (the server, the store URL, the fleet).

    Gateways the test adds to the list are stopped too.
    """
    pg = PrivatePostgres().start()
    fleet: list[GatewayProcess] = []
    try:
        with fresh_database(pg.server) as url:
            fleet.extend(start_fleet(config, url, n))
            yield pg, url, fleet
    finally:
        stop_fleet(fleet)
        pg.close()


def stop_fleet(fleet: list[GatewayProcess]) -> None:
    for gw in fleet:
        if gw.proc is not None and gw.proc.poll() is None:
            gw.stop()
        elif not gw.log.closed:
            gw.log.close()


def call(
    gw: GatewayProcess, host: str, path: str, key: str, *, routing_key: str = "", timeout: float = 10
) -> tuple[int, dict]:
    """One public call (POST, JSON); the status and the decoded answer."""
    req = urllib.request.Request(gw.url + path, data=b"{}", method="POST", headers={
        "Host": host, "Authorization": f"Api-Key {key}", "Content-Type": "application/json",
        **({"x-baseten-routing-key": routing_key} if routing_key else {}),
    })  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def metric_value(gw: GatewayProcess, name: str) -> float | None:
    with urllib.request.urlopen(gw.admin_url + "/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.split("{")[0].split(" ")[0] == name:
                return float(line.rsplit(" ", 1)[1])
    return None


def monotonic_ms() -> float:
    return time.monotonic() * 1000
