"""Models, deployments and environments in the shapes of the platform's management API (issue 12).

The reference is the `baseten` SDK's `ManagementClient` (0.13.x): its pydantic models `Model`, `Models`,
`Deployment`, `Deployments` and `Environment` (docs/baseten-sdk-management-api.md §3.A-C). Every required key is
present, also the nullable ones (pydantic's "Field required" otherwise); extra keys are safe (no response
model forbids them). Facts the table does not have get a fixed value, listed in the README:

- `created_at`: the table records no creation times; `CREATED_AT` (the Unix epoch) is the same in
  every worker and across restarts, where a load time would differ between two calls;
- `instance_type_name`: no instance types here. `Deployment` allows null; `Model` needs a string;
- `labels`: `{}`; `region`: the plane's region, as `{"slug", "display_name"}` (both its name);
- an environment's `promotion_settings`: `PROMOTION_SETTINGS` with what the admin API stored for it
  (`promote_body.promotion_settings_update`; a promote call can override them for itself);
- an environment's `instance_type`: `NO_INSTANCE_TYPE_OBJECT` (required and non-null in the SDK; the
  gateway runs no replicas, so no instance types); `autoscaling_schedules`: null (none here);
- `traffic_routing`: the environment's `shadow` as one SHADOW rule (`shadow_rule`), then the admin
  API's unexpired rules (`traffic_rules`); null when there are none.

Pure functions over one table snapshot, so a list and its items agree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gateway.environments.traffic_rules import expiry, rule_view
from gateway.routing.model import Deployment, Environment, Model, Shadow, Table

PRODUCTION = "production"
CREATED_AT = "1970-01-01T00:00:00Z"  # RFC 3339 with a zone: the SDK's AwareDatetime refuses a naive time
NO_INSTANCE_TYPE = "n/a"  # Model.instance_type_name is a required non-null string
STATUS = {"active": "ACTIVE", "scaled_to_zero": "SCALED_TO_ZERO", "inactive": "INACTIVE"}  # the SDK's spelling
# The SDK's ModelPromotionSettings with this gateway's behaviour: a promotion switches at once unless the
# promote call asks for a ramp, and the previous deployment is scaled to zero (SPEC §6).
PROMOTION_SETTINGS = {
    "redeploy_on_promotion": False,
    "rolling_deploy": False,
    "promotion_cleanup_strategy": "SCALE_TO_ZERO",
    "rolling_deploy_config": None,
    "ramp_up_while_promoting": False,
    "ramp_up_duration_seconds": 600,  # the SDK's default: the ramp's length once ramp_up_while_promoting is set
}
NO_INSTANCE_TYPE_OBJECT = {"id": NO_INSTANCE_TYPE, "name": NO_INSTANCE_TYPE, "memory_limit_mib": 0,
                           "millicpu_limit": 0, "gpu_count": 0, "gpu_type": None, "gpu_memory_limit_mib": None}  # fmt: skip
SHADOW_RULE_ID = "shadow"  # the table holds one shadow per environment: its rule has this fixed id
NEVER = "9999-12-31T23:59:59Z"  # a table's shadow does not expire; the SDK's `expires_at` is required


def model_view(model: Model) -> dict[str, Any]:
    """A model as the SDK's `Model`."""
    production = production_deployment(model)
    return {
        "id": model.id,
        "name": model.id,
        "created_at": CREATED_AT,
        "deployments_count": len(model.deployments),
        "production_deployment_id": production.id if production is not None else None,
        "development_deployment_id": model.development.id if model.development is not None else None,
        "instance_type_name": NO_INSTANCE_TYPE,
        "team_name": model.team,
    }


def models_view(
    table: Table, name: str | None = None, team: str | None = None, reach: Callable[[Model], bool] | None = None
) -> dict[str, Any]:  # fmt: skip
    """`GET /v1/models`: every model, by id; `name` (the SDK's query filter) keeps the one so named;
    `team` (`GET /v1/teams/{team}/models`) keeps that team's; `reach` keeps the models an admin key
    manages (issue 12)."""
    ids = sorted(table.models) if name is None else [name] if name in table.models else []
    models = (table.models[model_id] for model_id in ids)
    return {
        "models": [
            model_view(model) for model in models
            if (team is None or model.team == team) and (reach is None or reach(model))
        ]
    }  # fmt: skip


def deployment_view(model: Model, dep: Deployment) -> dict[str, Any]:
    """A deployment as the SDK's `Deployment`, with `plane` kept from the older view (SPEC §6)."""
    env = serving_environment(model, dep)
    production = production_deployment(model)
    return {
        "id": dep.id,
        "name": dep.id,
        "created_at": CREATED_AT,
        "model_id": model.id,
        "is_production": production is not None and production.id == dep.id,
        "is_development": dep.development,
        "status": STATUS[dep.status],
        "active_replica_count": active_replicas(dep),
        "autoscaling_settings": autoscaling_view(env) if env is not None else None,
        "instance_type_name": None,
        "environment": env.name if env is not None else None,
        "labels": {},
        "region": {"slug": dep.region, "display_name": dep.region},
        "request_backpressure_settings": {"policy": env.backpressure if env is not None else None},
        "plane": dep.plane.name,
    }


