"""Building: a validated document -> frozen dataclasses over read-only mappings (a `Table`)."""

from __future__ import annotations

import dataclasses
import operator
from pathlib import Path
from typing import Any

from gateway.routing.model import (
    AdminKey,
    ApiKey,
    AsyncLimits,
    AsyncSettings,
    Autoscaling,
    Canary,
    Deployment,
    Environment,
    FrozenDict,
    GatewaySettings,
    HealthCheck,
    Model,
    Plane,
    PlaneTLS,
    RateLimit,
    Region,
    Shadow,
    Table,
    Team,
    Timeouts,
    Upstream,
    WebhookRetry,
)
from gateway.routing.semantics import as_dict, resolve_file
from gateway.routing.syntax import (
    allowed_host_set,
    parse_host_port,
    parse_nameserver,
    parse_network,
    parse_srv_name,
    parse_upstream,
)

_DEFAULT_TIMEOUTS = Timeouts()
_DEFAULT_AUTOSCALING = Autoscaling()
_NO_NAMES: frozenset[str] = frozenset()
_TIMEOUT_FIELDS = tuple(f.name for f in dataclasses.fields(Timeouts))
# A deployment's fields in order, read in one C call (`Builder.clone_model`).
_DEPLOYMENT_FIELDS = tuple(f.name for f in dataclasses.fields(Deployment))
_deployment_values = operator.attrgetter(*_DEPLOYMENT_FIELDS)
_MODEL_ID_AT = _DEPLOYMENT_FIELDS.index("model_id")


def _frozen(mapping: dict[Any, Any]) -> FrozenDict:
    return FrozenDict(mapping)


def _health_check(*levels: Any) -> HealthCheck | None:
    """`health_check` of a plane, then of a deployment: field by field, the more specific wins.

    None when no level sets it, or when the most specific `enabled` is false.
    """
    given = [as_dict(level) for level in levels if level is not None]
    if not given:
        return None
    merged: dict[str, Any] = {}
    for level in given:
        merged.update(level)
    if not merged.pop("enabled", True):
        return None
    kinds = {"interval_seconds": float, "timeout_seconds": float, "unhealthy_threshold": int,
             "healthy_threshold": int, "path": str}  # fmt: skip
    return HealthCheck(**{k: kinds[k](v) for k, v in merged.items()})


def _timeouts(base: Timeouts, overrides: Any) -> Timeouts:
    """Field by field, the more specific level wins (SPEC §12)."""
    given = {k: float(v) for k, v in as_dict(overrides).items() if k in _TIMEOUT_FIELDS}
    return dataclasses.replace(base, **given) if given else base


def _copy(text: str) -> str:
    """A new string equal to `text` (str() and slicing return the same object)."""
    return text[:1] + text[1:]


def _with_model_id(dep: Deployment, model_id: str) -> Deployment:
    values = list(_deployment_values(dep))
    values[_MODEL_ID_AT] = model_id
    return Deployment(*values)


def _with_deployments(env: Environment, deployments: dict[str, Deployment]) -> Environment:
    """`env` (of a template model) pointing at the same-named deployments of another model."""
    dep, canary, shadow = env.deployment, env.canary, env.shadow
    return Environment(
        env.name,
        deployments[dep.id] if dep is not None else None,
        env.region,
        Canary(deployments[canary.deployment.id], canary.percent) if canary is not None else None,
        dataclasses.replace(shadow, deployment=deployments[shadow.deployment.id]) if shadow is not None else None,
        env.autoscaling,
        env.backpressure,
        # `candidate` is set by the admin overlay only, never by building
    )


