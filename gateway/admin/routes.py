"""Every operation of the admin listener, in one list that the admin app dispatches from and the
OpenAPI document (`gateway.admin.openapi`) is written from, so no route exists without its entry.

Adding an operation is one `Route` here (and its handler under the same name in a part's
`handlers()`); the paths are the platform SDK's where it has the call (docs/baseten-sdk-management-api.md).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import unquote

from gateway.admin.access import Access
from gateway.errors import EndpointNotFound, MethodNotAllowed

# A handler gets the request and the route's arguments; `access.CALLER` is set before it runs.
Handler = Callable[..., Awaitable[tuple[int, object]]]


@dataclass(frozen=True, slots=True)
class Route:
    """`handler`: the name a part registers it under; `extra`: arguments after the path's (e.g. a
    literal `production`); `response`/`body`: component schema names; `errors`: statuses besides 200
    and the ones every call can get (401/403 unless open)."""

    method: str
    path: str
    handler: str
    access: Access
    summary: str
    response: str | None
    body: str | None = None
    errors: tuple[int, ...] = ()
    extra: tuple[str, ...] = ()
    query: tuple[str, ...] = ()  # optional string query parameters
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # A path argument is one segment, decoded after the split (the SDK sends `/` as %2F, §0.3).
        regex = re.sub(r"\\\{[a-z_]+\\\}", "([^/]+)", re.escape(self.path))
        object.__setattr__(self, "pattern", re.compile(regex + r"\Z"))

    @property
    def params(self) -> list[str]:
        return re.findall(r"\{([a-z_]+)\}", self.path)


M = "/v1/models/{model_id}"
ENV = M + "/environments/{env_name}"
DEP = M + "/deployments/{deployment_id}"
NOT_FOUND = (404,)
CHANGE = (400, 404, 409)
A = Access

ROUTES: tuple[Route, ...] = (
    Route("GET", "/healthz", "healthz", A.OPEN, "Liveness", "Health"),
    Route("GET", "/readyz", "readyz", A.OPEN, "Readiness: 200 once the table is loaded and listeners are up", "Ready", errors=(503,)),
    Route("GET", "/metrics", "metrics", A.OPEN, "Prometheus metrics (text format 0.0.4)", None),
    Route("GET", "/v1/openapi.json", "openapi", A.ANY, "This document", "OpenApiDocument"),
    Route("GET", "/v1/routing", "routing", A.GATEWAY, "The serving table: version, digests, admin store", "Routing"),
    Route("POST", "/v1/routing/reload", "reload", A.GATEWAY, "Read the table file and the admin store again", "Reload", errors=(422,)),
    Route("GET", "/v1/async/queues", "async_queues", A.GATEWAY, "The async queues (404 when async is not served here)", "AsyncQueues", errors=NOT_FOUND),
    # models and deployments (the SDK's shapes)
    Route("GET", "/v1/models", "list_models", A.ANY, "Models within the caller's reach", "Models", query=("name",)),
    Route("GET", M, "read_model", A.MODEL, "A model", "Model", errors=NOT_FOUND),
    Route("GET", M + "/deployments", "list_deployments", A.MODEL, "A model's deployments", "Deployments", errors=NOT_FOUND, query=("name",)),
    Route("GET", M + "/deployments/production", "read_deployment", A.MODEL, "The production environment's deployment", "Deployment", errors=NOT_FOUND, extra=("production",)),
    Route("GET", M + "/deployments/development", "read_deployment", A.MODEL, "The development deployment", "Deployment", errors=NOT_FOUND, extra=("development",)),
    Route("GET", DEP, "read_deployment", A.MODEL, "A deployment", "Deployment", errors=NOT_FOUND),
    *(
        Route("POST", M + f"/deployments/{which}/{action}", "change_status", A.MODEL, f"{action.capitalize()} the {which} deployment",
              f"{action.capitalize()}Response", errors=CHANGE, extra=(which, action))
        for which in ("production", "development") for action in ("activate", "deactivate")
    ),
    Route("POST", DEP + "/activate", "change_status", A.MODEL, "Activate a deployment", "ActivateResponse", errors=CHANGE, extra=("activate",)),
    Route("POST", DEP + "/deactivate", "change_status", A.MODEL, "Deactivate a deployment (the kill switch)", "DeactivateResponse", errors=CHANGE, extra=("deactivate",)),
    # environments (SPEC §6, the SDK's shapes)
    Route("GET", M + "/environments", "list_environments", A.MODEL, "A model's environments", "Environments", errors=NOT_FOUND),
    Route("POST", M + "/environments", "create_environment", A.MODEL, "Create an environment", "Environment", "CreateEnvironmentBody", CHANGE),
    Route("GET", ENV, "read_environment", A.MODEL, "An environment", "Environment", errors=NOT_FOUND),
    Route("PATCH", ENV, "patch_environment", A.MODEL, "Change an environment's settings, canary, shadow", "UpdateEnvironmentResponse", "PatchEnvironmentBody", CHANGE),
    Route("DELETE", ENV, "delete_environment", A.MODEL, "Delete an environment", "EnvironmentTombstone", errors=CHANGE),
    Route("POST", ENV + "/promote", "promote", A.MODEL, "Promote a deployment into the environment", "Deployment", "PromoteBody", CHANGE),
    Route("POST", ENV + "/pause_promotion", "pause_promotion", A.MODEL, "Pause the running promotion", "SignalPromotionResponse", errors=CHANGE),
    Route("POST", ENV + "/resume_promotion", "resume_promotion", A.MODEL, "Resume a paused promotion", "SignalPromotionResponse", errors=CHANGE),
    Route("POST", ENV + "/cancel_promotion", "cancel_promotion", A.MODEL, "Cancel the running promotion", "CancelPromotionResponse", errors=CHANGE),
    Route("POST", ENV + "/force_cancel_promotion", "force_cancel_promotion", A.MODEL, "Cancel at once", "SignalPromotionResponse", errors=CHANGE),
    Route("POST", ENV + "/force_roll_forward_promotion", "force_roll_forward_promotion", A.MODEL, "Finish at once", "SignalPromotionResponse", errors=CHANGE),
    Route("POST", ENV + "/activate", "change_environment_status", A.MODEL, "Activate the environment's deployment", "ActivateResponse", errors=CHANGE, extra=("activate",)),
    Route("POST", ENV + "/deactivate", "change_environment_status", A.MODEL, "Deactivate the environment's deployment (the kill switch)", "DeactivateResponse", errors=CHANGE, extra=("deactivate",)),
    # deployment-level calls (the SDK's): promote into production, settings of the environments it serves
    Route("POST", M + "/deployments/development/promote", "promote_deployment", A.MODEL, "Promote the development deployment into production", "Deployment", "PromoteRequest", CHANGE, extra=("development",)),
    Route("POST", DEP + "/promote", "promote_deployment", A.MODEL, "Promote a deployment into production", "Deployment", "PromoteRequest", CHANGE),
    *(
        Route("PATCH", M + f"/deployments/{which}/autoscaling_settings", "patch_deployment_autoscaling", A.MODEL,
              f"Autoscaling settings of the environments the {which} deployment serves", "UpdateAutoscalingSettingsResponse",
              "UpdateAutoscalingSettings", CHANGE, extra=(which,))
        for which in ("production", "development")
    ),
    Route("PATCH", DEP + "/autoscaling_settings", "patch_deployment_autoscaling", A.MODEL, "Autoscaling settings of the environments a deployment serves", "UpdateAutoscalingSettingsResponse", "UpdateAutoscalingSettings", CHANGE),
    Route("PATCH", DEP + "/request_backpressure_settings", "patch_deployment_backpressure", A.MODEL, "Backpressure of the environments a deployment serves", "RequestBackpressureSettings", "UpdateRequestBackpressureSettings", CHANGE),
    # logs, metrics time series, replica startups: the SDK's empty shapes (none of them here)
    Route("GET", DEP + "/logs", "null_shape", A.MODEL, "No logs here (empty)", "GetLogsResponse", errors=NOT_FOUND, extra=("deployments", "logs")),
    Route("POST", DEP + "/logs", "null_shape", A.MODEL, "No logs here (empty)", "GetLogsResponse", "GetDeploymentLogsRequest", NOT_FOUND, extra=("deployments", "logs")),
    Route("GET", DEP + "/metrics", "null_shape", A.MODEL, "No metrics time series here (empty)", "GetModelMetricsResponse", errors=NOT_FOUND, extra=("deployments", "metrics")),
    Route("GET", DEP + "/startups", "null_shape", A.MODEL, "No replica startups here (empty)", "StartupAttempts", errors=NOT_FOUND, extra=("deployments", "startups")),
    Route("GET", DEP + "/startups/summary", "null_shape", A.MODEL, "No replica startups here (empty)", "StartupSummary", errors=NOT_FOUND, extra=("deployments", "startups/summary")),
    *(
        Route("GET", ENV + f"/{what}", "null_shape", A.MODEL, f"No {what} here (empty)", response, errors=NOT_FOUND, extra=("environments", what))
        for what, response in (("logs", "GetLogsResponse"), ("metrics", "GetModelMetricsResponse"), ("startups", "StartupAttempts"), ("startups/summary", "StartupSummary"))
    ),
    # teams and environment groups (the team's environment names, regional ones included)
    Route("GET", "/v1/teams/{team_id}/models", "list_team_models", A.ANY, "A team's models", "Models", errors=NOT_FOUND, query=("name",)),
    Route("GET", "/v1/environment_groups", "list_groups", A.ANY, "Environment groups within the caller's reach", "EnvironmentGroups"),
    Route("GET", "/v1/environment_groups/{env_name}", "read_group", A.ANY, "An environment group", "EnvironmentGroup", errors=(404, 409)),
    Route("PATCH", "/v1/environment_groups/{env_name}", "patch_group", A.ANY, "An environment group's access (unrestricted only)", "EnvironmentGroup", "UpdateEnvironmentGroupRequest", CHANGE),
    Route("GET", "/v1/teams/{team_id}/environment_groups", "list_team_groups", A.ANY, "A team's environment groups", "EnvironmentGroups", errors=NOT_FOUND),
    Route("GET", "/v1/teams/{team_id}/environment_groups/{env_name}", "read_team_group", A.ANY, "A team's environment group", "EnvironmentGroup", errors=NOT_FOUND),
    Route("PATCH", "/v1/teams/{team_id}/environment_groups/{env_name}", "patch_team_group", A.ANY, "A team's environment group's access (unrestricted only)", "EnvironmentGroup", "UpdateEnvironmentGroupRequest", CHANGE),
    # inference API keys (issue 12, the SDK's shapes)
    Route("GET", "/v1/api_keys", "list_api_keys", A.ANY, "Admin-created inference keys within the caller's reach (never the secret)", "APIKeys", query=("type",)),
    Route("POST", "/v1/api_keys", "create_api_key", A.ANY, "Create an inference key: the answer is the only time it is shown", "APIKey", "CreateApiKeyBody", (400, 404, 409)),
    Route("POST", "/v1/teams/{team_id}/api_keys", "create_team_api_key", A.ANY, "Create an inference key of this team", "APIKey", "CreateApiKeyBody", (400, 404, 409)),
    Route("DELETE", "/v1/api_keys/{api_key_prefix}", "revoke_api_key", A.ANY, "Revoke an inference key by prefix (or name)", "APIKeyTombstone", errors=(404, 409)),
)  # fmt: skip


def match(path: str, method: str, routes: tuple[Route, ...] = ROUTES) -> tuple[Route, tuple[str, ...]]:
    """The route for this call and its arguments (path arguments decoded, then `extra`); 404 or 405.
    The first match wins, so a literal segment (`deployments/production`) listed first beats an argument."""
    allowed: list[str] = []
    for route in routes:
        found = route.pattern.match(path)
        if found is None:
            continue
        if route.method == method:
            return route, tuple(unquote(arg) for arg in found.groups()) + route.extra
        if route.method not in allowed:
            allowed.append(route.method)
    if allowed:
        raise MethodNotAllowed(f"method {method[:16]} is not allowed on '{path[:128]}'", tuple(allowed))
    raise EndpointNotFound(f"no admin endpoint '{path[:128]}'")
