"""Looking things up in the serving table and showing them as the admin API does (SPEC §6, issue 12)."""

from __future__ import annotations

import time
from typing import Any

from gateway.environments import sdk_views
from gateway.environments.changes import latest_promotion, promotion_settings
from gateway.environments.overlay import RUNNING
from gateway.errors import ModelNotFound
from gateway.routing.model import Deployment, Environment, Model, Table


def find_model(table: Table, model_id: str) -> Model:
    model = table.models.get(model_id)
    if model is None:
        raise ModelNotFound(f"model '{model_id[:64]}' not found")
    return model


def find_environment(model: Model, env: str) -> Environment:
    found = model.environments.get(env)
    if found is None:
        raise ModelNotFound(f"environment '{env[:64]}' of model '{model.id}' not found")
    return found


def find_deployment(model: Model, dep_id: str) -> Deployment:
    dep = model.deployments.get(dep_id)
    if dep is None:
        raise ModelNotFound(f"deployment '{dep_id[:64]}' of model '{model.id}' not found")
    return dep


def environment_view(
    model: Model, env: Environment, overlay: dict[str, Any], now: float | None = None
) -> dict[str, Any]:
    """An environment as the admin API shows it: the SDK's `Environment` (issue 12, `sdk_views`) with the
    older keys of SPEC §6 that do not clash with it (`region`, `canary`, `shadow`, `backpressure`)."""
    promotion = latest_promotion(overlay, model.id, env.name)
    candidate = None
    if promotion is not None and promotion["status"] in RUNNING:
        candidate = model.deployments.get(promotion["deployment_id"])
    return {
        **sdk_views.environment_view(
            model,
            env,
            candidate,
            promotion,
            time.time() if now is None else now,
            promotion_settings(overlay, model.id, env.name),
        ),
        "region": env.region,
        "canary": {"deployment": env.canary.deployment.id, "percent": env.canary.percent} if env.canary else None,
        "shadow": {
            "deployment": env.shadow.deployment.id,
            "percent": env.shadow.percent,
            "max_body_bytes": env.shadow.max_body_bytes,
        }
        if env.shadow
        else None,  # fmt: skip
        "backpressure": {"policy": env.backpressure},
    }


def deployment_view(dep: Deployment) -> dict[str, Any]:
    return {"id": dep.id, "model_id": dep.model_id, "status": dep.status, "plane": dep.plane.name, "region": dep.region}
