"""The ASGI front end (issue 13): the native server's integration tests, run against three fronts.

Each test below is the native test itself (imported, not copied): its `gw` is this module's, a real
server process on 127.0.0.1 for each front of `tests.fronts` (`gateway serve`, `uvicorn
gateway.asgi:app`, `hypercorn gateway.asgi:app`), reloaded through the same admin listener. The last
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
from tests.dataplane import STD, call, configure
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

# predict and sync/: paths, query, identity and x-forwarded-* (from the ASGI scope's client)
test_identity_and_forwarding_headers_replace_what_the_client_sent = (
    test_proxy.test_identity_and_forwarding_headers_replace_what_the_client_sent
)
test_upstream_path_query_and_identity = test_proxy.test_upstream_path_query_and_identity
test_plane_answer_is_passed_through_unchanged = test_proxy.test_plane_answer_is_passed_through_unchanged
# streaming both ways
test_sse_response_is_relayed_event_by_event = test_proxy.test_sse_response_is_relayed_event_by_event
test_chunked_upload_is_relayed_chunk_by_chunk = test_proxy.test_chunked_upload_is_relayed_chunk_by_chunk
test_body_exactly_at_the_limit_is_accepted = test_proxy.test_body_exactly_at_the_limit_is_accepted
test_declared_body_over_100_mib_is_refused_before_forwarding = (
    test_proxy.test_declared_body_over_100_mib_is_refused_before_forwarding
)
test_client_disconnect_reaches_the_plane_and_the_gateway_keeps_serving = (
    test_proxy.test_client_disconnect_reaches_the_plane_and_the_gateway_keeps_serving
)
# auth errors, unknown model, wrong region, wrong method: the JSON error body
test_gateway_errors_are_json_and_forward_nothing = test_proxy.test_gateway_errors_are_json_and_forward_nothing
# WebSocket
test_every_target_form_relays_text_and_binary = test_websocket.test_every_target_form_relays_text_and_binary


def test_close_codes_and_reasons_pass_both_ways(gw, request: pytest.FixtureRequest) -> None:  # noqa: ANN001
    if getattr(gw, "server", None) == "hypercorn":
        # Hypercorn 0.18 answers the client's close frame itself and tells the app `code: 1006`
        # (ws_stream.py, StreamClosed), so the client's code cannot reach the plane; strict: fails once fixed.
        request.applymarker(pytest.mark.xfail(reason="hypercorn does not pass the client's close code", strict=True))
    test_websocket.test_close_codes_and_reasons_pass_both_ways(gw)


test_failures_are_answered_before_the_upgrade = test_websocket.test_failures_are_answered_before_the_upgrade
test_a_client_vanishing_tears_down_the_plane_side = test_websocket.test_a_client_vanishing_tears_down_the_plane_side
test_the_plane_vanishing_tears_down_the_client_side = (
    test_websocket.test_the_plane_vanishing_tears_down_the_client_side
)
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
