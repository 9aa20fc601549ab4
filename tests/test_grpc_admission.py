"""gRPC calls go through the same admission as HTTP ones (issue 10, SPEC §6 backpressure).

`concurrency_target` x replicas counts the calls of every protocol in flight on a deployment:
a gRPC call in flight fills the slot for an HTTP call and the other way round; REJECT_ON_FULL
answers RESOURCE_EXHAUSTED (HTTP: 429) and QUEUE_ON_FULL holds the call until the slot frees.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from tests.support import GatewayProcess, free_port, running_gateway, wait_for, write_table
from tests.test_environments import TestPlane
from tests.test_grpc import AUTH, GrpcPlane, channel, table_doc, unary


@pytest.fixture(scope="module")
def planes() -> Iterator[tuple[GrpcPlane, GrpcPlane, TestPlane]]:
    us, eu, http = GrpcPlane("us-east-1"), GrpcPlane("eu-west-1"), TestPlane()
    yield us, eu, http
    us.stop()
    eu.stop()
    http.stop()


def limited(tmp_path: Path, planes, policy: str) -> Path:  # noqa: ANN001
    us, eu, http = planes
    doc = table_doc(us, eu, f"127.0.0.1:{free_port()}")
    doc["planes"]["us-east-1"]["url"] = http.url
    doc["models"]["abc123"]["environments"]["production"] = {
        "deployment": "v1", "autoscaling": {"concurrency_target": 1}, "backpressure": {"policy": policy},
    }  # fmt: skip
    return write_table(tmp_path / "table.yaml", doc)


def gauge(gw: GatewayProcess, name: str, protocol: str) -> float:
    text = urllib.request.urlopen(gw.admin_url + "/metrics", timeout=10).read().decode()
    pattern = rf'{name}\{{[^}}]*deployment="v1"[^}}]*protocol="{protocol}"[^}}]*\}} (\S+)'
    return sum(float(v) for v in re.findall(pattern, text))


def http_call(gw: GatewayProcess) -> tuple[int, str]:
    req = urllib.request.Request(
        gw.url + "/production/predict", data=b"{}", method="POST",
        headers={"Host": "model-abc123.api.example.com", "Authorization": "Api-Key demo-key-acme"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_reject_on_full_counts_grpc_calls_and_refuses_both_protocols(tmp_path: Path, planes) -> None:  # noqa: ANN001
    with running_gateway(limited(tmp_path, planes, "REJECT_ON_FULL"), grpc_port=free_port()) as gw:
        with channel(gw) as ch, futures.ThreadPoolExecutor(1) as pool:
            hanging = pool.submit(unary(ch, "Hang"), b"", metadata=AUTH, timeout=3)
            wait_for(lambda: gauge(gw, "gateway_inflight_requests", "grpc") == 1, "the gRPC call in flight")
            with pytest.raises(grpc.RpcError) as refused:
                unary(ch, "Echo")(b"second", metadata=AUTH, timeout=10)
            status, body = http_call(gw)  # the HTTP side sees the gRPC call in flight
            with pytest.raises(grpc.RpcError):
                hanging.result(10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "concurrency limit" in (refused.value.details() or "")
        assert status == 429 and "concurrency limit" in body
        wait_for(lambda: gauge(gw, "gateway_inflight_requests", "grpc") == 0, "the slot to free")
        assert http_call(gw)[0] == 200  # and a free slot lets both protocols through again
        with channel(gw) as ch:
            assert unary(ch, "Echo")(b"third", metadata=AUTH, timeout=10) == b"third"


def test_queue_on_full_holds_a_grpc_call_until_the_slot_frees(tmp_path: Path, planes) -> None:  # noqa: ANN001
    with running_gateway(limited(tmp_path, planes, "QUEUE_ON_FULL"), grpc_port=free_port()) as gw:
        with channel(gw) as ch, futures.ThreadPoolExecutor(2) as pool:
            hanging = pool.submit(unary(ch, "Hang"), b"", metadata=AUTH, timeout=3)
            wait_for(lambda: gauge(gw, "gateway_inflight_requests", "grpc") == 1, "the gRPC call in flight")
            queued = pool.submit(unary(ch, "Echo"), b"queued", metadata=AUTH, timeout=20)
            wait_for(lambda: gauge(gw, "gateway_held_requests", "grpc") == 1, "the second call to be held")
            assert not queued.done()
            with pytest.raises(grpc.RpcError) as ended:
                hanging.result(10)
            assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert queued.result(20) == b"queued"  # released by the freed slot, not failed
        assert gauge(gw, "gateway_held_requests", "grpc") == 0
