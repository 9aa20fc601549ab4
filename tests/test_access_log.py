"""The access log (SPEC §12 `--access-log`, issue 13): one line per call, parsed line by line.

Real gateway processes in front of a real aiohttp plane (and a grpcio plane); the log file is read
after the gateway's SIGTERM drain, which must have written every line. The writer itself
(`gateway.obs.accesslog.AccessLog` and its writer process) is driven directly for its bounds: a
full pipe drops and counts, `close` writes everything waiting; a writer killed under a running
gateway is started again and its loss counted.
"""

from __future__ import annotations

import asyncio
import datetime
import enum
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import grpc
import yaml

from gateway.calls.info import CallInfo
from gateway.metrics import Counter
from gateway.obs import logwriter
from gateway.obs.accesslog import FIELDS, AccessLog, format_combined, format_json
from tests.planes import Plane
from tests.support import EXAMPLE, KEY_HEADER, REPO, GatewayProcess, free_port, write_table
from tests.test_grpc import HOST as GRPC_HOST
from tests.test_grpc import OPTIONS, GrpcPlane

STD = "model-abc123.api.example.com"
REQUEST_ID = re.compile(r"[0-9a-f]{32}\Z")
# Apache/nginx combined, then the gateway's key="value" fields.
COMBINED = re.compile(
    r'(?P<client>\S+) - - \[(?P<time>\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000)\] "(?P<request>[^"]*)" '
    r'(?P<status>\S+) (?P<bytes>\S+) "(?P<referer>[^"]*)" "(?P<agent>[^"]*)"(?P<extra>.*)\Z'
)
PAIR = re.compile(r' (\w+)="((?:[^"\\]|\\.)*)"')


def table(tmp_path: Path, plane: Plane, grpc_plane: GrpcPlane | None = None) -> Path:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["planes"]["us-east-1"]["url"] = plane.url
    doc["planes"]["eu-west-1"]["url"] = plane.url
    if grpc_plane is not None:
        doc["planes"]["us-east-1"]["grpc"] = grpc_plane.address
    return write_table(tmp_path / "t.yaml", doc)