def deployments_view(model: Model, name: str | None = None) -> dict[str, Any]:
    """`GET /v1/models/{id}/deployments`: every deployment, by id; `name` keeps the one so named."""
    ids = sorted(model.deployments) if name is None else [name] if name in model.deployments else []
    return {"deployments": [deployment_view(model, model.deployments[dep_id]) for dep_id in ids]}


def production_deployment(model: Model) -> Deployment | None:
    """The production environment's current deployment (None before its first promotion)."""
    env = model.environments.get(PRODUCTION)
    return env.deployment if env is not None else None


def serving_environment(model: Model, dep: Deployment) -> Environment | None:
    """The environment a deployment serves as its current deployment, or None.

    The SDK has one `environment` per deployment; here one deployment may serve several. Production
    wins, then the first by name, so the answer is stable. Canary and shadow shares do not count.
    """
    names = sorted(model.environments, key=lambda name: (name != PRODUCTION, name))
    for name in names:
        current = model.environments[name].deployment
        if current is not None and current.id == dep.id:
            return model.environments[name]
    return None


def active_replicas(dep: Deployment) -> int:
    """Replicas as the table counts them (listed endpoints, else `replicas`, else one); 0 unless active."""
    if dep.status != "active":
        return 0
    return len(dep.endpoints) or dep.replicas or 1


def autoscaling_view(env: Environment) -> dict[str, Any]:
    """The SDK's `AutoscalingSettings`. Its `concurrency_target` is a required int: 0 when the table
    sets none (no per-replica limit here); the platform's timing fields have no meaning here (null)."""
    scaling = env.autoscaling
    return {
        "min_replica": scaling.min_replica,
        "max_replica": scaling.max_replica,
        "concurrency_target": scaling.concurrency_target or 0,
        "autoscaling_window": None,
        "scale_down_delay": None,
        "target_utilization_percentage": None,
    }


def environment_view(
    model: Model,
    env: Environment,
    candidate: Deployment | None,
    promotion: dict[str, Any] | None,
    now: float = 0.0,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An environment as the SDK's `Environment`. `candidate`: a running promotion's deployment;
    `promotion`: the environment's latest promotion record (kept after it ends, as the platform does);
    `now`: Unix seconds, to leave out the rules that expired; `settings`: the environment's stored
    promotion settings (over `PROMOTION_SETTINGS`)."""
    rules = [shadow_rule(model, env.shadow)] if env.shadow is not None else []
    rules += [rule_view(rule) for rule in env.shadow_rules if expiry(rule.stored) > now]
    return {
        "name": env.name,
        "created_at": CREATED_AT,
        "model_id": model.id,
        "current_deployment": deployment_view(model, env.deployment) if env.deployment is not None else None,
        "candidate_deployment": deployment_view(model, candidate) if candidate is not None else None,
        "in_progress_promotion": promotion_view(promotion) if promotion is not None else None,
        "autoscaling_settings": autoscaling_view(env),
        "promotion_settings": {**PROMOTION_SETTINGS, **(settings or {})},
        "instance_type": dict(NO_INSTANCE_TYPE_OBJECT),
        "request_backpressure_settings": {"policy": env.backpressure},
        "autoscaling_schedules": None,
        "traffic_routing": {"rules": rules} if rules else None,
    }


def promotion_view(promotion: dict[str, Any]) -> dict[str, Any]:
    """The SDK's `InProgressPromotion`; a ramp moves traffic, not replicas: never a rolling deploy."""
    return {
        "status": promotion["status"],
        "percent_traffic_to_new_version": promotion["percent"],
        "error_message": promotion.get("error_message"),
        "rolling_deploy": False,
    }


def shadow_rule(model: Model, shadow: Shadow) -> dict[str, Any]:
    """An environment's shadow as the SDK's `TrafficRoutingRule`: sampled per call (RANDOM), never
    cancelled with the client's call (fire and forget, SPEC §6). `percent_traffic` is an int there:
    rounded; the exact share stays in the older `shadow` key."""
    return {
        "id": SHADOW_RULE_ID,
        "type": "SHADOW",
        "targets": [{"model_id": model.id, "deployment_id": shadow.deployment.id, "environment": None}],
        "percent_traffic": round(shadow.percent),
        "expires_at": NEVER,
        "sampling_mode": "RANDOM",
        "propagate_client_cancellation": False,
    }


# The SDK's answers for what has no meaning here (no replicas, builds or log store; the gateway's
# own metrics are Prometheus text at /metrics): its empty shapes, so a caller's code runs unchanged.
EMPTY_PAGE = {"pagination": {"has_more": False}}
NULL_SHAPES: dict[str, dict[str, Any]] = {
    "logs": {"logs": []},
    "metrics": {
        "start_epoch_millis": 0,
        "end_epoch_millis": 0,
        "mode": "CURRENT",
        "step_seconds": None,
        "metric_descriptors": [],
        "metric_values": [],
    },  # fmt: skip
    "startups": {"items": [], **EMPTY_PAGE, "total_count": 0},
    "startups/summary": {
        "start_epoch_millis": 0,
        "end_epoch_millis": 0,
        "phase_duration_ms": [],
        "total_duration_ms": {
            "sample_count": 0,
            "mean_ms": None,
            "p50_ms": None,
            "p90_ms": None,
            "p95_ms": None,
            "p99_ms": None,
        },
    },  # fmt: skip
}
