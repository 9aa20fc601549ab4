"""One retry on another replica after a reset (SPEC §12 `retry_on_reset`, issue 10).

Two replicas behind one deployment: `dying` reads each request whole and then drops the
connection without a byte of answer (a replica killed mid-call); `healthy` answers with what it
received. A predict call that lands on `dying` is sent again to `healthy` with the same
`x-baseten-request-id` and the same body; with `retry_on_reset: false`, or a body over 1 MiB,
the client gets the 502 instead.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml

from gateway.routing.loader import compile_table
from tests.planes import LoggingPlane
from tests.support import EXAMPLE, KEY_HEADER, loader_problems, running_gateway, write_table


class Replica(LoggingPlane):
    """A raw HTTP/1.1 replica that logs (request id, body) and answers or drops the connection
    (LoggingPlane's server, another `_serve`)."""

    def __init__(self, answers: bool) -> None:
        super().__init__()
        self.answers = answers
        self.seen: list[tuple[str, bytes]] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                fields = dict(
                    line.split(b": ", 1) for line in head.lower().split(b"\r\n")[1:] if b": " in line
                )  # fmt: skip
                body = await LoggingPlane._body(reader, head)  # Content-Length or chunked
                request_id = fields[b"x-baseten-request-id"].decode()
                self.seen.append((request_id, body))
                if not self.answers:
                    writer.transport.abort()  # killed mid-call: nothing of an answer
                    return
                answer = json.dumps({"request_id": request_id, "bytes": len(body)}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(answer), answer))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def table(tmp_path: Path, dying: Replica, healthy: Replica, retry: bool | None) -> Path:
    doc = yaml.safe_load(EXAMPLE.read_text())
    dep = doc["models"]["abc123"]["deployments"]["v1"]
    dep["endpoints"] = [dying.url, healthy.url]
    if retry is not None:
        dep["retry_on_reset"] = retry
    return write_table(tmp_path / "t.yaml", doc)


async def post(
    port: int, body: bytes, chunked: bool = False, path: str = "/production/predict"
) -> tuple[int, dict, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    framing = b"Transfer-Encoding: chunked\r\n" if chunked else b"Content-Length: %d\r\n" % len(body)
    payload = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if chunked else body
    writer.write(
        b"POST %s HTTP/1.1\r\nHost: model-abc123.api.example.com\r\n" % path.encode()
        + b"Authorization: " + KEY_HEADER["Authorization"].encode() + b"\r\n" + framing
        + b"Connection: close\r\n\r\n" + payload
    )  # fmt: skip
    async with asyncio.timeout(20):
        raw = await reader.read(-1)
    writer.close()
    head, _, answer = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, answer


@pytest.mark.parametrize(
    ("chunked", "path"),
    [(False, "/production/predict"), (True, "/production/predict"), (False, "/production/sync/v1/chat/completions")],
    ids=["content-length", "chunked", "sync"],
)
def test_a_call_on_a_replica_that_dies_is_retried_on_another_with_the_same_id(
    tmp_path: Path, chunked: bool, path: str
) -> None:
    async def scenario() -> tuple[list, Replica, Replica]:
        async with Replica(answers=False) as dying, Replica(answers=True) as healthy:
            with running_gateway(table(tmp_path, dying, healthy, None)) as gw:
                answers = [await post(gw.port, b'{"n": %d}' % i, chunked, path) for i in range(20)]
        return answers, dying, healthy

    answers, dying, healthy = asyncio.run(scenario())
    assert [status for status, _, _ in answers] == [200] * 20  # no call failed
    assert dying.seen, "p2c over 20 calls lands on the dying replica at least once"
    retried = {request_id: body for request_id, body in dying.seen}
    by_id = dict(healthy.seen)
    for request_id, body in retried.items():
        assert by_id[request_id] == body  # the same call, the same id, the whole body
    for _, headers, answer in answers:
        assert json.loads(answer)["request_id"] == headers["x-baseten-request-id"]


def test_retry_on_reset_false_answers_the_502(tmp_path: Path) -> None:
    async def scenario() -> tuple[list, Replica, Replica]:
        async with Replica(answers=False) as dying, Replica(answers=False) as also_dying:
            with running_gateway(table(tmp_path, dying, also_dying, False)) as gw:
                answers = [await post(gw.port, b"{}") for _ in range(3)]
        return answers, dying, also_dying

    answers, dying, also_dying = asyncio.run(scenario())
    assert [status for status, _, _ in answers] == [502] * 3
    assert len(dying.seen) + len(also_dying.seen) == 3  # each call tried once


def test_a_body_over_one_mib_is_not_kept_and_not_retried(tmp_path: Path) -> None:
    async def scenario() -> tuple[list, Replica, Replica]:
        async with Replica(answers=False) as dying, Replica(answers=False) as also_dying:
            with running_gateway(table(tmp_path, dying, also_dying, None)) as gw:
                answers = [await post(gw.port, b"x" * (1024 * 1024 + 1)) for _ in range(2)]
        return answers, dying, also_dying

    answers, dying, also_dying = asyncio.run(scenario())
    assert [status for status, _, _ in answers] == [502] * 2
    assert len(dying.seen) + len(also_dying.seen) == 2


def test_the_setting_is_checked_and_defaults_on() -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    table = compile_table(doc)
    assert table.models["abc123"].deployments["v1"].retry_on_reset is True
    doc["models"]["abc123"]["deployments"]["v1"]["retry_on_reset"] = False
    assert compile_table(doc).models["abc123"].deployments["v1"].retry_on_reset is False
    doc["models"]["abc123"]["deployments"]["v1"]["retry_on_reset"] = "yes"
    assert [p for p in loader_problems(doc) if "retry_on_reset" in p]