async def post(session: aiohttp.ClientSession, gw: GatewayProcess, path: str, body: bytes, **headers: str):
    async with session.post(gw.url + path, data=body, headers={"Host": STD, **KEY_HEADER, **headers}) as resp:
        return resp.status, resp.headers.get("x-baseten-request-id", ""), await resp.read()


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_json_lines_one_per_call_with_route_bytes_and_times(tmp_path: Path) -> None:
    log = tmp_path / "access.log"

    async def scenario() -> list[tuple[int, str, bytes]]:
        async with Plane() as plane:
            gw = GatewayProcess(table(tmp_path, plane), "--access-log", str(log)).start()
            try:
                async with aiohttp.ClientSession() as session:
                    answers = [
                        await post(session, gw, "/production/predict", b'{"n": 1}', **{"User-Agent": "t/1"}),
                        await post(session, gw, "/environments/staging/predict", b"{}"),
                        await post(session, gw, "/production/nope", b"{}"),  # 404: never admitted, still a line
                    ]
                    async with session.post(gw.url + "/production/predict", headers={"Host": STD}) as resp:
                        answers.append((resp.status, resp.headers["x-baseten-request-id"], await resp.read()))
            finally:
                assert gw.stop() == 0
        return answers

    answers = asyncio.run(scenario())
    assert [a[0] for a in answers] == [200, 200, 404, 401]
    records = [json.loads(line) for line in lines_of(log)]  # every line is one JSON document
    assert len(records) == 4
    by_id = {r["request_id"]: r for r in records}
    assert set(by_id) == {a[1] for a in answers}  # the same id the client (and plane) saw
    first = by_id[answers[0][1]]
    assert first["status"] == "200" and first["method"] == "POST" and first["target"] == "/production/predict"
    assert (first["model"], first["environment"], first["deployment"], first["region"]) == (
        "abc123", "production", "v1", "us",
    )  # fmt: skip
    assert first["protocol"] == "http" and first["host"] == STD and first["client"] == "127.0.0.1"
    assert first["bytes_in"] == len(b'{"n": 1}') and first["bytes_out"] == len(answers[0][2])
    assert first["upstream"].startswith("127.0.0.1:") and first["side"] == "primary" and first["shadow"] is False
    assert first["user_agent"] == "t/1"
    assert 0 <= first["ttfb_ms"] <= first["total_ms"]
    # The writer turns the loop's clock into wall time: the line's time is this test's "now".
    wall = datetime.datetime.strptime(first["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.UTC)
    assert abs(wall.timestamp() - time.time()) < 120
    staging = by_id[answers[1][1]]
    assert staging["environment"] == "staging" and staging["side"] in ("primary", "canary")
    assert staging["deployment"] == ("v2" if staging["side"] == "canary" else "v1")
    missing = by_id[answers[2][1]]
    assert missing["status"] == "404" and missing["model"] == "" and missing["upstream"] == ""
    assert missing["ttfb_ms"] is None and missing["target"] == "/production/nope"
    assert by_id[answers[3][1]]["status"] == "401"


def test_combined_format_parses_as_combined_with_the_gateway_fields(tmp_path: Path) -> None:
    log = tmp_path / "access.log"

    async def scenario() -> str:
        async with Plane() as plane:
            gw = GatewayProcess(
                table(tmp_path, plane), "--access-log", str(log), "--access-log-format", "combined"
            ).start()
            try:
                async with aiohttp.ClientSession() as session:
                    _, request_id, _ = await post(
                        session, gw, "/production/predict?x=1", b"abc", Referer='http://r/"q"', **{"User-Agent": "ua"}
                    )
            finally:
                assert gw.stop() == 0
        return request_id

    request_id = asyncio.run(scenario())
    [line] = lines_of(log)
    m = COMBINED.match(line)
    assert m is not None, line
    assert m["client"] == "127.0.0.1" and m["request"] == "POST /production/predict?x=1 HTTP/1.1"
    assert m["status"] == "200" and int(m["bytes"]) > 0 and m["agent"] == "ua"
    assert m["referer"] == "http://r/\\x22q\\x22"  # quotes escaped as nginx does: the line stays parseable
    extra = dict(PAIR.findall(m["extra"]))
    assert extra["request_id"] == request_id and extra["model"] == "abc123" and extra["deployment"] == "v1"
    assert extra["region"] == "us" and extra["bytes_in"] == "3" and extra["side"] == "primary"
    assert float(extra["ttfb_ms"]) <= float(extra["total_ms"])


def test_websocket_and_grpc_calls_log_a_line_each(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    grpc_plane = GrpcPlane("us-east-1")

    async def scenario() -> None:
        async with Plane() as plane:
            gw = GatewayProcess(table(tmp_path, plane, grpc_plane), "--access-log", str(log), grpc_port=free_port())
            gw.start()
            try:
                async with aiohttp.ClientSession() as session:
                    async with session.ws_connect(
                        gw.url + "/production/websocket", headers={"Host": STD, **KEY_HEADER}
                    ) as ws:  # fmt: skip
                        await ws.send_str("hello")
                        assert (await ws.receive(timeout=10)).data == "hello"
                await asyncio.to_thread(grpc_calls, gw)
            finally:
                assert gw.stop() == 0

    try:
        asyncio.run(scenario())
    finally:
        grpc_plane.stop()
    records = [json.loads(line) for line in lines_of(log)]
    by_protocol = {r["protocol"]: r for r in records}
    assert sorted(r["protocol"] for r in records) == ["grpc", "grpc", "websocket"]
    ws = by_protocol["websocket"]
    assert ws["status"] == "101" and ws["bytes_in"] > 0 and ws["bytes_out"] > 0 and ws["deployment"] == "v1"
    grpc_ok, grpc_refused = sorted((r for r in records if r["protocol"] == "grpc"), key=lambda r: r["status"])
    assert grpc_ok["status"] == "OK" and grpc_ok["target"] == "/t.Plane/Echo" and grpc_ok["host"] == GRPC_HOST
    assert grpc_ok["upstream"] == grpc_plane.address and grpc_ok["bytes_in"] == grpc_ok["bytes_out"] > 0
    assert grpc_refused["status"] == "UNAUTHENTICATED" and grpc_refused["upstream"] == ""


def grpc_calls(gw: GatewayProcess) -> None:
    options = [*OPTIONS, ("grpc.default_authority", GRPC_HOST)]
    with grpc.insecure_channel(f"127.0.0.1:{gw.grpc_port}", options=options) as ch:
        echo = ch.unary_unary("/t.Plane/Echo")
        assert echo(b"ping", metadata=(("authorization", KEY_HEADER["Authorization"]),), timeout=10) == b"ping"
        try:
            echo(b"ping", timeout=10)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_workers_append_whole_lines_to_one_file(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    calls = 200

    async def scenario() -> set[str]:
        async with Plane() as plane:
            gw = GatewayProcess(table(tmp_path, plane), "--access-log", str(log), "--workers", "2").start()
            try:
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=8)) as session:
                    sem = asyncio.Semaphore(8)

                    async def one(i: int) -> str:
                        async with sem:
                            status, request_id, _ = await post(session, gw, "/production/predict", b"x" * i)
                            assert status == 200
                            return request_id

                    ids = set(await asyncio.gather(*(one(i) for i in range(calls))))
            finally:
                assert gw.stop() == 0
        return ids

    ids = asyncio.run(scenario())
    records = [json.loads(line) for line in lines_of(log)]  # a torn line would not parse
    assert len(records) == calls and {r["request_id"] for r in records} == ids
    assert sorted(r["bytes_in"] for r in records) == list(range(calls))


def test_a_path_that_cannot_be_written_is_a_usage_error(tmp_path: Path) -> None:
    def serve(*flags: str) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "gateway", "serve", "--config", str(EXAMPLE), "--admin-port", "0", *flags]
        return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)

    missing = serve("--access-log", str(tmp_path / "no" / "such" / "dir.log"))
    assert missing.returncode == 2 and "--access-log" in missing.stderr and "No such file" in missing.stderr
    ratio = serve("--otel", "--otel-sample-ratio", "1.5")
    assert ratio.returncode == 2 and "--otel-sample-ratio must be between 0 and 1" in ratio.stderr


