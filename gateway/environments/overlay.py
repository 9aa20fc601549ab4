"""The serving table = the table file + the admin API's changes (SPEC §6), composed and validated.

The admin API never edits the file. Its changes are an *overlay*, kept in the admin store
(`gateway.environments.store`) and applied on top of the file's document every time either
changes:

- `deployments.<id>.status`: activate / deactivate / demote.
- `environments.<name>`: `{"deleted": true}`, or `{"replace": bool, "set": {field: value}, "promotion": {...}}`
  where `set` holds the fields the admin API changed (`deployment`, `canary`, `shadow`, `autoscaling`,
  `backpressure`; a `None` value removes the file's value) and `replace` means the environment was
  created through the API, so the file's entry of that name (if any) is not used at all.
- `api_keys` (beside `models`): the inference keys created through the admin API (`keyset`).
- `promotion`: the environment's latest promotion; while one runs with a share above 0, its candidate
  becomes `Environment.candidate` (the ramp's split).
- `traffic_routing`: the environment's shadow rules (issue 12), composed into `Environment.shadow_rules`
  (`traffic_rules.compose_rules`: team and residency checked like a table's shadow).

Only the models the overlay touches are patched: their documents are compiled together with the file's
global sections by the same loader, so every rule of the table (references, residency, names) holds for
the composed table too, and a problem is reported by its path like any table problem. A change that
would break a rule is refused (the admin call gets 400, a file reload is refused), never skipped.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from gateway.environments.keyset import with_admin_keys
from gateway.environments.traffic_rules import compose_rules
from gateway.routing.loader import TableInvalid, compile_source, compile_table, read_table_file, table_dir
from gateway.routing.model import Canary, Environment, Model, Table
from gateway.routing.source import model_document

# A promotion in one of these states routes part of the environment's traffic to its candidate.
SPLITTING = frozenset({"RAMPING_UP", "PAUSED", "RAMPING_DOWN"})
# A promotion in one of these states still runs: a second promote call is refused (409).
RUNNING = frozenset({"RELEASING"}) | SPLITTING


@dataclass(frozen=True, slots=True)
class Base:
    """The table file as loaded: its compiled table and its small sections (all but models and keys).

    The parsed document of a large table is not kept (for 100,000 models it weighs more than the
    compiled table): the overlay patches a touched model's document written from the table
    (`gateway.routing.source.model_document`), which compiles to the same model.
    """

    sections: dict[str, Any]
    table: Table
    source: str

    @property
    def digest(self) -> str:
        return self.table.digest

    @property
    def doc(self) -> dict[str, Any]:
        """The document's sections, with `models` written from the table on access."""
        return {**self.sections, "models": ModelDocuments(self.table)}


class ModelDocuments(Mapping[str, dict[str, Any]]):
    """`doc["models"]` of a Base: each model's document, written afresh from the compiled table."""

    def __init__(self, table: Table) -> None:
        self.table = table

    def __getitem__(self, model_id: str) -> dict[str, Any]:
        return model_document(self.table.models[model_id], self.table)

    def __iter__(self) -> Iterator[str]:
        return iter(self.table.models)

    def __len__(self) -> int:
        return len(self.table.models)

    def __contains__(self, model_id: object) -> bool:
        return model_id in self.table.models


def read_base(path: str, previous: Base | None = None) -> Base:
    """Load the table file; reuse `previous` when the file's bytes did not change."""
    data, digest = read_table_file(path)
    if previous is not None and previous.digest == digest and previous.source == path:
        return previous
    table, sections = compile_source(data, digest=digest, source=path)
    return Base(sections, table, path)


def empty_overlay() -> dict[str, Any]:
    return {"revision": 0, "models": {}}


def compose(base: Base, overlay: Mapping[str, Any]) -> Table:
    """The serving table: `base` with the overlay's changes. Raises TableInvalid listing every problem."""
    table = _compose_models(base, overlay)
    keys = overlay.get("api_keys")
    return with_admin_keys(base.sections, table, keys) if keys else table