class Builder:
    """Turns a validated document into a Table; the validation above guarantees every lookup here."""

    def __init__(self, doc: dict[str, Any], base_dir: Path) -> None:
        self.doc = doc
        self.base_dir = base_dir
        self.gateway = self.build_gateway(as_dict(doc.get("gateway")))
        self.planes = {name: self.build_plane(name, p) for name, p in doc["planes"].items()}
        # Effective timeouts per plane (plane > gateway > defaults), shared by its deployments.
        self.plane_timeouts = {
            name: _timeouts(self.gateway.timeouts, p.get("timeouts")) for name, p in doc["planes"].items()
        }
        self.teams = {name: self.build_team(name, t) for name, t in doc["teams"].items()}
        self._dep_timeouts: dict[tuple[str, tuple[tuple[str, Any], ...]], Timeouts] = {}
        self._upstreams: dict[str, Upstream] = {}
        self._shared: dict[tuple[type, Any], Any] = {}
        self._percents: dict[str, float] = {}
        self._texts: dict[str, str] = {}
        # A deployment without a health_check of its own has its plane's.
        self.plane_health = {name: self.health_check(name, None) for name in doc["planes"]}

    def table(self, digest: str, source: str, models: dict[str, Model] | None = None) -> Table:
        """The Table; `models` when they were built already (one by one, `routing.stream`)."""
        doc = self.doc
        if models is None:
            built = (self.build_model(model_id, m) for model_id, m in doc["models"].items())
            models = {model.id: model for model in built}
        keys = [self.build_key(k) for k in doc.get("api_keys", [])]
        return Table(
            version=1,
            digest=digest,
            domains=frozenset(d.lower().removesuffix(".") for d in doc["domains"]),
            gateway=self.gateway,
            regions=_frozen(
                {
                    name: Region(name, tuple(parse_network(n) for n in r.get("networks", [])))
                    for name, r in doc["regions"].items()
                }
            ),
            planes=_frozen(self.planes),
            teams=_frozen(self.teams),
            models=_frozen(models),
            api_keys=_frozen({key.sha256: key for key in keys}),
            source=source,
            admin_keys=_frozen({key.sha256: key for key in map(build_admin_key, doc.get("admin_keys", []))}),
        )

    def build_gateway(self, g: dict[str, Any]) -> GatewaySettings:
        regions = g.get("regions")
        return GatewaySettings(
            regions=frozenset(regions) if regions is not None else None,
            hold_timeout_seconds=float(g.get("hold_timeout_seconds", 300.0)),
            max_held_calls_per_deployment=int(g.get("max_held_calls_per_deployment", 1000)),
            timeouts=_timeouts(_DEFAULT_TIMEOUTS, g.get("timeouts")),
            dns_nameservers=tuple(parse_nameserver(s) for s in as_dict(g.get("dns")).get("nameservers", [])),
            async_settings=_async_settings(as_dict(g.get("async"))),
        )

    def build_plane(self, name: str, p: dict[str, Any]) -> Plane:
        tls = p.get("tls")
        return Plane(
            name=name,
            region=p["region"],
            url=parse_upstream(p["url"]),
            grpc=parse_host_port(p["grpc"]) if "grpc" in p else None,
            # None when the plane sets no timeouts of its own: it inherits table.gateway.timeouts.
            # Otherwise the full merge (plane > gateway > defaults), so readers never merge again.
            timeouts=_timeouts(self.gateway.timeouts, p["timeouts"]) if p.get("timeouts") else None,
            tls=PlaneTLS(**{k: str(resolve_file(self.base_dir, v)) for k, v in tls.items()}) if tls else None,
            health_check=_health_check(p.get("health_check")),
        )

    def build_team(self, name: str, t: dict[str, Any]) -> Team:
        limits = as_dict(t.get("async"))
        defaults = AsyncLimits()
        return Team(
            name,
            _frozen(dict(t.get("regional_environments", {}))),
            AsyncLimits(
                float(limits.get("submits_per_second", defaults.submits_per_second)),
                int(limits.get("max_queued", defaults.max_queued)),
                float(limits.get("status_calls_per_second", defaults.status_calls_per_second)),
            ),
            _rate_limit(t.get("rate_limit")),
        )

    def build_model(self, model_id: str, m: dict[str, Any]) -> Model:
        # A copy of the id: the table must not keep the parsed document's objects alive (see share).
        model_id = _copy(model_id)
        deployments = {
            self.text(dep_id): self.build_deployment(model_id, dep_id, d) for dep_id, d in m["deployments"].items()
        }
        pinned = self.teams[m["team"]].regional_environments
        environments = {
            self.text(env): self.build_environment(env, e, deployments, pinned.get(env))
            for env, e in m["environments"].items()
        }
        development = next((d for d in deployments.values() if d.development), None)
        deleted = m.get("deleted_environments")
        return Model(
            id=model_id,
            team=self.text(m["team"]),
            kind=self.text(m.get("kind", "model")),
            deployments=_frozen(deployments),
            environments=_frozen(environments),
            development=development,
            deleted_environments=self.share(frozenset(map(self.text, deleted))) if deleted else _NO_NAMES,
        )

    def clone_model(self, template: Model, model_id: str) -> Model:
        """`build_model(model_id, doc)` for a `doc` equal to the one `template` was built from.

        Everything but the model id is the template's (the same shared objects), so this costs a
        fraction of building: tables repeat the same model document for thousands of models.
        """
        model_id = _copy(model_id)
        deployments = {dep_id: _with_model_id(dep, model_id) for dep_id, dep in template.deployments.items()}
        environments = {name: _with_deployments(env, deployments) for name, env in template.environments.items()}
        development = template.development
        return Model(
            id=model_id,
            team=template.team,
            kind=template.kind,
            deployments=_frozen(deployments),
            environments=_frozen(environments),
            development=deployments[development.id] if development is not None else None,
            deleted_environments=template.deleted_environments,
        )

    def build_deployment(self, model_id: str, dep_id: str, d: dict[str, Any]) -> Deployment:
        plane = d["plane"]
        replicas = d.get("replicas")
        srv = d.get("endpoints_srv")
        endpoints = d.get("endpoints")
        health = d.get("health_check")
        return Deployment(
            self.text(dep_id),
            model_id,
            self.planes[plane],
            self.text(d.get("status", "active")),
            d.get("development", False),
            tuple(self.upstream(u) for u in endpoints) if endpoints else (),
            int(replicas) if replicas is not None else None,
            self.deployment_timeouts(plane, d.get("timeouts")),
            parse_srv_name(srv) if srv is not None else None,
            self.plane_health[plane] if health is None else self.health_check(plane, health),
            d.get("retry_on_reset", True),
        )

    def health_check(self, plane: str, health: Any) -> HealthCheck | None:
        found = _health_check(self.doc["planes"][plane].get("health_check"), health)
        return self.share(found) if found is not None else None

    def deployment_timeouts(self, plane: str, overrides: Any) -> Timeouts:
        if not overrides:
            return self.plane_timeouts[plane]
        key = (plane, tuple(sorted(overrides.items())))
        found = self._dep_timeouts.get(key)
        if found is None:
            found = self._dep_timeouts[key] = self.share(_timeouts(self.plane_timeouts[plane], overrides))
        return found

    def upstream(self, url: str) -> Upstream:
        found = self._upstreams.get(url)
        if found is None:
            found = self._upstreams[url] = self.share(parse_upstream(url))
        return found

    def share(self, value: Any) -> Any:
        """One object for equal values (settings): 100,000 models repeat the same few."""
        key = (type(value), value)
        found = self._shared.get(key)
        if found is None:
            found = self._shared[key] = value
        return found

    def text(self, value: Any) -> Any:
        """One string for equal names, a copy of the first one seen: the table must not keep the
        parsed document's strings (and with them its memory) alive."""
        found = self._texts.get(value)
        if found is None:
            found = self._texts[value] = _copy(value)
        return found

    def percent(self, value: Any) -> float:
        # Keyed by repr: -0.0 == 0.0 but must stay itself.
        number = float(value)
        found = self._percents.get(repr(number))
        if found is None:
            found = self._percents[repr(number)] = number
        return found

    def build_environment(
        self, name: str, e: dict[str, Any], deployments: dict[str, Deployment], region: str | None
    ) -> Environment:
        canary, shadow, scaling, backpressure = (
            e.get("canary"),
            e.get("shadow"),
            e.get("autoscaling"),
            e.get("backpressure"),
        )
        dep = e.get("deployment")
        return Environment(
            self.text(name),
            deployments[dep] if dep is not None else None,
            region,
            Canary(deployments[canary["deployment"]], self.percent(canary["percent"])) if canary else None,
            Shadow(
                deployments[shadow["deployment"]],
                self.percent(shadow["percent"]),
                int(shadow.get("max_body_bytes", 1024 * 1024)),
            )
            if shadow
            else None,
            self.build_autoscaling(scaling) if scaling else _DEFAULT_AUTOSCALING,
            self.text(backpressure.get("policy", "QUEUE_ON_FULL")) if backpressure else "QUEUE_ON_FULL",
        )

    def build_autoscaling(self, a: dict[str, Any]) -> Autoscaling:
        target = a.get("concurrency_target")
        return self.share(
            Autoscaling(
                min_replica=int(a.get("min_replica", 0)),
                max_replica=int(a.get("max_replica", 1)),
                concurrency_target=int(target) if target is not None else None,
            )
        )

    def build_key(self, k: dict[str, Any]) -> ApiKey:
        envs, models = k.get("environments"), k.get("models")
        return ApiKey(
            name=k["name"],
            team=k["team"],
            sha256=bytes.fromhex(k["sha256"]),
            environments=frozenset(envs) if envs is not None else None,
            models=frozenset(models) if models is not None else None,
            rate_limit=_rate_limit(k.get("rate_limit")),
        )


