"""The ASGI front end (issue 13): the native server's integration tests, run against three fronts.

Each test below is the native test itself (imported, not copied): its `gw` is this module's, a real
server process on 127.0.0.1 for each front of `tests.fronts` (`gateway serve`, `uvicorn
gateway.asgi:app`, `hypercorn gateway.asgi:app`, `granian --interface asgi gateway.asgi:app`), reloaded through the same admin listener. The last
tests mount `gateway.asgi.create_app` inside a Starlette app with its own middleware.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests import test_canary, test_holding, test_proxy, test_websocket
from tests.dataplane import call, configure
from tests.fronts import FRONTS, AsgiProcess, running_front
from tests.planes import Plane
from tests.support import REPO, example_doc, free_port, write_table


@pytest.fixture(scope="module", params=FRONTS)
def gw(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    dead = f"http://127.0.0.1:{free_port()}"
    config = write_table(tmp_path_factory.mktemp(f"asgi-{request.param}") / "table.yaml", example_doc(dead, dead))
    with running_front(request.param, config) as front:
        yield front


# -- the same integration tests, over every front -------------------------------------------------

REUSED = {
    test_proxy: (
        # predict and sync/: paths, query, identity and x-forwarded-* (from the ASGI scope's client)
        "test_identity_and_forwarding_headers_replace_what_the_client_sent",
        "test_upstream_path_query_and_identity",
        "test_plane_answer_is_passed_through_unchanged",
        # streaming both ways, body limits, disconnects
        "test_sse_response_is_relayed_event_by_event",
        "test_chunked_upload_is_relayed_chunk_by_chunk",
        "test_body_exactly_at_the_limit_is_accepted",
        "test_declared_body_over_100_mib_is_refused_before_forwarding",
        "test_chunked_body_passing_100_mib_gets_413_and_aborts_the_plane_call",
        "test_client_disconnect_reaches_the_plane_and_the_gateway_keeps_serving",
        "test_client_disconnect_mid_upload_aborts_the_plane_call",
        "test_expect_100_continue_upload",
        "test_head_response_has_no_body_and_keeps_the_connection_usable",
        "test_200_concurrent_calls_get_their_own_answers",
        # auth errors, unknown model, wrong region, wrong method: the JSON error body
        "test_gateway_errors_are_json_and_forward_nothing",
        # plane failures: 503, 502, 504, and a truncated answer that must look truncated
        "test_plane_that_cannot_be_connected_to_gives_503",
        "test_plane_that_breaks_the_call_before_answering_gives_502",
        "test_plane_that_closes_mid_body_gives_a_truncated_response",
        "test_response_start_timeout_gives_504",
    ),
    test_websocket: (
        "test_every_target_form_relays_text_and_binary",
        "test_failures_are_answered_before_the_upgrade",
        "test_a_client_vanishing_tears_down_the_plane_side",
        "test_the_plane_vanishing_tears_down_the_client_side",
        "test_a_scaled_to_zero_target_holds_the_upgrade_until_it_is_active",
    ),
    test_holding: (  # holds (scale from zero, wake) and backpressure
        "test_a_held_call_is_released_when_its_deployment_becomes_active",
        "test_a_client_vanishing_while_held_is_dropped",
        "test_a_held_call_times_out_with_503_and_retry_after",
        "test_a_held_body_is_not_lost",
        "test_queue_on_full_holds_the_call_until_a_slot_frees",
        "test_reject_on_full_answers_429_at_once",
    ),
    test_canary: ("test_the_side_is_sticky_per_routing_key_and_per_api_key",),  # canary and x-baseten-deployment-id
}
for _module, _names in REUSED.items():
    for _name in _names:
        globals()[_name] = getattr(_module, _name)  # collected here, so they take this module's `gw`


# What a front's ASGI server cannot carry, case by case: a strict xfail (it fails once the server can).
LIMITS = {
    # Hypercorn 0.18 answers the client's close frame itself and tells the app `code: 1006`
    # (ws_stream.py, StreamClosed), so the client's code cannot reach the plane.
    ("hypercorn", "test_close_codes_and_reasons_pass_both_ways"): "hypercorn does not pass the client's close code",
    # granian 2.8.7's `websocket.disconnect` has the client's code and no `reason`.
    ("granian", "test_close_codes_and_reasons_pass_both_ways"): "granian does not pass the client's close reason",
    # granian 2.8.7 drops the `headers` of `websocket.accept`: no x-baseten-request-id or
    # x-baseten-deployment-id on the 101 (the session itself is relayed; the other asserts pass).
    ("granian", "test_every_target_form_relays_text_and_binary"): "granian drops websocket.accept headers",
    ("granian", "test_a_scaled_to_zero_target_holds_the_upgrade_until_it_is_active"): (
        "granian drops websocket.accept headers"
    ),
    # granian 2.8.7 has no `websocket.http.response` (ASGI denial response): the gateway closes
    # with 1008 before accepting, and granian answers a bare 403 in place of the JSON error.
    ("granian", "test_failures_are_answered_before_the_upgrade"): "granian has no websocket denial response",
    # granian 2.8.7 holds an app's `websocket.close` while a `receive()` is pending (the relay always
    # has one) until the client itself closes: the plane's going away does not reach the client.
    ("granian", "test_the_plane_vanishing_tears_down_the_client_side"): (
        "granian does not send websocket.close while receive() is pending"
    ),
}


@pytest.fixture(autouse=True)
def _front_limits(request: pytest.FixtureRequest) -> None:
    callspec = getattr(request.node, "callspec", None)
    front = callspec.params.get("gw") if callspec is not None else None
    reason = LIMITS.get((front, request.node.originalname))
    if reason is not None:
        request.applymarker(pytest.mark.xfail(reason=reason, strict=True))


test_close_codes_and_reasons_pass_both_ways = test_websocket.test_close_codes_and_reasons_pass_both_ways


test_failures_are_answered_before_the_upgrade = test_websocket.test_failures_are_answered_before_the_upgrade
test_a_client_vanishing_tears_down_the_plane_side = test_websocket.test_a_client_vanishing_tears_down_the_plane_side
test_the_plane_vanishing_tears_down_the_client_side = test_websocket.test_the_plane_vanishing_tears_down_the_client_side
test_a_scaled_to_zero_target_holds_the_upgrade_until_it_is_active = (
    test_websocket.test_a_scaled_to_zero_target_holds_the_upgrade_until_it_is_active
)
# holds (scale from zero) and backpressure
test_a_held_call_is_released_when_its_deployment_becomes_active = (
    test_holding.test_a_held_call_is_released_when_its_deployment_becomes_active
)
test_a_client_vanishing_while_held_is_dropped = test_holding.test_a_client_vanishing_while_held_is_dropped
test_reject_on_full_answers_429_at_once = test_holding.test_reject_on_full_answers_429_at_once
# canary split and x-baseten-deployment-id
test_the_side_is_sticky_per_routing_key_and_per_api_key = (
    test_canary.test_the_side_is_sticky_per_routing_key_and_per_api_key
)


# -- mounted in a platform team's own app ----------------------------------------------------------


@pytest.fixture(scope="module")
def mounted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AsgiProcess]:
    dead = f"http://127.0.0.1:{free_port()}"
    config = write_table(tmp_path_factory.mktemp("asgi-mounted") / "table.yaml", example_doc(dead, dead))
    gw = AsgiProcess(config, "uvicorn", app="tests.asgi_mounted:app").start()
    try:
        yield gw
    finally:
        gw.stop()


def test_mounted_under_starlette_the_middleware_runs_and_the_call_is_relayed(mounted: AsgiProcess) -> None:
    async def scenario() -> None:
        async with Plane() as plane, aiohttp.ClientSession() as session:
            configure(mounted, example_doc(plane.url, plane.url))
            status, headers, body = await call(session, mounted, "/gw/production/predict?q=2", body=b'{"n": 1}')
            assert status == 200 and headers["x-baseten-deployment-id"] == "v1"
            assert headers["x-platform"].isdigit()  # the platform's middleware wrapped the gateway's answer
            echo = json.loads(body)
            assert (echo["path"], echo["body"]) == ("/predict?q=2", '{"n": 1}')  # the mount prefix is not forwarded
            assert dict(echo["headers"])["x-baseten-request-id"] == headers["x-baseten-request-id"]

            status, headers, body = await call(
                session, mounted, "/gw/production/predict", headers={"Authorization": ""}
            )
            assert status == 401 and json.loads(body)["error_code"] == "unauthorized" and "x-platform" in headers

            async with session.get(mounted.url + "/platform/health") as resp:  # the platform's own route
                assert (resp.status, await resp.text()) == (200, "platform ok")
            assert [r for r in plane.requests if r[1] != "/wake"] == [("POST", "/predict?q=2")]

    asyncio.run(scenario())


def test_the_app_refuses_to_start_without_a_table(tmp_path: Path) -> None:
    """`gateway.asgi:app` without GATEWAY_CONFIG: the server reports why and exits non-zero."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "uvicorn", "gateway.asgi:app", "--port", str(free_port()), "--lifespan", "on"],
        env={k: v for k, v in __import__("os").environ.items() if k != "GATEWAY_CONFIG"},
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "set GATEWAY_CONFIG" in proc.stderr + proc.stdout
