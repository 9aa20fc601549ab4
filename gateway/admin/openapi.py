"""The OpenAPI 3.1 document of the admin listener (`GET /v1/openapi.json`), written from the route list.

Responses of the platform SDK's calls use the SDK's own schemas (`sdk_schemas.json`, generated from its
pydantic models and checked against them by tests/test_openapi.py; the SDK is never imported here).
The gateway's answers may carry more keys than those (the older §6 keys): the SDK's schemas allow it.
Request bodies are the gateway's own: what it accepts, the SDK's fields and the §6 ones.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from gateway.admin.access import Access
from gateway.admin.routes import ROUTES, Route

SDK_SCHEMAS = Path(__file__).with_name("sdk_schemas.json")
ERROR_CODES = ["client_error", "unauthorized", "model_does_not_exist", "payload_too_large", "rate_limited",
               "model_unavailable", "model_not_ready", "timeout", "internal_error"]  # fmt: skip
STATUS_TEXT = {400: "Bad request (the problem is named)", 401: "Missing or unknown admin credentials",
               403: "The admin key does not reach this", 404: "Unknown model, environment, deployment or key",
               405: "Method not allowed", 409: "Conflict with the current state", 422: "The table is invalid",
               503: "Not ready"}  # fmt: skip


def _obj(properties: dict[str, Any], required: tuple[str, ...] = (), closed: bool = True) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    if closed:
        schema["additionalProperties"] = False
    return schema


def _ref(name: str, nullable: bool = False) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{name}"}
    return {"anyOf": [ref, {"type": "null"}]} if nullable else ref


STRING = {"type": "string"}
SPLIT = _obj({"deployment": STRING, "percent": {"type": "number", "minimum": 0, "maximum": 100},
              "max_body_bytes": {"type": "integer", "minimum": 0}}, ("deployment", "percent"))  # fmt: skip
RATE_LIMIT = _obj({"requests_per_second": {"type": "number", "exclusiveMinimum": 0},
                   "burst": {"type": "integer", "minimum": 1}, "max_concurrent": {"type": "integer", "minimum": 1},
                   "fleet_failure": {"enum": ["open", "closed"]}})  # fmt: skip
OWN_SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": _obj(
        {"error": STRING, "error_code": {"enum": ERROR_CODES}, "problems": {"type": "array", "items": STRING}},
        ("error", "error_code"),
        closed=False,
    ),  # fmt: skip
    "Health": _obj({"status": {"const": "ok"}}, ("status",), closed=False),
    "Ready": _obj({"status": STRING, "table": STRING}, ("status",), closed=False),
    "OpenApiDocument": _obj({"openapi": STRING, "paths": {"type": "object"}}, ("openapi", "paths"), closed=False),
    "Routing": _obj(
        {
            "version": {"type": "integer"},
            "digest": STRING,
            "file_digest": STRING,
            "admin_revision": {"type": "integer"},
            "generation": {"type": "integer"},
        },
        ("digest", "generation"),
        closed=False,
    ),  # fmt: skip
    "Reload": _obj(
        {"ok": {"type": "boolean"}, "changed": {"type": "boolean"}, "problems": {"type": "array", "items": STRING}},
        ("ok", "changed", "problems"),
        closed=False,
    ),  # fmt: skip
    "AsyncQueues": {"type": "object"},
    "CreateEnvironmentBody": _obj(
        {
            "name": STRING,
            "autoscaling_settings": _ref("UpdateAutoscalingSettings"),
            "request_backpressure_settings": _ref("UpdateRequestBackpressureSettings"),
        },
        ("name",),
    ),  # fmt: skip
    "PatchEnvironmentBody": _obj(
        {
            "autoscaling_settings": _ref("UpdateAutoscalingSettings"),
            "request_backpressure_settings": _ref("UpdateRequestBackpressureSettings"),
            "canary": {"anyOf": [SPLIT, {"type": "null"}]},
            "shadow": {"anyOf": [SPLIT, {"type": "null"}]},
            "backpressure": _obj({"policy": {"enum": ["QUEUE_ON_FULL", "REJECT_ON_FULL"]}}, ("policy",)),
        }
    ),  # fmt: skip
    "PromoteBody": _obj(
        {
            "deployment_id": STRING,
            "ramp_up_duration_seconds": {"type": "number", "minimum": 0},
            "smoke_check": _obj({"path": STRING, "body": {}, "expected_status": {"type": "integer"}}, ("path",)),
            "rollback": _obj(
                {
                    "max_5xx_percent": {"type": "number"},
                    "window_seconds": {"type": "number"},
                    "min_calls": {"type": "integer"},
                },
                ("max_5xx_percent", "window_seconds"),
            ),
            "scale_down_previous_deployment": {"type": "boolean"},
            "preserve_env_instance_type": {"type": "boolean"},
            "promotion_settings_override": {"type": "object"},
            "environment_settings_update": {"type": "object"},
        },
        ("deployment_id",),
    ),  # fmt: skip
    "CreateApiKeyBody": _obj(
        {
            "name": {"type": ["string", "null"]},
            "type": {"enum": ["WORKSPACE_INVOKE"]},
            "model_ids": {"type": ["array", "null"], "items": STRING},
            "team_id": {"type": ["string", "null"]},
            "environments": {"type": "array", "items": STRING},
            "rate_limit": RATE_LIMIT,
        },
        ("type",),
    ),  # fmt: skip
}


@functools.cache
def document() -> dict[str, Any]:
    """The whole document (built once: the route list is fixed)."""
    sdk = json.loads(SDK_SCHEMAS.read_text())["schemas"]
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = operation(route)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Regional inference gateway: admin API", "version": "1"},
        "paths": paths,
        "components": {
            "schemas": {**sdk, **OWN_SCHEMAS},
            "securitySchemes": {
                "admin": {"type": "http", "scheme": "bearer", "description": "--admin-token, or a table admin_keys key"}
            },  # fmt: skip
        },
    }


def operation(route: Route) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": operation_id(route), "summary": route.summary, "responses": responses(route)}
    params = [{"name": name, "in": "path", "required": True, "schema": STRING} for name in route.params]
    params += [{"name": name, "in": "query", "required": False, "schema": STRING} for name in route.query]
    if params:
        op["parameters"] = params
    if route.body is not None:
        op["requestBody"] = {"required": False, "content": {"application/json": {"schema": _ref(route.body)}}}
    op["security"] = [] if route.access is Access.OPEN else [{"admin": []}]
    op["x-access"] = route.access.value
    return op


def operation_id(route: Route) -> str:
    words = [w.strip("{}") for w in route.path.split("/")[2:] if w] if route.path.startswith("/v1/") else [route.path]
    return "_".join([route.method.lower(), *(w.strip("/") for w in words)])


def responses(route: Route) -> dict[str, Any]:
    if route.response is None:
        ok: dict[str, Any] = {"description": "OK", "content": {"text/plain": {"schema": STRING}}}
    else:
        ok = {"description": "OK", "content": {"application/json": {"schema": _ref(route.response)}}}
    statuses = set(route.errors)
    if route.access is not Access.OPEN:
        statuses |= {401, 403}
    if route.body is not None:
        statuses.add(400)
    out: dict[str, Any] = {"200": ok}
    for status in sorted(statuses):
        body = _ref("Reload") if status == 422 else _ref("Ready") if status == 503 else _ref("Error")
        out[str(status)] = {"description": STATUS_TEXT[status], "content": {"application/json": {"schema": body}}}
    return out
