"""Fleet mode, the async queue (SPEC §10, §13; issue 14): each region's queue in a PostgreSQL database
of its own (`--queue-store REGION=URL`), shared by every gateway serving the region.

Real gateway processes, a real plane and webhook receiver on 127.0.0.1, real PostgreSQL: fresh
databases on the system server, and a private server for the test that stops and restarts it.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from collections import Counter
from pathlib import Path

import aiohttp
import psycopg

from tests.dataplane import AUTH, until
from tests.fleet import PrivatePostgres, fresh_database, fresh_queue_database, run_cli
from tests.support import GatewayProcess, write_table
from tests.test_async import ENV, AsyncPlane, Receiver, async_doc
from tests.test_async_crash import SlowPlane

KILLS = 4
HOSTS = {"us": "model-abc123-prod-us.api.example.com", "eu": "model-abc123-prod-eu.api.example.com"}


def fleet_doc(plane_url: str) -> dict:
    """The async test table, serving both regions, four runs at a time per regional environment."""
    doc = async_doc(plane_url, concurrency=4)
    doc["gateway"]["regions"] = ["us", "eu"]
    for env in ("prod-us", "prod-eu"):
        doc["models"]["abc123"]["environments"][env]["autoscaling"] = {"concurrency_target": 4}
    return doc


async def submit(session: aiohttp.ClientSession, gw: GatewayProcess, region: str, doc: dict) -> tuple[int, dict]:
    async with session.post(gw.url + "/async_predict", data=json.dumps(doc), headers={"Host": HOSTS[region], **AUTH},
                            timeout=aiohttp.ClientTimeout(total=15)) as r:  # fmt: skip
        body = await r.read()
        return r.status, json.loads(body) if body else {}


def stored(url: str) -> dict[str, tuple]:
    """request id -> (region, status, webhook status, body, result) of every request in a queue database."""
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT request_id, region, status, webhook_status, body, result FROM async_requests")
        return {r[0]: (r[1], r[2], r[3], bytes(r[4]), bytes(r[5] or b"")) for r in rows}


async def start(gw: GatewayProcess) -> GatewayProcess:
    return await asyncio.to_thread(gw.start)  # the plane and the receiver share this loop: do not block it


def test_a_fleet_loses_no_async_request_with_a_gateway_sigkilled_in_a_loop_and_keeps_each_region_apart(
    tmp_path: Path,
) -> None:
    accepted: dict[str, str] = {}  # request id -> region
    refused: Counter = Counter()
    unanswered = 0

    async def client(session: aiohttp.ClientSession, fleet: list[GatewayProcess], hook: Receiver,
                     stop: asyncio.Event, seed: int) -> None:  # fmt: skip
        nonlocal unanswered
        rng = random.Random(seed)
        n = 0
        while not stop.is_set():
            n += 1
            region = rng.choice(("us", "eu"))
            gw = rng.choice(fleet)  # a load balancer's spread: any gateway takes any region's submit
            doc = {"model_input": {"marker": f"{region}-marker-{seed}-{n}"}, "webhook_endpoint": hook.url}
            try:
                code, body = await submit(session, gw, region, doc)
            except (aiohttp.ClientError, OSError, TimeoutError):
                unanswered += 1  # cut by a kill: the client never learnt an id
                await asyncio.sleep(0.05)
                continue
            if code == 201:
                accepted[body["request_id"]] = region
            else:
                refused[code] += 1
                assert code == 429, (code, body)  # never a 5xx from a gateway that answers
            await asyncio.sleep(0.01)

    async def scenario(us_url: str, eu_url: str) -> tuple[SlowPlane, Receiver]:
        stores = ("--queue-store", f"us={us_url}", "--queue-store", f"eu={eu_url}")
        async with SlowPlane() as plane, Receiver() as hook, aiohttp.ClientSession() as session:
            table = write_table(tmp_path / "table.yaml", fleet_doc(plane.url))
            fleet = [await start(GatewayProcess(table, *stores, env=ENV)) for _ in range(3)]
            try:
                stop = asyncio.Event()
                clients = [asyncio.ensure_future(client(session, fleet, hook, stop, seed)) for seed in range(6)]
                rng = random.Random(14)
                for kill in range(KILLS):
                    await asyncio.sleep(rng.uniform(0.6, 1.4))
                    victim = kill % len(fleet)
                    fleet[victim].signal(signal.SIGKILL)
                    await asyncio.to_thread(fleet[victim].proc.wait)  # type: ignore[union-attr]
                    fleet[victim].log.close()
                    fleet[victim] = await start(GatewayProcess(table, *stores, env=ENV))
                await asyncio.sleep(0.5)
                stop.set()
                await asyncio.gather(*clients)

                def delivered() -> bool:
                    return set(accepted) <= {d["body"]["request_id"] for d in hook.deliveries}

                await until(delivered, "every accepted request's webhook", timeout=120)
                status, report = fleet[0].admin("GET", "/v1/async/queues")
                assert status == 200 and isinstance(report, dict)
                assert report["placement"]["us"]["store"].startswith("database postgresql://")
            finally:
                for gw in fleet:
                    gw.stop()
        return plane, hook

    with fresh_queue_database("us") as us_url, fresh_queue_database("eu") as eu_url:
        plane, hook = asyncio.run(scenario(us_url, eu_url))
        us, eu = stored(us_url), stored(eu_url)

    # None lost: every accepted request ended SUCCEEDED, its webhook delivered, in its region's database.
    for rid, region in accepted.items():
        row = (us if region == "us" else eu).get(rid)
        assert row is not None, f"accepted {region} request {rid} is not in its region's database"
        assert row[1:3] == ("SUCCEEDED", "SUCCEEDED"), (rid, row[:3])
    # Residency at rest: bodies and results of a region only in that region's database.
    for mine, other, rows in (("us", "eu", us), ("eu", "us", eu)):
        assert rows and all(r[0] == mine for r in rows.values())
        assert all(f"{mine}-marker".encode() in r[3] and f"{other}-marker".encode() not in r[3] for r in rows.values())
        assert all(f"{other}-marker".encode() not in r[4] for r in rows.values())
    assert not set(us) & set(eu)
    assert all(d["baseten_ok"] and d["standard_ok"] for d in hook.deliveries)
    runs = Counter(c["id"] for c in plane.calls)
    assert set(accepted) <= set(runs) and set(runs) <= set(us) | set(eu)  # every run is of a stored request
    assert max(runs.values()) <= 1 + KILLS  # at least once: again only after a kill, same request id
    print(f"\nfleet crash loop: {KILLS} kills, accepted {len(accepted)} ({Counter(accepted.values())}), "
          f"refused {dict(refused)}, cut by a kill {unanswered}, plane runs {sum(runs.values())} for {len(runs)} ids, "
          f"deliveries {len(hook.deliveries)}, lost 0")  # fmt: skip
    assert len(accepted) > 100  # the clients really submitted under the kills


def test_the_queue_resumes_after_its_database_restarts_and_submits_meanwhile_get_a_clear_503(tmp_path: Path) -> None:
    pg = PrivatePostgres().start()
    accepted: list[str] = []
    outage: Counter = Counter()

    async def scenario(url: str) -> None:
        stores = ("--queue-store", f"us={url}", "--queue-store", str(tmp_path / "queues"))  # eu: embedded
        async with SlowPlane() as plane, Receiver() as hook, aiohttp.ClientSession() as session:
            table = write_table(tmp_path / "table.yaml", fleet_doc(plane.url))
            fleet = [await start(GatewayProcess(table, *stores, env=ENV)) for _ in range(2)]
            try:
                doc = {"model_input": {"marker": "before"}, "webhook_endpoint": hook.url}
                for i in range(30):
                    code, body = await submit(session, fleet[i % 2], "us", doc)
                    assert code == 201, body
                    accepted.append(body["request_id"])
                await asyncio.to_thread(pg.stop)  # runs are on the plane, others queued
                for i in range(10):  # a clear answer at once, never a 500 nor a hang
                    started = time.monotonic()
                    code, body = await submit(session, fleet[i % 2], "us", {"model_input": {"marker": "during"}})
                    outage[code] += 1
                    assert code == 503 and body["error_code"] == "model_unavailable", body
                    assert (
                        "async queue of region 'us' is unavailable" in body["error"] and "postgres" not in body["error"]
                    )
                    assert time.monotonic() - started < 10
                async with session.get(fleet[0].url + f"/async_request/{accepted[0]}",
                                       headers={"Host": HOSTS["us"], **AUTH}) as r:  # fmt: skip
                    assert r.status == 503, await r.text()
                code, body = await submit(session, fleet[0], "eu", {"model_input": {"marker": "eu"}})
                assert code == 201, body  # the other region's queue (embedded here) is not affected
                status, report = fleet[1].admin("GET", "/v1/async/queues")
                assert status == 200 and isinstance(report, dict)
                assert report["placement"]["us"]["reachable"] is False
                assert report["placement"]["eu"]["store"].startswith("embedded file ")
                await asyncio.sleep(1.0)
                await asyncio.to_thread(pg.start)
                eu_id = body["request_id"]

                async def accepting() -> bool:
                    code, body = await submit(session, fleet[1], "us", {"model_input": {"marker": "after"},
                                                                       "webhook_endpoint": hook.url})  # fmt: skip
                    if code == 201:
                        accepted.append(body["request_id"])
                    return code == 201

                await until(accepting, "submits accepted again", timeout=30)
                for gw in fleet:  # neither gateway crashed in the outage
                    assert gw.proc is not None and gw.proc.poll() is None, gw.output()

                def delivered() -> bool:
                    return set(accepted) <= {d["body"]["request_id"] for d in hook.deliveries}

                await until(delivered, "every accepted request's webhook after the restart", timeout=90)
                assert eu_id in {c["id"] for c in plane.calls}
            finally:
                for gw in fleet:
                    gw.stop()

    try:
        with fresh_queue_database("us", pg.server) as url:
            asyncio.run(scenario(url))
            rows = stored(url)
    finally:
        pg.close()
    assert all(rows[rid][1:3] == ("SUCCEEDED", "SUCCEEDED") for rid in accepted)
    assert not any(b"during" in row[3] for row in rows.values())  # nothing half-written by a refused submit
    print(f"\ndatabase restart: accepted {len(accepted)}, answers during the outage {dict(outage)}")


def test_queue_store_option_errors_and_an_unmigrated_database_are_refused_in_one_line(tmp_path: Path) -> None:
    config = write_table(tmp_path / "t.yaml", fleet_doc("http://127.0.0.1:9"))

    def serve(*extra: str) -> tuple[int, str]:
        done = run_cli("serve", "--config", str(config), "--port", "0", "--admin-port", "0", *extra)
        return done.returncode, done.stderr.strip()

    with fresh_database(migrated=False) as url, fresh_queue_database("eu") as eu_url:
        spelled = url.replace("127.0.0.1", "localhost")
        cases = [
            ((url,), "name its region"),
            (("--queue-store", f"us={url}", "--queue-store", f"eu={spelled}"), "name the same database"),
            (("--queue-store", f"us={url}", "--queue-store", f"us={eu_url}"), "region 'us' is given twice"),
            (("--queue-store", f"mars={url}"), "the table has no region 'mars'"),
            (("--queue-store", str(tmp_path / "a"), "--queue-store", str(tmp_path / "b")), "one directory at most"),
            (("--queue-store", f"us={url}"), "run `gateway store migrate --queue-store REGION=URL` first"),
            (("--queue-store", f"us={eu_url}"), "holds region 'eu''s async queue, not 'us''s"),
        ]
        for extra, message in cases:
            args = ("--queue-store", *extra) if len(extra) == 1 else extra
            code, err = serve(*args)
            assert code == 2 and message in err and len(err.splitlines()) == 1, (args, code, err)
        bare = run_cli("store", "migrate", "--queue-store", url)
        assert bare.returncode == 2 and "name its region" in bare.stderr
        nothing = run_cli("store", "migrate")
        assert nothing.returncode == 2 and "--queue-store REGION=URL" in nothing.stderr


def test_a_gateway_with_an_unreachable_queue_database_starts_and_answers_503(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with AsyncPlane() as plane, aiohttp.ClientSession() as session:
            table = write_table(tmp_path / "table.yaml", fleet_doc(plane.url))
            gw = await start(GatewayProcess(table, "--queue-store", "us=postgresql://postgres@127.0.0.1:1/gone",
                                            env=ENV))  # fmt: skip
            try:
                code, body = await submit(session, gw, "us", {"model_input": 1})
                assert code == 503 and body["error_code"] == "model_unavailable", body
                code, body = await submit(session, gw, "eu", {"model_input": 1})
                assert code == 201, body  # eu has no database entry: its embedded file, next to the table
            finally:
                gw.stop()
            assert "region us's async submits answer 503 until it answers" in gw.output()
            assert "async queue of region eu: embedded file" in gw.output()
        assert (tmp_path / "async-queue-eu.sqlite3").exists() and not (tmp_path / "async-queue-us.sqlite3").exists()

    asyncio.run(scenario())
