"""gRPC calls to a scaled-to-zero deployment are held (SPEC §6): released by activation, with the
request data sent meanwhile; UNAVAILABLE after the hold timeout; DEADLINE_EXCEEDED at the client's
deadline; RESOURCE_EXHAUSTED past the bound; a cancelled held call leaves the hold. Real grpcio
clients and planes, a real HTTP plane receiving /wake, and the admin API's activate call.
"""

from __future__ import annotations

import re
import threading
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from tests.support import GatewayProcess, free_port, wait_for, write_table
from tests.test_environments import TestPlane
from tests.test_grpc import AUTH, HOST, WAIT, GrpcPlane, Lockstep, channel, table_doc, unary

V0 = AUTH + (("x-baseten-deployment", "v0"),)
TOKEN = "hold-token"


@pytest.fixture(scope="module")
def planes() -> Iterator[tuple[GrpcPlane, GrpcPlane, TestPlane]]:
    us, eu, http = GrpcPlane("us-east-1"), GrpcPlane("eu-west-1"), TestPlane()
    yield us, eu, http
    us.stop()
    eu.stop()
    http.stop()


def start(tmp_path: Path, planes, **gateway_settings: object) -> GatewayProcess:  # noqa: ANN001
    us, eu, http = planes
    doc = table_doc(us, eu, f"127.0.0.1:{free_port()}")
    doc["planes"]["us-east-1"]["url"] = http.url  # where /wake goes
    doc["gateway"].update(gateway_settings)
    http.wakes.clear()
    config = write_table(tmp_path / "table.yaml", doc)
    return GatewayProcess(config, "--admin-token", TOKEN, grpc_port=free_port()).start()


def held(gw: GatewayProcess) -> float:
    text = urllib.request.urlopen(gw.admin_url + "/metrics", timeout=WAIT).read().decode()
    found = re.search(r'gateway_held_requests\{[^}]*deployment="v0"[^}]*protocol="grpc"\} (\S+)', text)
    return float(found.group(1)) if found else 0.0


def test_a_held_call_is_released_by_activation_with_what_the_client_sent(tmp_path: Path, planes) -> None:  # noqa: ANN001
    gw = start(tmp_path, planes)
    try:
        feed = Lockstep()
        with channel(gw) as ch, futures.ThreadPoolExecutor(2) as pool:
            unary_call = pool.submit(unary(ch, "Echo").with_call, b"waiting", metadata=V0, timeout=30)
            summed = pool.submit(ch.stream_unary("/t.Plane/Sum"), iter(feed), metadata=V0, timeout=30)
            for _ in range(3):
                feed.send(b"x" * 1000)  # sent while held: kept, not lost
            wait_for(lambda: held(gw) == 2, "both calls to be held")
            wake = wait_for(lambda: planes[2].wakes, "the plane to be asked to wake v0")
            assert wake[0]["x-baseten-deployment-id"] == "v0" and wake[0]["x-baseten-model-id"] == "abc123"
            assert not unary_call.done()
            status, body = gw.admin("POST", "/v1/models/abc123/deployments/v0/activate", TOKEN)
            assert (status, body["status"]) == (200, "active")
            reply, call = unary_call.result(WAIT)
            feed.send(b"y" * 500)
            feed.close()
            assert summed.result(WAIT) == b'{"messages": 4, "bytes": 3500}'
        assert reply == b"waiting" and call.code() == grpc.StatusCode.OK
        assert ("x-baseten-deployment-id", "v0") in tuple(call.initial_metadata())
        assert held(gw) == 0
    finally:
        assert gw.stop() == 0


def test_hold_timeout_deadline_and_bound(tmp_path: Path, planes) -> None:  # noqa: ANN001
    gw = start(tmp_path, planes, hold_timeout_seconds=1.5, max_held_calls_per_deployment=1)
    try:
        with channel(gw) as ch, futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(unary(ch, "Echo"), b"a", metadata=V0, timeout=30)
            wait_for(lambda: held(gw) == 1, "the first call to be held")
            with pytest.raises(grpc.RpcError) as over:
                unary(ch, "Echo")(b"b", metadata=V0, timeout=30)
            assert over.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "too many calls are waiting" in over.value.details()
            with pytest.raises(grpc.RpcError) as timed_out:
                first.result(WAIT)
        assert timed_out.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "did not wake up within 1.5s" in timed_out.value.details()
        with channel(gw) as ch, pytest.raises(grpc.RpcError) as deadline:
            unary(ch, "Echo")(b"c", metadata=V0, timeout=0.5)  # the client's deadline comes first
        assert deadline.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: held(gw) == 0, "the hold to empty")
    finally:
        assert gw.stop() == 0


def test_a_cancelled_held_call_leaves_the_hold_and_others_still_go(tmp_path: Path, planes) -> None:  # noqa: ANN001
    gw = start(tmp_path, planes)
    try:
        with channel(gw) as ch:
            future = unary(ch, "Echo").future(b"gone", metadata=V0, timeout=30)
            wait_for(lambda: held(gw) == 1, "the call to be held")
            future.cancel()
            wait_for(lambda: held(gw) == 0, "the cancelled call to leave the hold")
            reply = unary(ch, "Echo")(b"still fine", metadata=AUTH, timeout=WAIT)  # production: active
        assert reply == b"still fine"
        done = threading.Event()
        with channel(gw, HOST) as ch:
            later = unary(ch, "Echo").future(b"later", metadata=V0, timeout=30)
            later.add_done_callback(lambda f: done.set())
            wait_for(lambda: held(gw) == 1, "a new held call")
            gw.admin("POST", "/v1/models/abc123/deployments/v0/activate", TOKEN)
            assert done.wait(WAIT) and later.result() == b"later"
    finally:
        assert gw.stop() == 0
