"""The environments admin API of SPEC §6: environments, promotions, deployment status; the model and
deployment reads in the shapes of the platform SDK (issue 12, `sdk_views`).

Every change goes through the one admin writer (`writer.AdminWriter`): validated with the table's
own rules, persisted in the admin store, swapped. Checks that a change depends on (the environment
exists, no promotion runs) are made under the writer's lock, so two concurrent calls cannot both win.
The promotion calls are the promotion runner's (`promotion.Promotions.actions`); this module only
registers them. The paths are `gateway.admin.routes`, which names each handler here.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qs

from gateway.admin.access import CALLER
from gateway.admin.routes import Handler
from gateway.environments import sdk_views
from gateway.environments.changes import (
    MAX_BODY,
    env_change,
    env_entry,
    model_changes,
    read_json,
    running_promotion,
    set_status,
)
from gateway.environments.groups import group_view, groups_view, known_team, team_group
from gateway.environments.promote_body import promotion_settings_update
from gateway.environments.sdk_settings import (
    NO_MEANING,
    SCALING_FIELDS,
    autoscaling_doc,
    backpressure_doc,
    settings_changes,
)
from gateway.environments.traffic_rules import rules_after
from gateway.environments.views import deployment_view, environment_view, find_deployment, find_environment, find_model
from gateway.environments.writer import AdminWriter
from gateway.errors import ClientError, Conflict, ModelNotFound
from gateway.http.server import Request
from gateway.routing.hostpath import is_env_name
from gateway.routing.model import Autoscaling, Deployment, Environment, Model

PRODUCTION = sdk_views.PRODUCTION
RESERVED = "development"
# The older §6 keys set as sent; the SDK's `autoscaling_settings` and `request_backpressure_settings`
# go through `sdk_settings` (partial updates).
PATCHABLE = {
    "canary": "canary",
    "shadow": "shadow",
    "backpressure": "backpressure",
}
SDK_KEYS = {"autoscaling_settings", "request_backpressure_settings"}
PATCH_ONLY = {"traffic_routing_settings", "promotion_settings"}  # the SDK's UpdateEnvironmentRequest
# The SDK's `UpdateEnvironmentResponse` keys besides the environment; deprecated there, fixed here
# (a change is applied when the answer is sent, docs/baseten-sdk-management-api.md §1.5).
UPDATE_ACCEPTED = {"status": "ACCEPTED", "message": "Environment update accepted"}
# The promotion runner's deployment-level promote (`PromoteRequest`) among `actions`: a key with a '/',
# so no environment action can be named so.
PROMOTE_DEPLOYMENT = "deployments/promote"


class EnvironmentsApi:
    """The §6 endpoints. `actions`: the promotion calls by name (promote, pause_promotion, ...)."""

    def __init__(self, writer: AdminWriter, actions: Mapping[str, Handler]) -> None:
        self.writer = writer
        self.state = writer.state
        self.actions = actions

    def handlers(self) -> dict[str, Handler]:
        """The handlers by route name (`gateway.admin.routes`), the promotion calls included."""
        own = ("list_models", "read_model", "list_deployments", "read_deployment", "change_status",
               "list_environments", "create_environment", "read_environment", "patch_environment",
               "delete_environment", "change_environment_status", "patch_deployment_autoscaling",
               "patch_deployment_backpressure", "list_team_models", "null_shape", "list_groups", "read_group",
               "patch_group", "list_team_groups", "read_team_group", "patch_team_group")  # fmt: skip
        actions = {name: handler for name, handler in self.actions.items() if name != PROMOTE_DEPLOYMENT}
        return {**{name: getattr(self, name) for name in own}, **actions,
                "promote_deployment": self.actions[PROMOTE_DEPLOYMENT]}  # fmt: skip

    # -- models (the SDK's shapes, issue 12) ----------------------------------------------------

    async def list_models(self, req: Request) -> tuple[int, object]:
        caller = CALLER.get()
        reach = None if caller.is_operator else lambda model: caller.reaches(model.team, model.id)
        return 200, sdk_views.models_view(self.state.table, query_name(req), reach=reach)

    async def read_model(self, req: Request, model_id: str) -> tuple[int, object]:
        return 200, sdk_views.model_view(self.model(model_id))

    async def list_team_models(self, req: Request, team: str) -> tuple[int, object]:
        known_team(self.state.table, CALLER.get().team_in_reach(team) or team)
        return 200, sdk_views.models_view(self.state.table, query_name(req), team)

    async def null_shape(self, req: Request, model_id: str, name: str, kind: str, what: str) -> tuple[int, object]:
        """Logs, metrics time series and replica startups: the SDK's empty shapes (none of them here)."""
        await req.body.read_all(MAX_BODY)
        model = self.model(model_id)
        if kind == "environments":
            self.environment(model, name)
        else:
            self.shortcut_or_deployment(model, name)
        return 200, sdk_views.NULL_SHAPES[what]

    # -- environments -----------------------------------------------------------------------

    async def list_environments(self, req: Request, model_id: str) -> tuple[int, object]:
        model = self.model(model_id)
        envs = [self.view(model, env) for _, env in sorted(model.environments.items())]
        return 200, {"model_id": model_id, "environments": envs}

    async def read_environment(self, req: Request, model_id: str, env: str) -> tuple[int, object]:
        model = self.model(model_id)
        return 200, self.view(model, self.environment(model, env))

    async def create_environment(self, req: Request, model_id: str) -> tuple[int, object]:
        body = await read_json(req, {"name", "promotion_settings"} | SDK_KEYS)
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise ClientError("'name' (a string) is required")
        check_env_name(name)
        async with self.writer.lock:
            model = self.model(model_id)
            if name in model.environments:
                raise Conflict(f"environment '{name}' of model '{model_id}' already exists")
            fields = settings_changes(body, None)
            settings = (
                promotion_settings_update({}, body["promotion_settings"]) if body.get("promotion_settings") else None
            )

            def mutate(overlay: dict[str, Any]) -> None:
                change = env_change(overlay, model_id, name, fresh=True)
                change["set"].update(fields)
                if settings:
                    change["promotion_settings"] = settings

            table = await self.writer.change(f"create environment {model_id}/{name}", mutate)
        model = table.models[model_id]
        return 200, self.view(model, model.environments[name])  # 200: the SDK accepts no other (issue 12)

    async def patch_environment(self, req: Request, model_id: str, env: str) -> tuple[int, object]:
        """The SDK's `UpdateEnvironmentResponse` (`environment`, `status`, `message`), with the environment's
        keys also at the top level as SPEC §6 answered before (no key clashes)."""
        body = await read_json(req, set(PATCHABLE) | SDK_KEYS | PATCH_ONLY)
        if "backpressure" in body and body["backpressure"] is None:
            raise ClientError("'backpressure' cannot be null (only canary and shadow can be removed)")
        async with self.writer.lock:
            model = self.model(model_id)
            current = self.environment(model, env)
            fields = settings_changes(body, current.autoscaling)
            fields.update((PATCHABLE[key], value) for key, value in body.items() if key in PATCHABLE)
            entry = env_entry(self.state.overlay, model_id, env)
            extra: dict[str, Any] = {}  # overlay keys beside `set` (not table fields)
            if body.get("traffic_routing_settings") is not None:
                extra["traffic_routing"] = rules_after(
                    entry.get("traffic_routing") or [], body["traffic_routing_settings"], self.state.table.models,
                    model, env, time.time(), new_rule_id,
                )  # fmt: skip
            if body.get("promotion_settings") is not None:
                extra["promotion_settings"] = promotion_settings_update(
                    entry.get("promotion_settings") or {}, body["promotion_settings"]
                )

            def mutate(overlay: dict[str, Any]) -> None:
                change = env_change(overlay, model_id, env)
                change["set"].update(fields)
                change.update(extra)

            table = await self.writer.change(f"update environment {model_id}/{env}", mutate)
        model = table.models[model_id]
        view = self.view(model, model.environments[env])
        return 200, {**view, "environment": view, **UPDATE_ACCEPTED}

    async def delete_environment(self, req: Request, model_id: str, env: str) -> tuple[int, object]:
        if env == PRODUCTION:
            raise ClientError("'production' cannot be deleted")
        async with self.writer.lock:
            self.environment(self.model(model_id), env)
            if running_promotion(self.state.overlay, model_id, env) is not None:
                raise Conflict(f"environment '{env}' has a promotion in progress; cancel it first")

            def mutate(overlay: dict[str, Any]) -> None:
                envs = model_changes(overlay, model_id).setdefault("environments", {})
                envs[env] = {"deleted": True}

            await self.writer.change(f"delete environment {model_id}/{env}", mutate)
        return 200, {"name": env, "model_id": model_id, "deleted": True}

    # -- deployments ------------------------------------------------------------------------

    async def list_deployments(self, req: Request, model_id: str) -> tuple[int, object]:
        return 200, sdk_views.deployments_view(self.model(model_id), query_name(req))

    async def read_deployment(self, req: Request, model_id: str, dep_id: str) -> tuple[int, object]:
        """The SDK's `Deployment`; `production` and `development` name the model's, before any id."""
        model = self.model(model_id)
        return 200, sdk_views.deployment_view(model, self.shortcut_or_deployment(model, dep_id))

    async def change_status(self, req: Request, model_id: str, dep_id: str, action: str) -> tuple[int, object]:
        """Activate or deactivate; `production` and `development` name the model's (the SDK's literal paths).

        Deactivating a deployment that serves an environment is allowed: it is the operator's kill switch
        (SPEC §6), and its calls then get 503 `model_unavailable` (`routing.resolve`). The answer is the
        SDK's `ActivateResponse`/`DeactivateResponse` (`success`, `no_op`) with SPEC §6's deployment keys.
        """
        await read_json(req, set())
        status = "active" if action == "activate" else "inactive"
        async with self.writer.lock:
            model = self.model(model_id)
            dep = self.shortcut_or_deployment(model, dep_id)
            no_op = dep.status == status
            if not no_op:
                table = await self.writer.change(
                    f"{action} deployment {model_id}/{dep.id}", lambda o: set_status(o, model_id, dep.id, status)
                )
                dep = table.models[model_id].deployments[dep.id]
        return 200, {"success": True, "no_op": no_op, **deployment_view(dep)}

    async def change_environment_status(self, req: Request, model_id: str, env: str, action: str) -> tuple[int, object]:
        """The SDK's environment activate/deactivate: "a deployment associated with an environment",
        its current one (404 before its first promotion)."""
        environment = self.environment(self.model(model_id), env)
        if environment.deployment is None:
            raise ModelNotFound(f"environment '{env}' of model '{model_id}' has no deployment yet")
        return await self.change_status(req, model_id, environment.deployment.id, action)

    async def patch_deployment_autoscaling(self, req: Request, model_id: str, dep_id: str) -> tuple[int, object]:
        """The SDK's `UpdateAutoscalingSettingsResponse`; the settings belong to the environments the
        deployment serves (here a deployment has none of its own), and each of them gets the update."""
        body = await read_json(req, set(SCALING_FIELDS) | set(NO_MEANING))

        def fields(env: Environment) -> dict[str, Any]:
            return {"autoscaling": autoscaling_doc(env.autoscaling, body)}

        changed = await self.change_served(model_id, dep_id, "autoscaling settings", fields)
        status = "ACCEPTED" if changed else "UNCHANGED"
        return 200, {"status": status, "message": f"Autoscaling settings {status.lower()}"}

    async def patch_deployment_backpressure(self, req: Request, model_id: str, dep_id: str) -> tuple[int, object]:
        """The SDK's `RequestBackpressureSettings` after the update, for the environments the deployment serves."""
        body = await read_json(req, {"policy"})
        update = backpressure_doc(body)
        await self.change_served(
            model_id, dep_id, "backpressure", lambda env: {"backpressure": update} if update else {}
        )
        model = self.model(model_id)
        env = sdk_views.serving_environment(model, self.shortcut_or_deployment(model, dep_id))
        return 200, {"policy": env.backpressure if env is not None else None}

    async def change_served(
        self, model_id: str, dep_id: str, what: str, fields: Callable[[Environment], dict[str, Any]]
    ) -> bool:
        """Set `fields(env)` on every environment the deployment serves as its current one; whether any changed.

        409 when it serves none: the settings are an environment's here, and there is none to hold them.
        """
        async with self.writer.lock:
            model = self.model(model_id)
            dep = self.shortcut_or_deployment(model, dep_id)
            served = {name: env for name, env in model.environments.items() if env.deployment is not None and env.deployment.id == dep.id}  # fmt: skip
            if not served:
                raise Conflict(f"deployment '{dep.id}' serves no environment: {what} are an environment's here "
                               "(PATCH the environment, or promote the deployment first)")  # fmt: skip
            changes = {name: fields(env) for name, env in served.items()}
            current = {
                name: {"autoscaling": env.autoscaling, "backpressure": env.backpressure} for name, env in served.items()
            }
            changes = {name: change for name, change in changes.items() if change and not same(change, current[name])}
            if not changes:
                return False

            def mutate(overlay: dict[str, Any]) -> None:
                for name, change in changes.items():
                    env_change(overlay, model_id, name)["set"].update(change)

            await self.writer.change(f"{what} of deployment {model_id}/{dep.id}", mutate)
        return True

    # -- environment groups (the team's environment names) -----------------------------------

    async def list_groups(self, req: Request, team: str | None = None) -> tuple[int, object]:
        return 200, groups_view(self.state.table, CALLER.get().team_in_reach(team))

    async def list_team_groups(self, req: Request, team: str) -> tuple[int, object]:
        return await self.list_groups(req, team)

    async def read_team_group(self, req: Request, team: str, name: str) -> tuple[int, object]:
        return await self.read_group(req, name, team)

    async def patch_team_group(self, req: Request, team: str, name: str) -> tuple[int, object]:
        return await self.patch_group(req, name, team)

    async def read_group(self, req: Request, name: str, team: str | None = None) -> tuple[int, object]:
        return 200, group_view(self.state.table, *team_group(self.state.table, CALLER.get().team_in_reach(team), name))

    async def patch_group(self, req: Request, name: str, team: str | None = None) -> tuple[int, object]:
        """`UpdateEnvironmentGroupRequest`: restricting who may manage an environment has no meaning here
        (one admin token manages everything): `is_restricted: false` is accepted, `true` refused."""
        body = await read_json(req, {"manage_access"})
        access = body.get("manage_access")
        if access is not None:
            if not isinstance(access, dict) or set(access) - {"is_restricted", "user_ids"}:
                raise ClientError("'manage_access' must be an object with 'is_restricted' (and 'user_ids')")
            if access.get("is_restricted") or access.get("user_ids"):
                raise ClientError("manage_access: restricting an environment to some users has no meaning here "
                                  "(the admin token manages every environment)")  # fmt: skip
        return 200, group_view(self.state.table, *team_group(self.state.table, CALLER.get().team_in_reach(team), name))

    # -- helpers ------------------------------------------------------------------------------

    def model(self, model_id: str) -> Model:
        return find_model(self.state.table, model_id)

    def environment(self, model: Model, env: str) -> Environment:
        return find_environment(model, env)

    def deployment(self, model: Model, dep_id: str) -> Deployment:
        return find_deployment(model, dep_id)

    def shortcut_or_deployment(self, model: Model, dep_id: str) -> Deployment:
        """The deployment `dep_id` names; the literals `production` and `development` win over an id
        (docs/baseten-sdk-management-api.md §0.6)."""
        if dep_id in SHORTCUTS:
            dep = SHORTCUTS[dep_id](model)
            if dep is None:
                raise ModelNotFound(f"model '{model.id}' has no {dep_id} deployment")
            return dep
        return self.deployment(model, dep_id)

    def view(self, model: Model, env: Environment) -> dict[str, Any]:
        return environment_view(model, env, self.state.overlay)


SHORTCUTS: dict[str, Callable[[Model], Deployment | None]] = {
    PRODUCTION: sdk_views.production_deployment,
    RESERVED: lambda model: model.development,
}


def same(change: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether a deployment-level settings change leaves the environment as it is."""
    scaling = change.get("autoscaling")
    if scaling is not None and Autoscaling(**scaling) != current["autoscaling"]:
        return False
    policy = (change.get("backpressure") or {}).get("policy")
    return policy is None or policy == current["backpressure"]


def new_rule_id() -> str:
    return secrets.token_hex(4)


def query_name(req: Request) -> str | None:
    """The `name` query filter of the SDK's list calls (`GetModelsParams`, `GetModelsDeploymentsParams`)."""
    names = parse_qs(req.target.partition("?")[2]).get("name")
    return names[0] if names else None


def check_env_name(name: str) -> None:
    if name == RESERVED:
        raise ClientError("'development' is reserved (call /development/... for the development deployment)")
    if not is_env_name(name):
        raise ClientError(
            f"invalid environment name '{name[:64]}': lowercase letters, digits and '-', "
            "not starting or ending with '-', at most 40 characters"
        )
