"""Traffic routing rules (issue 12): the SDK's shadow rules, written by `PATCH .../environments/{env}`.

The SDK's `UpdateEnvironmentRequest.traffic_routing_settings` is `{"rules": [TrafficRoutingRuleUpsert]?,
"delete_rules": [id]?}`: deletes first, then each rule is a complete create (no `id`) or replace (an
existing `id`; a replace keeps its target). An upsert names one target, a deployment or an
environment; this gateway also takes a `model_id` in the target (the SDK's response shape has one),
so a rule can copy traffic to any model of the same team:

- `{"deployment_id": D}`: this model's D, else the team's one model that has a deployment D;
- `{"environment": E}`: this model's environment E (another model's with `model_id`); the copies
  go to whatever deployment E serves, followed through its promotions.

The rules are kept in the admin store beside the environment's other changes (`traffic_routing`),
and the overlay composes them into `Environment.shadow_rules` (`compose_rules`), where the same
checks as for a table's shadow hold: the team, and residency (a regional environment's copies stay
in its region). A target that was deleted later leaves the rule in place with no target (the SDK's
"empty if the target has been deleted"), sending nothing.

Pure functions: the caller passes the table, the clock and the id maker.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from gateway.errors import InvalidChange
from gateway.routing.model import Deployment, Environment, Model, Shadow, ShadowRule

MAX_AHEAD_SECONDS = 7 * 24 * 3600  # TrafficRoutingRuleUpsert.expires_at: "at most 7 days out"
SAMPLING = ("RANDOM", "USER_SESSION")
RULE_FIELDS = {"id", "type", "targets", "percent_traffic", "expires_at", "sampling_mode",
               "propagate_client_cancellation"}  # fmt: skip
REQUIRED = sorted(RULE_FIELDS - {"id"})
TARGET_FIELDS = {"deployment_id", "environment", "model_id"}
SETTINGS_FIELDS = {"rules", "delete_rules"}


class Problems(list[str]):
    def refuse(self) -> None:
        if self:
            raise InvalidChange("the traffic routing settings are refused: " + self[0], list(self))


def rules_after(
    stored: list[dict[str, Any]],
    update: Any,
    models: Mapping[str, Model],
    model: Model,
    env: str,
    now: float,
    new_id: Callable[[], str],
) -> list[dict[str, Any]]:
    """The environment's stored rules after the SDK's `traffic_routing_settings` (expired ones dropped).

    Raises InvalidChange listing every problem by its path in the body.
    """
    problems = Problems()
    base = "traffic_routing_settings"
    if not isinstance(update, dict):
        raise InvalidChange(f"'{base}' must be an object", [f"{base}: must be an object"])
    for key in sorted(set(update) - SETTINGS_FIELDS):
        problems.append(f"{base}.{key[:64]}: unknown field (expected: delete_rules, rules)")
    rules = {rule["id"]: rule for rule in stored if expiry(rule) > now}
    deletes = update.get("delete_rules") or []
    if not isinstance(deletes, list):
        problems.append(f"{base}.delete_rules: must be a list of rule ids")
        deletes = []
    for i, rule_id in enumerate(deletes):
        if not isinstance(rule_id, str) or rule_id not in rules:
            problems.append(f"{base}.delete_rules[{i}]: no rule {str(rule_id)[:64]!r} in environment '{env}'")
        else:
            del rules[rule_id]
    upserts = update.get("rules") or []
    if not isinstance(upserts, list):
        problems.append(f"{base}.rules: must be a list of rules")
        upserts = []
    for i, upsert in enumerate(upserts):
        rule = parse_rule(upsert, f"{base}.rules[{i}]", models, model, env, now, problems)
        if rule is None:
            continue
        rule_id = upsert.get("id")
        if rule_id is None:
            rule["id"] = new_id()
        elif rule_id not in rules:
            problems.append(f"{base}.rules[{i}].id: no rule {str(rule_id)[:64]!r} to replace (omit it to create one)")
            continue
        elif rules[rule_id]["target"] != rule["target"]:
            problems.append(f"{base}.rules[{i}].targets: a replace cannot change the target "
                            "(delete the rule and create a new one)")  # fmt: skip
            continue
        else:
            rule["id"] = rule_id
        rules[rule["id"]] = rule
    problems.refuse()
    return list(rules.values())


def parse_rule(
    upsert: Any, path: str, models: Mapping[str, Model], model: Model, env: str, now: float, problems: Problems
) -> dict[str, Any] | None:
    """One `TrafficRoutingRuleUpsert` as stored (without its id), or None with its problems added."""
    if not isinstance(upsert, dict):
        problems.append(f"{path}: must be an object")
        return None
    count = len(problems)
    for key in sorted(set(upsert) - RULE_FIELDS):
        problems.append(f"{path}.{key[:64]}: unknown field")
    for key in REQUIRED:
        if key not in upsert:
            problems.append(f"{path}.{key}: required")
    if len(problems) > count:
        return None
    if upsert["type"] != "SHADOW":
        problems.append(f"{path}.type: only SHADOW rules exist")
    percent = upsert["percent_traffic"]
    if not isinstance(percent, int) or isinstance(percent, bool) or not 1 <= percent <= 100:
        problems.append(f"{path}.percent_traffic: a whole number from 1 to 100")
    if upsert["sampling_mode"] not in SAMPLING:
        problems.append(f"{path}.sampling_mode: one of {', '.join(SAMPLING)}")
    if not isinstance(upsert["propagate_client_cancellation"], bool):
        problems.append(f"{path}.propagate_client_cancellation: true or false")
    expires = parse_time(upsert["expires_at"])
    if expires is None:
        problems.append(f"{path}.expires_at: an ISO 8601 time with a timezone, e.g. 2026-10-13T18:00:00Z")
    elif not now < expires <= now + MAX_AHEAD_SECONDS:
        problems.append(f"{path}.expires_at: must be in the future and at most 7 days out")
    target = parse_target(upsert["targets"], f"{path}.targets", models, model, env, problems)
    if len(problems) > count or target is None or expires is None:
        return None
    return {"type": "SHADOW", "target": target, "percent_traffic": percent, "expires_at": iso(expires),
            "sampling_mode": upsert["sampling_mode"],
            "propagate_client_cancellation": upsert["propagate_client_cancellation"]}  # fmt: skip


def parse_target(
    targets: Any, path: str, models: Mapping[str, Model], model: Model, env: str, problems: Problems
) -> dict[str, Any] | None:
    """The one target, resolved to `{"model_id", "deployment_id", "environment"}` (one of the last two set)."""
    if not isinstance(targets, list) or len(targets) != 1 or not isinstance(targets[0], dict):
        problems.append(f'{path}: exactly one target, {{"deployment_id"}} or {{"environment"}}')
        return None
    target, path = targets[0], f"{path}[0]"
    unknown = sorted(set(target) - TARGET_FIELDS)
    if unknown:
        problems.append(f"{path}.{unknown[0][:64]}: unknown field (expected: deployment_id, environment, model_id)")
        return None
    dep_id, env_name, model_id = (target.get(key) for key in ("deployment_id", "environment", "model_id"))
    if (dep_id is None) == (env_name is None) or not all(isinstance(v, str | None) for v in target.values()):
        problems.append(f"{path}: exactly one of 'deployment_id' and 'environment' (strings)")
        return None
    owner = target_model(models, model, model_id, dep_id, path, problems)
    if owner is None:
        return None
    if dep_id is not None and dep_id not in owner.deployments:
        problems.append(f"{path}.deployment_id: model '{owner.id}' has no deployment '{dep_id[:64]}'")
        return None
    if env_name is not None:
        if env_name not in owner.environments:
            problems.append(f"{path}.environment: model '{owner.id}' has no environment '{env_name[:64]}'")
            return None
        if owner.id == model.id and env_name == env:
            problems.append(f"{path}.environment: a rule cannot copy an environment's traffic to itself")
            return None
    return {"model_id": owner.id, "deployment_id": dep_id, "environment": env_name}


def target_model(
    models: Mapping[str, Model], model: Model, model_id: str | None, dep_id: str | None, path: str, problems: Problems
) -> Model | None:
    """The target's model: named, else this one, else (for a deployment) the team's one model that has it."""
    if model_id is not None:
        owner = models.get(model_id)
        if owner is None:
            problems.append(f"{path}.model_id: no model '{model_id[:64]}'")
        elif owner.team != model.team:
            problems.append(f"{path}.model_id: model '{model_id}' belongs to another team ('{owner.team}')")
            owner = None
        return owner
    if dep_id is None or dep_id in model.deployments:
        return model
    owners = [m for m in models.values() if m.team == model.team and dep_id in m.deployments]
    if len(owners) != 1:
        which = "no model" if not owners else f"{len(owners)} models ({', '.join(sorted(m.id for m in owners)[:3])})"
        problems.append(f"{path}.deployment_id: {which} of team '{model.team}' has deployment '{dep_id[:64]}'"
                        + ("; name the target's 'model_id'" if owners else ""))  # fmt: skip
        return None
    return owners[0]


# -- composed into the serving table (gateway.environments.overlay) ----------------------------------


def compose_rules(
    models: Mapping[str, Model], model: Model, env: Environment, stored: list[dict[str, Any]], problems: list[str]
) -> Environment:
    """`env` with its stored rules as `shadow_rules`, each resolved to the deployment it sends to now."""
    rules = []
    for rule in stored:
        path = f"admin store: models.{model.id}.environments.{env.name}.traffic_routing.{rule['id']}"
        shadow = rule_shadow(models, model, rule, path, problems)
        if shadow is not None and env.region is not None and shadow.deployment.region != env.region:
            problems.append(
                f"{path}: target deployment '{shadow.deployment.id}' runs in region '{shadow.deployment.region}', "
                f"but environment '{env.name}' is pinned to region '{env.region}': its copies never leave its region"
            )
        rules.append(ShadowRule(rule["id"], rule, shadow))
    return dataclasses.replace(env, shadow_rules=tuple(rules))


def rule_shadow(
    models: Mapping[str, Model], model: Model, rule: Mapping[str, Any], path: str, problems: list[str]
) -> Shadow | None:
    target = rule["target"]
    owner = models.get(target["model_id"])
    if owner is None:
        return None  # the target's model is gone: the rule sends nothing
    if owner.team != model.team:
        problems.append(f"{path}: target model '{owner.id}' belongs to another team ('{owner.team}')")
        return None
    if target["deployment_id"] is not None:
        dep = owner.deployments.get(target["deployment_id"])
    else:
        target_env = owner.environments.get(target["environment"])
        dep = target_env.deployment if target_env is not None else None
    if dep is None:
        return None
    return Shadow(dep, float(rule["percent_traffic"]), sampling_mode=rule["sampling_mode"],
                  expires_at=expiry(rule), propagate_cancellation=rule["propagate_client_cancellation"],
                  environment=target["environment"])  # fmt: skip


def promotion_problems(models: Mapping[str, Model], model_id: str, env: str, dep: Deployment) -> list[str]:
    """Why promoting `dep` into `model_id`/`env` would send a regional environment's copies out of its
    region (the rules that target `env` follow its deployment), by the rule's path; [] when it would not."""
    problems = []
    for source in models.values():
        for name, source_env in source.environments.items():
            if source_env.region is None or source_env.region == dep.region:
                continue
            for rule in source_env.shadow_rules:
                target = rule.stored["target"]
                if target["model_id"] == model_id and target["environment"] == env:  # type: ignore[index]
                    problems.append(
                        f"models.{source.id}.environments.{name}.traffic_routing.{rule.id}: copies traffic of "
                        f"environment '{name}', pinned to region '{source_env.region}', to environment '{env}', "
                        f"which would then serve deployment '{dep.id}' in region '{dep.region}'"
                    )
    return problems


# -- the SDK's shapes ------------------------------------------------------------------------------


def rule_view(rule: ShadowRule) -> dict[str, Any]:
    """A rule as the SDK's `TrafficRoutingRule`; `targets` is empty when the target is gone."""
    stored = rule.stored
    return {
        "id": rule.id,
        "type": stored["type"],
        "targets": [dict(stored["target"])] if rule.shadow is not None else [],  # type: ignore[call-overload]
        "percent_traffic": stored["percent_traffic"],
        "expires_at": stored["expires_at"],
        "sampling_mode": stored["sampling_mode"],
        "propagate_client_cancellation": stored["propagate_client_cancellation"],
    }


def expiry(rule: Mapping[str, Any]) -> float:
    return parse_time(rule["expires_at"]) or 0.0


def parse_time(value: Any) -> float | None:
    """Unix seconds for an ISO 8601 time with a zone (the SDK's AwareDatetime), else None."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed.timestamp() if parsed.tzinfo is not None else None


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
