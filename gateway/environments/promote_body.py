"""The body of `POST .../environments/{env}/promote`: SPEC §6's options and the SDK's (issue 12).

The SDK's `PromoteToEnvironmentRequest` sends only the fields its caller set, so the defaults are applied
here (docs/baseten-sdk-management-api.md §0.8): `scale_down_previous_deployment` and
`preserve_env_instance_type` default to true. What each SDK field does here:

- `scale_down_previous_deployment`: false keeps the previous deployment as it is (cleanup KEEP);
- `promotion_settings_override`: `promotion_cleanup_strategy` (SCALE_TO_ZERO, KEEP, DEACTIVATE) and
  `ramp_up_while_promoting` + `ramp_up_duration_seconds` (the ramp, when the body's own
  `ramp_up_duration_seconds` is absent) are honoured; the rolling-deploy and redeploy fields move
  replicas, which this gateway does not run: accepted, no effect;
- `preserve_env_instance_type`: no instance types here: accepted, no effect;
- `environment_settings_update`: its `autoscaling_settings`, `request_backpressure_settings` and
  `promotion_settings` are the environment's once the promotion succeeds (checked at the promote
  call); the fields without meaning here are refused when set (400), not dropped.
"""

from __future__ import annotations

import math
from typing import Any, TypeGuard

from gateway.errors import ClientError

MAX_RAMP_SECONDS = 7 * 24 * 3600
SDK_DEFAULT_RAMP_SECONDS = 600  # UpdatePromotionSettings.ramp_up_duration_seconds' default
CLEANUP = ("SCALE_TO_ZERO", "KEEP", "DEACTIVATE")
SETTINGS = {"redeploy_on_promotion", "rolling_deploy", "promotion_cleanup_strategy", "rolling_deploy_config",
            "ramp_up_while_promoting", "ramp_up_duration_seconds"}  # fmt: skip
ENV_SETTINGS = {"region", "instance_type_id", "autoscaling_settings", "request_backpressure_settings",
                "autoscaling_schedule_settings", "promotion_settings"}  # fmt: skip
FIELDS = {"deployment_id", "ramp_up_duration_seconds", "smoke_check", "rollback",  # SPEC §6
          "scale_down_previous_deployment", "preserve_env_instance_type", "promotion_settings_override",
          "environment_settings_update"}  # fmt: skip


