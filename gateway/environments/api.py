"""The environments admin API of SPEC §6: environments, promotions, deployment status.

Every change is made the same way: copy the overlay, change the copy, and hand it to
`TableState.apply`, which composes it with the table file, validates the result with the
table's own rules, persists it in the admin store and swaps the serving table. Changes are
serialized by one lock, so two concurrent promote calls cannot both win.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.environments.changes import (
    deployment_users,
    env_change,
    latest_promotion,
    model_changes,
    read_json,
    running_promotion,
    set_status,
)
from gateway.environments.overlay import RUNNING
from gateway.environments.promotion import Promotions
from gateway.environments.store import StoreError
from gateway.errors import (
    ClientError,
    Conflict,
    EndpointNotFound,
    InternalError,
    InvalidChange,
    MethodNotAllowed,
    ModelNotFound,
)
from gateway.http.server import Request
from gateway.metrics import Metrics
from gateway.routing.hostpath import is_env_name
from gateway.routing.loader import TableInvalid
from gateway.routing.model import Deployment, Environment, Model, Table
from gateway.state import TableState

PRODUCTION = "production"
RESERVED = "development"
PATCHABLE = {
    "autoscaling_settings": "autoscaling",
    "canary": "canary",
    "shadow": "shadow",
    "backpressure": "backpressure",
}
ENV_PATH = re.compile(r"/v1/models/([^/]+)/environments(?:/([^/]+)(?:/([a-z_]+))?)?\Z")
DEP_PATH = re.compile(r"/v1/models/([^/]+)/deployments/([^/]+)(?:/(activate|deactivate))?\Z")

Handler = Callable[..., Awaitable[tuple[int, object]]]


class EnvironmentsApi:
    def __init__(self, state: TableState, metrics: Metrics, request_counts: Callable[[], dict[tuple, float]]) -> None:
        self.state = state
        self.promotions = Promotions(self, metrics, request_counts)

    # -- dispatch -------------------------------------------------------------------------

    def handles(self, path: str) -> bool:
        return path.startswith("/v1/models/")

    async def __call__(self, req: Request, path: str) -> tuple[int, object]:
        found = ENV_PATH.match(path)
        if found is not None:
            model_id, env, action = found.groups()
            if env is None:
                methods: dict[str, Handler] = {"GET": self.list_environments, "POST": self.create_environment}
                args: tuple = (model_id,)
            elif action is None:
                methods = {"GET": self.read_environment, "PATCH": self.patch_environment,
                           "DELETE": self.delete_environment}  # fmt: skip
                args = (model_id, env)
            else:
                action_handler: Handler | None = self.promotions.actions.get(action)
                if action_handler is None:
                    raise EndpointNotFound(f"no admin endpoint '{path[:128]}'")
                methods, args = {"POST": action_handler}, (model_id, env)
        else:
            found = DEP_PATH.match(path)
            if found is None:
                raise EndpointNotFound(f"no admin endpoint '{path[:128]}'")
            model_id, dep_id, action = found.groups()
            if action is None:
                methods, args = {"GET": self.read_deployment}, (model_id, dep_id)
            else:
                methods, args = {"POST": self.change_status}, (model_id, dep_id, action)
        handler = methods.get(req.method)
        if handler is None:
            raise MethodNotAllowed(f"method {req.method} is not allowed on '{path[:128]}'", tuple(methods))
        return await handler(req, *args)

    # -- environments -----------------------------------------------------------------------

    async def list_environments(self, req: Request, model_id: str) -> tuple[int, object]:
        model = self.model(model_id)
        envs = [self.view(model, env) for _, env in sorted(model.environments.items())]
        return 200, {"model_id": model_id, "environments": envs}

    async def read_environment(self, req: Request, model_id: str, env: str) -> tuple[int, object]:
        model = self.model(model_id)
        return 200, self.view(model, self.environment(model, env))

    async def create_environment(self, req: Request, model_id: str) -> tuple[int, object]:
        body = await read_json(req, {"name", "autoscaling_settings"})
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise ClientError("'name' (a string) is required")
        check_env_name(name)
        async with self.promotions.lock:
            model = self.model(model_id)
            if name in model.environments:
                raise Conflict(f"environment '{name}' of model '{model_id}' already exists")
            fields: dict[str, Any] = {}
            if "autoscaling_settings" in body:
                fields["autoscaling"] = body["autoscaling_settings"]
            table = await self.change(
                f"create environment {model_id}/{name}",
                lambda o: env_change(o, model_id, name, fresh=True)["set"].update(fields),
            )
        model = table.models[model_id]
        return 201, self.view(model, model.environments[name])

    async def patch_environment(self, req: Request, model_id: str, env: str) -> tuple[int, object]:
        body = await read_json(req, set(PATCHABLE))
        for key in ("autoscaling_settings", "backpressure"):
            if key in body and body[key] is None:
                raise ClientError(f"'{key}' cannot be null (only canary and shadow can be removed)")
        async with self.promotions.lock:
            self.environment(self.model(model_id), env)

            def mutate(overlay: dict[str, Any]) -> None:
                change = env_change(overlay, model_id, env)
                for key, value in body.items():
                    change["set"][PATCHABLE[key]] = value

            table = await self.change(f"update environment {model_id}/{env}", mutate)
        model = table.models[model_id]
        return 200, self.view(model, model.environments[env])

    async def delete_environment(self, req: Request, model_id: str, env: str) -> tuple[int, object]:
        if env == PRODUCTION:
            raise ClientError("'production' cannot be deleted")
        async with self.promotions.lock:
            self.environment(self.model(model_id), env)
            if running_promotion(self.state.overlay, model_id, env) is not None:
                raise Conflict(f"environment '{env}' has a promotion in progress; cancel it first")

            def mutate(overlay: dict[str, Any]) -> None:
                envs = model_changes(overlay, model_id).setdefault("environments", {})
                envs[env] = {"deleted": True}

            await self.change(f"delete environment {model_id}/{env}", mutate)
        return 200, {"name": env, "model_id": model_id, "deleted": True}

    # -- deployments ------------------------------------------------------------------------

    async def read_deployment(self, req: Request, model_id: str, dep_id: str) -> tuple[int, object]:
        return 200, deployment_view(self.deployment(self.model(model_id), dep_id))

    async def change_status(self, req: Request, model_id: str, dep_id: str, action: str) -> tuple[int, object]:
        await read_json(req, set())
        status = "active" if action == "activate" else "inactive"
        async with self.promotions.lock:
            model = self.model(model_id)
            dep = self.deployment(model, dep_id)
            if status == "inactive":
                users = deployment_users(model, dep_id, self.state.overlay)
                if users:
                    raise Conflict(f"deployment '{dep_id}' still serves {', '.join(users)}; promote another first")
            if dep.status != status:
                table = await self.change(
                    f"{action} deployment {model_id}/{dep_id}", lambda o: set_status(o, model_id, dep_id, status)
                )
                dep = table.models[model_id].deployments[dep_id]
        return 200, deployment_view(dep)

    # -- helpers ------------------------------------------------------------------------------

    async def change(self, reason: str, mutate: Callable[[dict[str, Any]], object]) -> Table:
        """Apply one change to a copy of the overlay; serve and persist it, or refuse it whole."""
        overlay = copy.deepcopy(self.state.overlay)
        mutate(overlay)
        overlay["revision"] = int(overlay.get("revision", 0)) + 1
        try:
            return await self.state.apply(overlay, reason)
        except TableInvalid as exc:
            raise InvalidChange(
                "the change breaks the routing table's rules: " + exc.problems[0], exc.problems
            ) from None
        except StoreError as exc:
            raise InternalError(str(exc)) from None

    def model(self, model_id: str) -> Model:
        model = self.state.table.models.get(model_id)
        if model is None:
            raise ModelNotFound(f"model '{model_id[:64]}' not found")
        return model

    def environment(self, model: Model, env: str) -> Environment:
        found = model.environments.get(env)
        if found is None:
            raise ModelNotFound(f"environment '{env[:64]}' of model '{model.id}' not found")
        return found

    def deployment(self, model: Model, dep_id: str) -> Deployment:
        dep = model.deployments.get(dep_id)
        if dep is None:
            raise ModelNotFound(f"deployment '{dep_id[:64]}' of model '{model.id}' not found")
        return dep

    def view(self, model: Model, env: Environment) -> dict[str, Any]:
        """An environment as the admin API shows it (SPEC §6)."""
        promotion = latest_promotion(self.state.overlay, model.id, env.name)
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


def check_env_name(name: str) -> None:
    if name == RESERVED:
        raise ClientError("'development' is reserved (call /development/... for the development deployment)")
    if not is_env_name(name):
        raise ClientError(
            f"invalid environment name '{name[:64]}': lowercase letters, digits and '-', "
            "not starting or ending with '-', at most 40 characters"
        )
