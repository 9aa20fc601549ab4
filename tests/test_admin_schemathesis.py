"""schemathesis against a live admin listener (issue 12): every operation of `GET /v1/openapi.json`,
with generated path arguments, queries and bodies, answers no 5xx and only what the document says
(status codes, content types, response schemas).

A real gateway process with a small table and a sample plane. Each operation runs twice: with
generated path arguments (mostly unknown names: the 404s), and with the table's names (the model,
its environments and deployments, its team), where the changes really happen; an operation with a
body also runs with bodies that break its schema (schemathesis's negative mode), and every one
runs with a model-scoped admin key too. Bounded by
`max_examples` (a few hundred calls in all), derandomized: the same cases every run.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks

from tests.support import GatewayProcess, running_gateway, write_table
from tests.test_admin_keys import MODEL_KEY, doc
from tests.test_environments import TestPlane

TOKEN = "schemathesis-admin"
KNOWN = {"model_id": "m1", "env_name": "staging", "deployment_id": "v2", "team_id": "acme", "api_key_prefix": "nope"}
CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_schema_conformance]  # fmt: skip
EXAMPLES = 6  # per operation with the table's names; half that with generated ones (mostly 404s)


def table(url: str) -> dict[str, Any]:
    d = doc(url)
    m1 = d["models"]["m1"]
    m1["deployments"].update({"v2": {"plane": "p"}, "dev": {"plane": "p", "development": True}})
    m1["environments"]["staging"] = {"deployment": "v1", "canary": {"deployment": "v2", "percent": 10}}
    return d


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    plane = TestPlane()
    config = write_table(tmp_path_factory.mktemp("st") / "table.yaml", table(plane.url))
    try:
        with running_gateway(config, "--admin-token", TOKEN) as gw:
            yield gw
    finally:
        plane.stop()


def live_schema(gw: GatewayProcess) -> Any:
    req = urllib.request.Request(gw.admin_url + "/v1/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.headers["content-type"].startswith("application/json")
        return schemathesis.openapi.from_dict(json.loads(r.read()))


def operations(gw: GatewayProcess) -> list[Any]:
    return [result.ok() for result in live_schema(gw).get_all_operations()]


def run(
    gw: GatewayProcess, operation: Any, path_parameters: dict[str, str] | None, examples: int,
    mode: schemathesis.GenerationMode = schemathesis.GenerationMode.POSITIVE, key: str = TOKEN,
) -> None:  # fmt: skip
    strategy = operation.as_strategy(mode, path_parameters=path_parameters)
    headers = {"Authorization": f"Bearer {key}"}

    @given(case=strategy)
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    def check(case: Any) -> None:
        case.call_and_validate(base_url=gw.admin_url, headers=headers, checks=CHECKS, timeout=10)

    check()


def test_every_operation_answers_as_documented(gateway: GatewayProcess) -> None:
    ops = operations(gateway)
    assert len(ops) == len(json.dumps(live_schema(gateway).raw_schema["paths"]).split('"operationId"')) - 1
    for operation in ops:
        known = {name: KNOWN[name] for name in KNOWN if "{" + name + "}" in operation.path}
        run(gateway, operation, None, EXAMPLES // 2 if known else EXAMPLES)
        if known:
            run(gateway, operation, known, EXAMPLES)
        if "requestBody" in operation.definition.raw:  # bodies the document refuses: 400, never a 5xx
            run(gateway, operation, known, EXAMPLES, schemathesis.GenerationMode.NEGATIVE)
        # A model-scoped admin key: its 403s, and its own calls on m1.
        run(gateway, operation, known, EXAMPLES // 2, key=MODEL_KEY)
    # The gateway is still whole: the admin token still manages it.
    assert gateway.admin("GET", "/v1/routing", TOKEN)[0] == 200