def _compose_models(base: Base, overlay: Mapping[str, Any]) -> Table:
    changes: Mapping[str, Any] = overlay.get("models") or {}
    models_now = base.table.models
    touched = {model_id: m for model_id, m in changes.items() if model_id in models_now}
    if not touched:
        return base.table
    sub = dict(base.sections)
    sub["models"] = {
        model_id: patch_model(model_document(models_now[model_id], base.table), m) for model_id, m in touched.items()
    }
    try:
        compiled = compile_table(sub, source=base.source, base_dir=table_dir(base.source))
    except TableInvalid as exc:
        raise TableInvalid([f"with the admin API's changes: {p}" for p in exc.problems]) from None
    problems: list[str] = []
    models = dict(base.table.models)
    for model_id, model in compiled.models.items():
        models[model_id] = _with_candidates(model, touched[model_id], problems)
    for model_id in compiled.models:  # after every model is in place: a rule may target another model
        models[model_id] = _with_rules(models, models[model_id], touched[model_id], problems)
    if problems:
        raise TableInvalid(problems)
    return dataclasses.replace(
        base.table, models=MappingProxyType(models), digest=composed_digest(base.digest, touched)
    )


def composed_digest(file_digest: str, changes: Mapping[str, Any]) -> str:
    canonical = json.dumps(changes, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(file_digest.encode() + b"\0" + canonical).hexdigest()


def orphans(base: Base, overlay: Mapping[str, Any]) -> list[str]:
    """Models the overlay changes that the table file no longer has (their changes wait, unused)."""
    return sorted(model_id for model_id in overlay.get("models") or {} if model_id not in base.table.models)


def patch_model(model_doc: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of one model's document with the overlay's changes applied (the file's is never modified)."""
    doc = copy.deepcopy(dict(model_doc))
    deployments = doc.get("deployments") or {}
    for dep_id, change in (changes.get("deployments") or {}).items():
        if dep_id in deployments and "status" in change:
            deployments[dep_id]["status"] = change["status"]
    environments = doc.setdefault("environments", {})
    deleted = list(doc.get("deleted_environments") or ())
    for name, change in (changes.get("environments") or {}).items():
        if change.get("deleted"):
            environments.pop(name, None)
            if name not in deleted:
                deleted.append(name)
            continue
        if name in deleted:
            deleted.remove(name)  # created again through the API
        env = {} if change.get("replace") or name not in environments else environments[name]
        for key, value in (change.get("set") or {}).items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = copy.deepcopy(value)
        environments[name] = env
    if deleted or "deleted_environments" in doc:
        doc["deleted_environments"] = deleted
    return doc


def _with_candidates(model: Model, changes: Mapping[str, Any], problems: list[str]) -> Model:
    """Put each splitting promotion's candidate and share on its environment."""
    envs: dict[str, Environment] | None = None
    for name, change in (changes.get("environments") or {}).items():
        promotion = change.get("promotion")
        if not promotion or promotion.get("status") not in SPLITTING or not promotion.get("percent"):
            continue
        env = model.environments.get(name)
        path = f"admin store: models.{model.id}.environments.{name}.promotion"
        dep = model.deployments.get(promotion.get("deployment_id", ""))
        if env is None:
            continue  # the environment is gone (deleted): nothing to split
        if dep is None:
            problems.append(f"{path}: candidate deployment {promotion.get('deployment_id')!r} no longer exists")
            continue
        if env.region is not None and dep.region != env.region:
            problems.append(
                f"{path}: candidate deployment {dep.id!r} runs in region {dep.region!r}, "
                f"but environment {name!r} is pinned to region {env.region!r}"
            )
            continue
        if envs is None:
            envs = dict(model.environments)
        envs[name] = dataclasses.replace(env, candidate=Canary(dep, float(promotion["percent"])))
    if envs is None:
        return model
    return dataclasses.replace(model, environments=MappingProxyType(envs))


def _with_rules(models: Mapping[str, Model], model: Model, changes: Mapping[str, Any], problems: list[str]) -> Model:
    """Put each environment's traffic routing rules (issue 12, `traffic_rules`) on it."""
    envs = dict(model.environments)
    found = False
    for name, change in (changes.get("environments") or {}).items():
        if change.get("traffic_routing") and name in envs:
            envs[name] = compose_rules(models, model, envs[name], change["traffic_routing"], problems)
            found = True
    return dataclasses.replace(model, environments=MappingProxyType(envs)) if found else model


def default_store_path(config: str) -> str:
    """The admin store sits next to the table file: `routing.yaml` -> `routing.yaml.admin.json`."""
    path = Path(config)
    return str(path.with_name(path.name + ".admin.json"))