# -- the writer --------------------------------------------------------------------------------


def entry(i: int, **fields: object) -> CallInfo:
    """An ended call as the loop hands it to the writer: started at loop time 0.25 (the
    tests' writer clock is 1,700,000,000 s ahead), its first byte 1 ms later, its end 2 ms later."""
    info = CallInfo(
        f"{i:032x}", "10.0.0.1", STD, "POST", str(fields.pop("target", "/production/predict")), "http",
        agent=str(fields.pop("agent", "")), referer="",
    )  # fmt: skip
    info.bytes_in, info.bytes_out, info.upstream, info.side = 3, i, "10.1.0.1:80", "primary"
    info.first_byte = fields.pop("first_byte", 0.251)  # type: ignore[assignment]
    info.labels, info.code, info.started, info.ended = ("abc123", "production", "v1", "us", "http"), "200", 0.25, 0.252
    return info


def logged(info: CallInfo) -> tuple:
    """What the writer receives of an ended call: its FIELDS, in that order."""
    return tuple(getattr(info, name) for name in FIELDS)


OFFSET = 1_700_000_000.0  # the writer's wall minus loop clock in the tests (accesslog.wall_offset)


def test_close_writes_every_line_waiting(tmp_path: Path) -> None:
    dropped = Counter("d", "", ())
    writer = AccessLog(str(tmp_path / "a.log"), "json", dropped)
    writer.offset = lambda: OFFSET  # type: ignore[method-assign]
    for i in range(20_000):  # more than the pipe holds: close waits for the writer process to read
        writer.queue.append(entry(i))
        if i % 5000 == 0:
            writer.flush()
    child = writer.child
    writer.close()
    assert child is not None and child.returncode == 0  # it wrote everything and exited
    records = [json.loads(line) for line in lines_of(tmp_path / "a.log")]
    assert [r["bytes_out"] for r in records] == list(range(20_000)) and dropped.get(()) == 0
    assert records[0]["time"] == "2023-11-14T22:13:20.250Z"


