"""A compiled model written back as its table document: the inverse of `build.py` for one model.

The admin overlay (`gateway.environments.overlay`) patches a model's document and compiles it again.
Keeping the parsed document of a 100,000-model table next to its compiled `Table` cost ~190 MiB per
worker, so only the compiled table is kept and a touched model's document is written from it.

The contract: compiling `model_document(m, table)` (with the table's other sections) gives a model
equal to `m`. The text may differ from the file's (defaults written out, timeouts and health checks
merged, URLs normalized), never the meaning. `tests/test_table_loader.py` checks the round trip.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gateway.routing.model import Autoscaling, Deployment, Environment, Model, Table

_DEFAULT_AUTOSCALING = Autoscaling()


def model_document(model: Model, table: Table) -> dict[str, Any]:
    """A fresh document (plain dicts and lists, the caller may change it) that compiles to `model`."""
    doc: dict[str, Any] = {
        "team": model.team,
        "kind": model.kind,
        "deployments": {dep_id: _deployment(dep, table) for dep_id, dep in model.deployments.items()},
        "environments": {name: _environment(env) for name, env in model.environments.items()},
    }
    if model.deleted_environments:
        doc["deleted_environments"] = sorted(model.deleted_environments)
    return doc


def _deployment(dep: Deployment, table: Table) -> dict[str, Any]:
    doc: dict[str, Any] = {"plane": dep.plane.name, "status": dep.status}
    if dep.development:
        doc["development"] = True
    if dep.endpoints:
        doc["endpoints"] = [upstream.base_url for upstream in dep.endpoints]
    if dep.replicas is not None:
        doc["replicas"] = dep.replicas
    if not dep.retry_on_reset:
        doc["retry_on_reset"] = False
    if dep.endpoints_srv is not None:
        doc["endpoints_srv"] = dep.endpoints_srv
    inherited = dep.plane.timeouts if dep.plane.timeouts is not None else table.gateway.timeouts
    if dep.timeouts != inherited:
        doc["timeouts"] = dataclasses.asdict(dep.timeouts)
    if dep.health_check is not None:  # the merged value: it overrides every field of the plane's
        doc["health_check"] = dataclasses.asdict(dep.health_check)
    elif dep.plane.health_check is not None:
        doc["health_check"] = {"enabled": False}
    return doc


def _environment(env: Environment) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    if env.deployment is not None:
        doc["deployment"] = env.deployment.id
    if env.canary is not None:
        doc["canary"] = {"deployment": env.canary.deployment.id, "percent": env.canary.percent}
    if env.shadow is not None:
        shadow = env.shadow
        doc["shadow"] = {"deployment": shadow.deployment.id, "percent": shadow.percent,
                         "max_body_bytes": shadow.max_body_bytes}  # fmt: skip
    if env.autoscaling != _DEFAULT_AUTOSCALING:
        scaling = env.autoscaling
        doc["autoscaling"] = {"min_replica": scaling.min_replica, "max_replica": scaling.max_replica}
        if scaling.concurrency_target is not None:
            doc["autoscaling"]["concurrency_target"] = scaling.concurrency_target
    if env.backpressure != "QUEUE_ON_FULL":
        doc["backpressure"] = {"policy": env.backpressure}
    return doc
