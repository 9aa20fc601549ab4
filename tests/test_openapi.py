"""The OpenAPI 3.1 document of the admin API (`GET /v1/openapi.json`, issue 12).

The document is written from the route list the admin app dispatches from, so a route cannot be
served without its entry; these tests also fail when a handler is registered that no route names, when
the SDK's schemas in `gateway/admin/sdk_schemas.json` drift from the installed SDK's pydantic models,
or when a route the SDK also has answers another shape than the SDK's. The live run against every
operation is tests/test_admin_schemathesis.py.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator
from pydantic.json_schema import models_json_schema

from gateway.admin.openapi import SDK_SCHEMAS, document
from gateway.admin.routes import ROUTES
from gateway.environments.control import ControlPlane
from gateway.metrics import Metrics
from gateway.state import TableState
from tests.support import REPO, write_table
from tests.test_admin_keys import doc


def sdk_components(roots: list[str]) -> dict:
    """The SDK's pydantic models as JSON Schemas with OpenAPI component references (test time only)."""
    from baseten.client.managementapi import _models

    models = [(getattr(_models, name), "validation") for name in roots]
    _, schemas = models_json_schema(models, ref_template="#/components/schemas/{model}")  # type: ignore[arg-type]
    return schemas["$defs"]


def test_every_route_has_its_operation() -> None:
    paths = document()["paths"]
    for route in ROUTES:
        operation = paths[route.path][route.method.lower()]
        assert "200" in operation["responses"] and operation["summary"]
        assert [p["name"] for p in operation.get("parameters", ()) if p["in"] == "path"] == route.params
    assert sum(len(methods) for methods in paths.values()) == len(ROUTES)
    ids = [op["operationId"] for methods in paths.values() for op in methods.values()]
    assert len(ids) == len(set(ids))


def test_every_served_handler_is_in_the_route_list(tmp_path: Path) -> None:
    # A handler no route names would be unreachable, and one a route names but nobody serves would 404.
    state = TableState(str(write_table(tmp_path / "t.yaml", doc())), Metrics())
    control = ControlPlane(state, Metrics(), dict, token="t", ready=lambda: True)
    control.admin.serve_async(type("Queues", (), {"queues": lambda self: {}})())
    served = set(control.admin.handlers)
    named = {route.handler for route in ROUTES}
    assert served == named, (served - named, named - served)


def test_every_reference_resolves_and_every_schema_is_valid() -> None:
    document_ = document()
    schemas = document_["components"]["schemas"]
    for schema in schemas.values():
        Draft202012Validator.check_schema(schema)
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(document_)))
    assert refs <= set(schemas), refs - set(schemas)
    assert document_["openapi"] == "3.1.0"


def test_the_sdk_schemas_are_the_sdks() -> None:
    stored = json.loads(SDK_SCHEMAS.read_text())
    assert stored["schemas"] == sdk_components(stored["roots"]), "regenerate: python tests/test_openapi.py"


CELL = r"(?:[^|\\]|\\\|)+"  # a table cell, where `\|` is a pipe inside it
SDK_ROW = re.compile(
    rf"^\| [A-Z] \| (GET|POST|PATCH|DELETE|PUT) \| `([^`]+)` \| `\w+` \| (\d+) \|{CELL}\|{CELL}\| (\w+|—) \|$"
)


def sdk_operations() -> dict[tuple[str, str], tuple[int, str]]:
    """(method, path) -> (success status, response model or `—`), from docs/baseten-sdk-management-api.md
    (extracted from the SDK's generated client)."""
    text = (REPO / "docs" / "baseten-sdk-management-api.md").read_text()
    rows = (SDK_ROW.match(line) for line in text.splitlines())
    return {(m[1], m[2]): (int(m[3]), m[4]) for m in rows if m is not None}


def test_routes_the_sdk_has_answer_the_sdks_shapes() -> None:
    sdk = sdk_operations()
    shared = [route for route in ROUTES if (route.method, route.path) in sdk]
    own = {route.path for route in ROUTES if route not in shared}  # the gateway's operations (SPEC §11)
    assert own == {"/healthz", "/readyz", "/metrics", "/v1/openapi.json", "/v1/routing", "/v1/routing/reload",
                   "/v1/async/queues"}  # fmt: skip
    for route in shared:
        status, response = sdk[(route.method, route.path)]
        # `—`: the SDK's client has no response model for the call (it returns the JSON as is)
        assert status == 200 and response in (route.response, "—"), route


@pytest.mark.parametrize("name", ["Error", "Routing", "CreateApiKeyBody", "PatchEnvironmentBody"])
def test_own_schemas_accept_real_answers(name: str) -> None:
    samples = {
        "Error": {"error": "unknown model 'x'", "error_code": "model_does_not_exist"},
        "Routing": {"digest": "ab", "generation": 1, "version": 1, "models": 3},
        "CreateApiKeyBody": {"type": "WORKSPACE_INVOKE", "model_ids": ["m1"], "rate_limit": {"burst": 2}},
        "PatchEnvironmentBody": {"canary": None, "backpressure": {"policy": "REJECT_ON_FULL"}},
    }
    schema = {**document()["components"]["schemas"][name], "$defs": {}}
    Draft202012Validator(json.loads(json.dumps(schema).replace("#/components/schemas/", "#/$defs/"))).validate(
        samples[name]
    )


if __name__ == "__main__":  # regenerate gateway/admin/sdk_schemas.json from the installed SDK
    stored = json.loads(SDK_SCHEMAS.read_text())
    stored["schemas"] = sdk_components(stored["roots"])
    SDK_SCHEMAS.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
    sys.exit(0)