def test_a_field_marshal_refuses_is_written_as_its_value(tmp_path: Path) -> None:
    """Every logged field is one of marshal's types; one that is not (a str enum, say) still gets
    its line, written as its value, and the batch's other lines with it."""

    class Side(enum.StrEnum):
        CANARY = "canary"

    dropped = Counter("d", "", ())
    writer = AccessLog(str(tmp_path / "a.log"), "json", dropped)
    writer.offset = lambda: OFFSET  # type: ignore[method-assign]
    odd = entry(1)
    odd.side = Side.CANARY  # type: ignore[assignment]
    writer.queue.extend([entry(0), odd, entry(2)])
    writer.flush()
    writer.close()
    records = [json.loads(line) for line in lines_of(tmp_path / "a.log")]
    assert [r["bytes_out"] for r in records] == [0, 1, 2] and dropped.get(()) == 0
    assert [r["side"] for r in records] == ["primary", "canary", "primary"]


def test_a_full_pipe_drops_lines_and_counts_them_without_waiting(tmp_path: Path) -> None:
    dropped = Counter("gateway_access_log_dropped_total", "", ())
    writer = AccessLog(str(tmp_path / "a.log"), "json", dropped, capacity=100)
    assert writer.child is not None
    writer.child.send_signal(signal.SIGSTOP)  # the writer stalls (a stuck disk): its pipe fills up
    try:
        handed = 0
        while not writer.pending and handed < 1000:  # lines of 20 kB: the 1 MiB pipe is full within ~50
            writer.queue.append(entry(handed, target="/" + "x" * 20_000))
            writer.flush()  # never waits: what the pipe does not take stays pending
            handed += 1
        assert writer.pending and handed < 1000
        for i in range(300):  # the call side goes on: 100 wait, the rest are dropped and counted
            writer.queue.append(entry(handed + i))
        writer.flush()
        assert dropped.get(()) == 200 and len(writer.queue) == 100
    finally:
        writer.child.send_signal(signal.SIGCONT)
    writer.close()
    assert len(lines_of(tmp_path / "a.log")) == handed + 100 and dropped.get(()) == 200


def test_a_killed_writer_is_restarted_and_its_loss_counted(tmp_path: Path) -> None:
    log = tmp_path / "access.log"

    async def scenario() -> tuple[set[str], set[str], float]:
        async with Plane() as plane, aiohttp.ClientSession() as session:
            gw = GatewayProcess(table(tmp_path, plane), "--access-log", str(log)).start()
            try:
                first = writer_of(gw.proc.pid)
                before = {(await post(session, gw, "/production/predict", b"{}"))[1] for _ in range(5)}
                await until(lambda: len(lines_of(log)) == 5)
                os.kill(first, signal.SIGSTOP)  # these calls' lines stay in the pipe, unread ...
                lost = {(await post(session, gw, "/production/predict", b"{}"))[1] for _ in range(7)}
                await asyncio.sleep(0.3)  # ... handed over (every 50 ms) ...
                os.kill(first, signal.SIGKILL)  # ... and lost with the writer
                await until(lambda: exited(first))  # (a flush before its exit would hand it the next lines)
                answers = [await post(session, gw, "/production/predict", b"{}") for _ in range(20)]
                assert [a[0] for a in answers] == [200] * 20  # the gateway serves on meanwhile
                await until(lambda: writer_of(gw.proc.pid, 0) not in (0, first))  # started again
                after = {a[1] for a in answers} | before
                await until(lambda: len(lines_of(log)) == len(after))
                async with session.get(gw.admin_url + "/metrics") as resp:
                    metrics = await resp.text()
            finally:
                assert gw.stop() == 0
        dropped = re.search(r"^gateway_access_log_dropped_total (\S+)$", metrics, re.M)
        return after, lost, float(dropped.group(1)) if dropped else -1.0

    after, lost, dropped = asyncio.run(scenario())
    logged = {json.loads(line)["request_id"] for line in lines_of(log)}
    assert logged == after and not logged & lost and dropped == len(lost) == 7


