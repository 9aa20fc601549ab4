"""The ASGI front end (issue 13), continued: native tests that want a gateway of their own per test
(shadow counters from zero, replicas that die), run against every front of `tests.fronts`.

As in tests/test_asgi.py the tests are the native ones, imported by name; here `gw` is a fresh
front per test, and the retry tests' own `running_gateway` starts the front under test.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import test_retry_on_reset, test_shadow
from tests.fronts import FRONTS, running_front
from tests.support import GatewayProcess, example_doc, write_table


@pytest.fixture(params=FRONTS)
def front(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(test_retry_on_reset, "running_gateway", functools.partial(running_front, request.param))
    return request.param


@pytest.fixture
def gw(front: str, tmp_path: Path) -> Iterator[GatewayProcess]:
    doc = example_doc("http://127.0.0.1:9", "http://127.0.0.1:9")
    with running_front(front, write_table(tmp_path / "table.yaml", doc)) as gateway:
        yield gateway


@pytest.fixture(autouse=True)
def _on_the_front(front: str) -> None:
    """Every test here runs on the front under test, whether it asks for `gw` or starts its own."""


REUSED = {
    test_shadow: (  # shadow copies: fire and forget, the cap, failures never reach the client
        "test_the_client_is_answered_while_the_shadow_is_still_blocked",
        "test_a_body_over_the_cap_is_not_shadowed",
        "test_a_failing_shadow_never_affects_the_client",
    ),
    test_retry_on_reset: (  # SPEC §12 retry_on_reset: one retry on another replica, the same request id
        "test_a_call_on_a_replica_that_dies_is_retried_on_another_with_the_same_id",
        "test_retry_on_reset_false_answers_the_502",
    ),
}
for _module, _names in REUSED.items():
    for _name in _names:
        globals()[_name] = getattr(_module, _name)  # collected here, so they take this module's fixtures
