"""Looking things up in the serving table and showing them as the admin API does (SPEC §6)."""

from __future__ import annotations

from typing import Any

from gateway.environments.changes import latest_promotion
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


def environment_view(model: Model, env: Environment, overlay: dict[str, Any]) -> dict[str, Any]:
    """An environment as the admin API shows it (SPEC §6)."""
    promotion = latest_promotion(overlay, model.id, env.name)
    candidate = None
    if promotion is not None and promotion["status"] in RUNNING:
        dep = model.deployments.get(promotion["deployment_id"])
        candidate = deployment_view(dep) if dep is not None else None
    scaling = env.autoscaling
    return {
        "name": env.name,
        "model_id": model.id,
        "region": env.region,
        "current_deployment": deployment_view(env.deployment) if env.deployment is not None else None,
        "candidate_deployment": candidate,
        "in_progress_promotion": {
            "status": promotion["status"],
            "percent_traffic_to_new_version": promotion["percent"],
            "error_message": promotion.get("error_message"),
        }
        if promotion is not None
        else None,
        "autoscaling_settings": {
            "min_replica": scaling.min_replica,
            "max_replica": scaling.max_replica,
            "concurrency_target": scaling.concurrency_target,
        },
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