def promote_options(body: dict[str, Any], settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """The promote call's options, checked; a clear 400 for each kind of mistake.

    `settings`: the environment's stored promotion settings (`promotion_settings_update`), the
    defaults that the body's `promotion_settings_override` overrides field by field.
    """
    dep = body.get("deployment_id")
    if not isinstance(dep, str) or not dep:
        raise ClientError("'deployment_id' (a string) is required")
    override = _object(body.get("promotion_settings_override") or {}, "promotion_settings_override", SETTINGS)
    override = {**(settings or {}), **{key: value for key, value in override.items() if value is not None}}
    cleanup = cleanup_strategy(body, override)
    settings_update = environment_settings_update(body.get("environment_settings_update"))
    for name in ("scale_down_previous_deployment", "preserve_env_instance_type"):
        if not isinstance(body.get(name, True), bool):
            raise ClientError(f"'{name}' must be true or false")
    ramp = body.get("ramp_up_duration_seconds")
    if ramp is None and override.get("ramp_up_while_promoting"):
        ramp = override.get("ramp_up_duration_seconds")
        ramp = SDK_DEFAULT_RAMP_SECONDS if ramp is None else ramp
    if ramp is not None and (not _number(ramp) or not 0 <= ramp <= MAX_RAMP_SECONDS):
        raise ClientError(f"'ramp_up_duration_seconds' must be a number from 0 to {MAX_RAMP_SECONDS}")
    smoke = body.get("smoke_check")
    if smoke is not None:
        smoke = _object(smoke, "smoke_check", {"path", "body", "expected_status"})
        path = smoke.get("path")
        if not isinstance(path, str) or not path.startswith("/") or any(c in path for c in " \r\n\t"):
            raise ClientError("'smoke_check.path' must be a path starting with '/' (no spaces)")
        status = smoke.get("expected_status", 200)
        if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
            raise ClientError("'smoke_check.expected_status' must be an HTTP status (100-599)")
    rollback = body.get("rollback")
    if rollback is not None:
        rollback = _object(rollback, "rollback", {"max_5xx_percent", "window_seconds", "min_calls"})
        share, window = rollback.get("max_5xx_percent"), rollback.get("window_seconds")
        if not _number(share) or not 0 <= share <= 100:
            raise ClientError("'rollback.max_5xx_percent' (0-100) is required")
        if not _number(window) or not 0 < window <= 3600:
            raise ClientError("'rollback.window_seconds' (above 0, at most 3600) is required")
        calls = rollback.get("min_calls", 10)
        if not isinstance(calls, int) or isinstance(calls, bool) or calls < 1:
            raise ClientError("'rollback.min_calls' must be a whole number of at least 1")
        if not ramp:
            raise ClientError("'rollback' watches the ramp: it needs 'ramp_up_duration_seconds' above 0")
    return {"deployment_id": dep, "ramp_up_duration_seconds": ramp or 0, "smoke_check": smoke, "rollback": rollback,
            "cleanup": cleanup, "environment_settings_update": settings_update}  # fmt: skip


def cleanup_strategy(body: dict[str, Any], override: dict[str, Any]) -> str:
    """What happens to the previous deployment once the promotion succeeds (its `promotion_cleanup_strategy`).

    `scale_down_previous_deployment: false` keeps it; otherwise the override's strategy, by default
    SCALE_TO_ZERO (SPEC §6's demotion). Either way a deployment still used elsewhere is kept.
    """
    strategy = override.get("promotion_cleanup_strategy")
    if strategy is not None and strategy not in CLEANUP:
        raise ClientError(
            f"'promotion_settings_override.promotion_cleanup_strategy' must be one of {', '.join(CLEANUP)}"
        )
    if body.get("scale_down_previous_deployment") is False:
        return "KEEP"
    return strategy or "SCALE_TO_ZERO"


# `POST /v1/models/{id}/deployments/{dep}/promote` (and `development/promote`): the SDK's `PromoteRequest`,
# a promotion into production whose scale-down flag has another name (docs/baseten-sdk-management-api.md §0.8).
DEPLOYMENT_FIELDS = {"scale_down_previous_production", "preserve_env_instance_type", "environment_settings_update",
                     "promotion_settings_override"}  # fmt: skip


def production_promote_body(body: dict[str, Any], dep_id: str) -> dict[str, Any]:
    """The environment promote body for a deployment-level promote of `dep_id` into production."""
    mapped = {key: value for key, value in body.items() if key != "scale_down_previous_production"}
    if "scale_down_previous_production" in body:
        mapped["scale_down_previous_deployment"] = body["scale_down_previous_production"]
    return {**mapped, "deployment_id": dep_id}


def promotion_settings_update(current: dict[str, Any], update: Any) -> dict[str, Any]:
    """An environment's stored promotion settings after the SDK's `UpdateModelPromotionSettings`.

    Partial, like the SDK sends it: an absent field is unchanged, a null one goes back to the default
    (`sdk_views.PROMOTION_SETTINGS`). The fields this gateway acts on are checked here; the
    rolling-deploy and redeploy fields are kept and shown, with no effect (no replicas here).
    """
    update = _object(update, "promotion_settings", SETTINGS)
    settings = {**current}
    for key, value in update.items():
        if value is None:
            settings.pop(key, None)
        else:
            settings[key] = value
    strategy = settings.get("promotion_cleanup_strategy")
    if strategy is not None and strategy not in CLEANUP:
        raise ClientError(f"'promotion_settings.promotion_cleanup_strategy' must be one of {', '.join(CLEANUP)}")
    for key in ("ramp_up_while_promoting", "redeploy_on_promotion", "rolling_deploy"):
        if not isinstance(settings.get(key, False), bool):
            raise ClientError(f"'promotion_settings.{key}' must be true or false")
    ramp = settings.get("ramp_up_duration_seconds", 0)
    if not isinstance(ramp, int) or isinstance(ramp, bool) or not 0 <= ramp <= MAX_RAMP_SECONDS:
        raise ClientError(
            f"'promotion_settings.ramp_up_duration_seconds' must be a whole number from 0 to {MAX_RAMP_SECONDS}"
        )
    if settings.get("rolling_deploy_config") is not None and not isinstance(settings["rolling_deploy_config"], dict):
        raise ClientError("'promotion_settings.rolling_deploy_config' must be an object")
    return settings


def environment_settings_update(update: Any) -> dict[str, Any] | None:
    """The SDK's `PromotionEnvironmentSettingsUpdate`: the environment's `autoscaling_settings`,
    `request_backpressure_settings` and `promotion_settings` that the environment takes when the
    promotion succeeds (None: none). `region`, `instance_type_id` and `autoscaling_schedule_settings`
    have no meaning here (a regional environment's region is its team's; no instance types or
    schedules): null is accepted, a value refused with the field named, never dropped silently."""
    if update is None:
        return None
    fields = _object(update, "environment_settings_update", ENV_SETTINGS)
    for name in ("region", "instance_type_id", "autoscaling_schedule_settings"):
        if fields.get(name) is not None:
            raise ClientError(f"'environment_settings_update.{name}' has no meaning here; send null or leave it out")
    kept = {name: value for name, value in fields.items() if value is not None and name in APPLIED}
    return kept or None


APPLIED = ("autoscaling_settings", "request_backpressure_settings", "promotion_settings")


def _number(x: Any) -> TypeGuard[float]:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _object(x: Any, name: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(x, dict):
        raise ClientError(f"'{name}' must be an object")
    unknown = sorted(set(x) - allowed)
    if unknown:
        raise ClientError(f"unknown field '{name}.{unknown[0][:64]}' (expected: {', '.join(sorted(allowed))})")
    return x
