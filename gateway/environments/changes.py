"""Small helpers shared by the admin API and the promotions: overlay entries, users of a deployment, JSON bodies."""

from __future__ import annotations

import json
from typing import Any

from gateway.environments.overlay import RUNNING
from gateway.errors import ClientError
from gateway.http.server import Request
from gateway.routing.model import Model

MAX_BODY = 1024 * 1024


def model_changes(overlay: dict[str, Any], model_id: str) -> dict[str, Any]:
    return overlay.setdefault("models", {}).setdefault(model_id, {})


def env_change(overlay: dict[str, Any], model_id: str, env: str, *, fresh: bool = False) -> dict[str, Any]:
    """The overlay entry of one environment, made when missing (`fresh`: created through the API)."""
    envs = model_changes(overlay, model_id).setdefault("environments", {})
    change = envs.get(env)
    if fresh or change is None or change.get("deleted"):
        change = envs[env] = {"replace": fresh, "set": {}}
    change.setdefault("set", {})
    return change


def set_status(overlay: dict[str, Any], model_id: str, dep_id: str, status: str) -> None:
    model_changes(overlay, model_id).setdefault("deployments", {}).setdefault(dep_id, {})["status"] = status


def env_entry(overlay: dict[str, Any], model_id: str, env: str) -> dict[str, Any]:
    """The overlay entry of one environment as stored ({} when the admin API never changed it); read only."""
    entry = overlay.get("models", {}).get(model_id, {}).get("environments", {}).get(env, {})
    return {} if entry.get("deleted") else entry


def latest_promotion(overlay: dict[str, Any], model_id: str, env: str) -> dict[str, Any] | None:
    return env_entry(overlay, model_id, env).get("promotion")


def promotion_settings(overlay: dict[str, Any], model_id: str, env: str) -> dict[str, Any]:
    """The environment's promotion settings written through the admin API (issue 12); {}: the defaults."""
    return env_entry(overlay, model_id, env).get("promotion_settings") or {}


def running_promotion(overlay: dict[str, Any], model_id: str, env: str) -> dict[str, Any] | None:
    promotion = latest_promotion(overlay, model_id, env)
    return promotion if promotion is not None and promotion["status"] in RUNNING else None


def deployment_users(model: Model, dep_id: str, overlay: dict[str, Any], *, leaving: str | None = None) -> list[str]:
    """What still sends traffic to a deployment: environments (current, canary, shadow) and promotions.

    `leaving`: an environment whose current deployment is being replaced (not counted as a user).
    """
    users = []
    for name, env in sorted(model.environments.items()):
        roles = [
            role
            for role, dep in (
                ("current", env.deployment),
                ("canary", env.canary.deployment if env.canary else None),
                ("shadow", env.shadow.deployment if env.shadow else None),
            )
            if dep is not None and dep.id == dep_id and not (role == "current" and name == leaving)
        ]
        promotion = running_promotion(overlay, model.id, name)
        if promotion is not None and promotion["deployment_id"] == dep_id and name != leaving:
            roles.append("promotion candidate")
        users += [f"environment '{name}' ({role})" for role in roles]
    return users


async def read_json(req: Request, allowed: set[str]) -> dict[str, Any]:
    """The request's JSON object (an empty body is `{}`); unknown keys are refused, like in the table."""
    data = await req.body.read_all(MAX_BODY)
    if not data.strip():
        return {}
    try:
        body = json.loads(data)
    except ValueError as exc:
        raise ClientError(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ClientError("the body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        expected = ", ".join(sorted(allowed)) or "no fields"
        raise ClientError(f"unknown field '{unknown[0][:64]}' (expected: {expected})")
    return body