def _rate_limit(r: Any) -> RateLimit | None:
    """A key's or a team's `rate_limit` (SPEC §12); None when it sets no limit at all."""
    r = as_dict(r)
    rate, burst, concurrent = r.get("requests_per_second"), r.get("burst"), r.get("max_concurrent")
    if rate is None and concurrent is None:
        return None
    return RateLimit(
        float(rate) if rate is not None else None,
        int(burst) if burst is not None else None,
        int(concurrent) if concurrent is not None else None,
        str(r.get("fleet_failure", "open")),
    )


def build_admin_key(k: dict[str, Any]) -> AdminKey:
    models = frozenset(k["models"]) if k["scope"] == "model" else None
    return AdminKey(name=k["name"], team=k["team"], sha256=bytes.fromhex(k["sha256"]), models=models)


def _async_settings(a: dict[str, Any]) -> AsyncSettings:
    retry = as_dict(a.get("webhook_retry"))
    d = WebhookRetry()
    return AsyncSettings(
        result_ttl_seconds=int(a.get("result_ttl_seconds", AsyncSettings().result_ttl_seconds)),
        webhook_secrets=tuple(
            tuple(sorted((str(k), str(v)) for k, v in spec.items())) for spec in a.get("webhook_secrets", [])
        ),
        webhook_allowed_hosts=allowed_host_set(str(h) for h in a.get("webhook_allowed_hosts", [])),
        webhook_retry=WebhookRetry(
            int(retry.get("max_attempts", d.max_attempts)),
            int(retry.get("initial_delay_ms", d.initial_delay_ms)),
            int(retry.get("max_delay_ms", d.max_delay_ms)),
        ),
    )