def test_sigterm_drain_writes_every_line_and_stops_the_writer(tmp_path: Path) -> None:
    log = tmp_path / "access.log"

    async def scenario() -> tuple[set[str], int]:
        async with Plane() as plane, aiohttp.ClientSession() as session:
            gw = GatewayProcess(table(tmp_path, plane), "--access-log", str(log)).start()
            try:
                writer = writer_of(gw.proc.pid)
                answers = await asyncio.gather(
                    *(post(session, gw, "/production/predict", b"{}") for _ in range(200))
                )  # fmt: skip
            finally:
                assert gw.stop() == 0  # SIGTERM right after the last answer: lines still in flight
        assert [a[0] for a in answers] == [200] * 200
        return {a[1] for a in answers}, writer

    ids, writer = asyncio.run(scenario())
    assert {json.loads(line)["request_id"] for line in lines_of(log)} == ids
    assert not Path(f"/proc/{writer}").exists()  # the writer exited (and was reaped) with the gateway


def exited(pid: int) -> bool:
    """Whether the child `pid` has exited (a zombie until its parent reaps it, or gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def test_the_writer_runs_below_the_calls(tmp_path: Path) -> None:
    """The writer yields to the processes that serve calls: its niceness is the gateway's + NICE."""

    async def scenario() -> tuple[int, int]:
        async with Plane() as plane, aiohttp.ClientSession() as session:
            gw = GatewayProcess(table(tmp_path, plane), "--access-log", str(tmp_path / "a.log")).start()
            try:
                await post(session, gw, "/production/predict", b"{}")
                await until(lambda: len(lines_of(tmp_path / "a.log")) == 1)  # the writer is past its start
                return niceness(gw.proc.pid), niceness(writer_of(gw.proc.pid))
            finally:
                gw.stop()

    gateway, writer = asyncio.run(scenario())
    assert logwriter.NICE > 0 and writer == min(19, gateway + logwriter.NICE)


def niceness(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def writer_of(pid: int, default: int | None = None) -> int:
    """The pid of the access log writer process the gateway `pid` started."""
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            if b"gateway.obs.logwriter" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
        except OSError:  # it just exited
            continue
    if default is None:
        raise AssertionError(f"gateway {pid} runs no access log writer")
    return default


async def until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.05)


def test_formats_escape_what_the_client_controls() -> None:
    e = logged(entry(1, target='/p?q="x"\x01', agent="a\\b", first_byte=None))
    line = format_combined(e, OFFSET)
    assert '"POST /p?q=\\x22x\\x22\\x01 HTTP/1.1"' in line and '"a\\x5Cb"' in line and 'ttfb_ms="-"' in line
    assert "[14/Nov/2023:22:13:20 +0000]" in line and 'total_ms="2.000"' in line
    record = json.loads(format_json(e, OFFSET))
    assert record["target"] == '/p?q="x"\x01' and record["time"] == "2023-11-14T22:13:20.250Z"
    assert REQUEST_ID.match(record["request_id"]) and record["ttfb_ms"] is None and record["total_ms"] == 2.0


def test_an_async_run_logs_a_line_of_its_own(tmp_path: Path) -> None:
    from tests.test_async import ENV, AsyncPlane, async_doc, status_of

    log = tmp_path / "access.log"

    async def scenario() -> str:
        async with AsyncPlane() as plane, aiohttp.ClientSession() as session:
            config = write_table(tmp_path / "table.yaml", async_doc(plane.url))
            gw = GatewayProcess(config, "--queue-store", str(tmp_path / "q"), "--access-log", str(log), env=ENV)
            gw.start()
            try:
                status, request_id, _ = await post(session, gw, "/production/async_predict", b'{"model_input": {}}')
                assert status == 201
                async with asyncio.timeout(20):
                    while (await status_of(session, gw, request_id))["status"] != "SUCCEEDED":
                        await asyncio.sleep(0.05)
            finally:
                assert gw.stop() == 0
        return request_id

    request_id = asyncio.run(scenario())
    records = [json.loads(line) for line in lines_of(log)]
    run, submit = sorted((r for r in records if r["request_id"] == request_id), key=lambda r: r["protocol"])
    assert run["protocol"] == "async" and submit["protocol"] == "http" and submit["status"] == "201"
    assert run["status"] == "200" and run["target"] == "/predict" and run["deployment"] == "v1"
    assert run["bytes_in"] == len(b"{}") and run["bytes_out"] > 0 and run["upstream"].startswith("127.0.0.1:")
