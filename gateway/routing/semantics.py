"""Semantic validation: the cross-field rules of a routing table (references, residency, URLs, CIDRs, ...).

Runs after the schema; values whose structure is already reported are skipped, so one run lists every
problem.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gateway.routing.model import Upstream
from gateway.routing.problems import PRODUCTION, RESERVED_ENV, DocPath, Problem, quote
from gateway.routing.schema_gate import GATE
from gateway.routing.syntax import (
    HEX64,
    SyntaxProblem,
    dns_name,
    parse_host_port,
    parse_nameserver,
    parse_network,
    parse_srv_name,
    parse_upstream,
)


def as_dict(x: Any) -> dict[Any, Any]:
    return x if isinstance(x, dict) else {}


def _map_or_none(x: Any) -> dict[Any, Any] | None:
    return x if isinstance(x, dict) else None


def _list(x: Any) -> list[Any]:
    return x if isinstance(x, list) else []


def _str(x: Any) -> str | None:
    return x if isinstance(x, str) else None


def _int(x: Any) -> int | None:
    if type(x) is int or (type(x) is float and x.is_integer()):
        return int(x)
    return None


class Semantics:
    """Cross-field rules. Reads the raw document defensively: a value of the wrong type was already
    reported by the schema and is skipped here, so every other rule still runs."""

    def __init__(self, doc: Any, base_dir: Path) -> None:
        self.doc = as_dict(doc)
        self.base_dir = base_dir
        self.problems: list[Problem] = []
        # A section that is missing or not a mapping is reported by the schema; references into it
        # are then not checked (None), rather than each reported as unknown.
        self.regions = _map_or_none(self.doc.get("regions"))
        self.planes = _map_or_none(self.doc.get("planes"))
        self.teams = _map_or_none(self.doc.get("teams"))
        self.models = _map_or_none(self.doc.get("models"))
        regions = self.regions or {}
        self.plane_region = {  # only regions that exist: an unknown one is reported under planes
            name: region
            for name, p in (self.planes or {}).items()
            if isinstance(region := as_dict(p).get("region"), str) and region in regions
        }
        self.regional = {
            name: as_dict(as_dict(t).get("regional_environments")) for name, t in (self.teams or {}).items()
        }

    def run(self) -> list[Problem]:
        self.check_domains()
        self.check_gateway()
        self.check_regions()
        self.check_planes()
        self.check_teams()
        self.check_api_keys()
        for model_id, model in (self.models or {}).items():
            if isinstance(model, dict):
                self.check_model(("models", model_id), model)
        return self.problems

    def add(self, path: DocPath, message: str) -> None:
        self.problems.append((path, message))

    def ref(self, path: DocPath, value: Any, known: dict[Any, Any] | None, what: str) -> bool:
        """Report an unknown reference; True when `value` names something that exists."""
        if not isinstance(value, str) or known is None:
            return False
        if value not in known:
            self.add(path, f"unknown {what} {quote(value)}")
            return False
        return True

    def syntax(self, path: DocPath, value: Any, parse: Callable[[str], Any]) -> Any:
        if not isinstance(value, str):
            return None
        try:
            return parse(value)
        except SyntaxProblem as exc:
            self.add(path, str(exc))
            return None

    # top level

    def check_domains(self) -> None:
        first: dict[str, int] = {}
        for i, domain in enumerate(_list(self.doc.get("domains"))):
            path = ("domains", i)
            if not GATE.defs["domain"](domain):
                continue  # the schema explains it
            name = self.syntax(path, domain, dns_name)
            if name is None:
                continue
            name = name.removesuffix(".")
            if name in first:
                self.add(path, f"duplicate domain {quote(name)} (also domains[{first[name]}])")
            first.setdefault(name, i)

    def check_gateway(self) -> None:
        gateway = as_dict(self.doc.get("gateway"))
        for i, region in enumerate(_list(gateway.get("regions"))):
            self.ref(("gateway", "regions", i), region, self.regions, "region")
        servers = _list(as_dict(gateway.get("dns")).get("nameservers"))
        for i, server in enumerate(servers):
            self.syntax(("gateway", "dns", "nameservers", i), server, parse_nameserver)
        async_ = as_dict(gateway.get("async"))
        names: set[str] = set()
        for i, spec in enumerate(_list(async_.get("webhook_secrets"))):
            spec = as_dict(spec)
            path = ("gateway", "async", "webhook_secrets", i)
            if ("secret_env" in spec) == ("secret_file" in spec):
                self.add(
                    path, "give exactly one of 'secret_env' and 'secret_file' (secrets are never written in the table)"
                )
            name = spec.get("name")
            if isinstance(name, str) and name in names:  # a non-string name is the schema's problem, not a crash
                self.add((*path, "name"), f"duplicate webhook secret name {quote(name)}")
            names.add(str(name))
        retry = as_dict(async_.get("webhook_retry"))
        if isinstance(retry.get("initial_delay_ms"), int) and isinstance(retry.get("max_delay_ms"), int):
            if retry["initial_delay_ms"] > retry["max_delay_ms"]:
                self.add(("gateway", "async", "webhook_retry", "max_delay_ms"), "must be at least initial_delay_ms")

    def check_regions(self) -> None:
        for name, region in (self.regions or {}).items():
            for i, network in enumerate(_list(as_dict(region).get("networks"))):
                self.syntax(("regions", name, "networks", i), network, parse_network)

    def check_planes(self) -> None:
        for name, plane in (self.planes or {}).items():
            plane = as_dict(plane)
            path = ("planes", name)
            self.ref(path + ("region",), plane.get("region"), self.regions, "region")
            upstream = self.syntax(path + ("url",), plane.get("url"), parse_upstream)
            self.syntax(path + ("grpc",), plane.get("grpc"), parse_host_port)
            tls = plane.get("tls")
            if isinstance(tls, dict):
                self.check_tls(path + ("tls",), tls, upstream)

    def check_tls(self, path: DocPath, tls: dict[Any, Any], upstream: Upstream | None) -> None:
        if upstream is not None and upstream.scheme != "https":
            self.add(path, "tls is only allowed for https:// planes")
        if ("cert" in tls) != ("key" in tls):
            self.add(path, "cert and key go together: a client certificate needs its private key")
        for field in ("ca", "cert", "key"):
            value = tls.get(field)
            if isinstance(value, str) and value:
                problem = _file_problem(resolve_file(self.base_dir, value))
                if problem:
                    self.add(path + (field,), problem)

    def check_teams(self) -> None:
        for name, mapping in self.regional.items():
            for env, region in mapping.items():
                path = ("teams", name, "regional_environments", env)
                if env == RESERVED_ENV:
                    self.add(path, "'development' is reserved and is never a regional environment")
                self.ref(path, region, self.regions, "region")
        for name, team in (self.teams or {}).items():
            self.check_rate_limit(("teams", name, "rate_limit"), as_dict(team).get("rate_limit"))

    def check_rate_limit(self, path: DocPath, limit: Any) -> None:
        """SPEC §12 `rate_limit`: the schema checks each number; a burst is the depth of a rate's bucket."""
        limit = as_dict(limit)
        if "burst" in limit and "requests_per_second" not in limit:
            self.add(path + ("burst",), "a burst needs requests_per_second (it is the depth of that rate's bucket)")
        if "fleet_failure" in limit and "requests_per_second" not in limit and "max_concurrent" not in limit:
            self.add(
                path + ("fleet_failure",),
                "fleet_failure needs requests_per_second or max_concurrent (a limit to apply)",
            )

    def check_api_keys(self) -> None:
        digests: dict[str, DocPath] = {}
        list(self.check_keys("api_keys", digests))
        for i, key in self.check_keys("admin_keys", digests):
            scope, models = key.get("scope"), key.get("models")
            if scope == "model" and models is None:
                self.add(("admin_keys", i, "models"), "a key of scope 'model' lists the models it manages")
            elif scope == "team" and models is not None:
                self.add(
                    ("admin_keys", i, "models"), "a key of scope 'team' manages every model of its team: no 'models'"
                )

    def check_keys(self, section: str, digests: dict[str, DocPath]) -> Iterator[tuple[int, dict[str, Any]]]:
        """Names unique in the section, digests unique in both key sections, teams and models known; yields the keys."""
        names: dict[str, int] = {}
        for i, key in enumerate(_list(self.doc.get(section))):
            if not isinstance(key, dict):
                continue
            path = (section, i)
            name = _str(key.get("name"))
            if name is not None:
                if name in names:
                    self.add(path + ("name",), f"duplicate api key name {quote(name)} (also {section}[{names[name]}])")
                names.setdefault(name, i)
            digest = _str(key.get("sha256"))
            if digest is not None and HEX64.match(digest):
                digest = digest.lower()
                if digest in digests:
                    where = "".join(f"[{p}]" if isinstance(p, int) else p for p in digests[digest])
                    self.add(path + ("sha256",), f"the same key digest is already listed at {where}")
                digests.setdefault(digest, path)
            team_known = self.ref(path + ("team",), key.get("team"), self.teams, "team")
            self.check_rate_limit(path + ("rate_limit",), key.get("rate_limit"))
            for j, model_id in enumerate(_list(key.get("models"))):
                if self.ref(path + ("models", j), model_id, self.models, "model") and team_known:
                    owner = as_dict(as_dict(self.models).get(model_id)).get("team")
                    if isinstance(owner, str) and owner != key["team"]:
                        message = f"model {quote(model_id)} belongs to team {quote(owner)}"
                        self.add(path + ("models", j), f"{message}, not to the key's team {quote(key['team'])}")
            yield i, key

    # models

    def check_model(self, path: DocPath, model: dict[Any, Any]) -> None:
        team = model.get("team")
        self.ref(path + ("team",), team, self.teams, "team")
        deployments = as_dict(model.get("deployments"))
        development: Any = None
        for dep_id, dep in deployments.items():
            if not isinstance(dep, dict):
                continue
            dep_path = path + ("deployments", dep_id)
            self.ref(dep_path + ("plane",), dep.get("plane"), self.planes, "plane")
            self.check_endpoints(dep_path + ("endpoints",), _list(dep.get("endpoints")))
            self.check_srv(dep_path, dep)
            if dep.get("development") is True:
                if development is not None:
                    self.add(
                        dep_path + ("development",),
                        f"a model has at most one development deployment, and {quote(development)} already is",
                    )
                else:
                    development = dep_id
        pinned = self.regional.get(team, {}) if isinstance(team, str) else {}
        environments = as_dict(model.get("environments"))
        for env, environment in environments.items():
            if isinstance(environment, dict):
                self.check_environment(path + ("environments", env), env, environment, deployments, pinned)
        for i, env in enumerate(_list(model.get("deleted_environments"))):
            self.check_deleted(path + ("deleted_environments", i), env, environments)

    def check_endpoints(self, path: DocPath, endpoints: list[Any]) -> None:
        first: dict[Upstream, int] = {}
        for i, url in enumerate(endpoints):
            upstream = self.syntax(path + (i,), url, parse_upstream)
            if upstream is None:
                continue
            if upstream in first:
                self.add(path + (i,), f"the same endpoint is already listed at endpoints[{first[upstream]}]")
            first.setdefault(upstream, i)

    def check_srv(self, path: DocPath, dep: dict[Any, Any]) -> None:
        if "endpoints_srv" not in dep:
            return
        self.syntax(path + ("endpoints_srv",), dep["endpoints_srv"], parse_srv_name)
        if "endpoints" in dep:
            self.add(path + ("endpoints_srv",), "endpoints and endpoints_srv exclude each other: list the "
                     "replicas or discover them, not both")  # fmt: skip
        if "replicas" in dep:
            self.add(path + ("replicas",), "with endpoints_srv the replica count is the number of SRV targets "
                     "discovered; remove replicas")  # fmt: skip

    def check_environment(
        self,
        path: DocPath,
        env: Any,
        environment: dict[Any, Any],
        deployments: dict[Any, Any],
        pinned: dict[Any, Any],
    ) -> None:
        if env == RESERVED_ENV:
            self.add(path, "'development' is reserved (call /development/... for the development deployment)")
        region = pinned.get(env)
        if not isinstance(region, str) or region not in (self.regions or {}):
            region = None  # not pinned, or pinned to an unknown region (reported under teams)
        current = environment.get("deployment")
        self.check_target(path + ("deployment",), env, current, deployments, region)
        for role in ("canary", "shadow"):
            extra = environment.get(role)
            if not isinstance(extra, dict):
                continue
            if "deployment" not in environment:
                self.add(path + (role,), f"a {role} needs the environment to have a deployment")
            self.check_target(path + (role, "deployment"), env, extra.get("deployment"), deployments, region)
        scaling = as_dict(environment.get("autoscaling"))
        low, high = _int(scaling.get("min_replica")), _int(scaling.get("max_replica"))
        if low is not None and low > (1 if high is None else high):
            limit = "max_replica" if high is not None else "the default max_replica"
            self.add(path + ("autoscaling",), f"min_replica ({low}) is greater than {limit} ({high or 1})")

    def check_target(
        self, path: DocPath, env: Any, dep_id: Any, deployments: dict[Any, Any], region: str | None
    ) -> None:
        """A deployment named by an environment: it exists, and honours the environment's region."""
        if not self.ref(path, dep_id, deployments, "deployment") or region is None:
            return
        plane = as_dict(deployments[dep_id]).get("plane")
        plane_region = self.plane_region.get(plane) if isinstance(plane, str) else None
        if plane_region is not None and plane_region != region:
            self.add(
                path,
                f"deployment {quote(dep_id)} runs on plane {quote(plane)} in region {quote(plane_region)}, "
                f"but environment {quote(env)} is pinned to region {quote(region)}",
            )

    def check_deleted(self, path: DocPath, env: Any, environments: dict[Any, Any]) -> None:
        if env == PRODUCTION:
            self.add(path, "'production' cannot be deleted")
        elif env == RESERVED_ENV:
            self.add(path, "'development' is reserved and is not an environment")
        elif isinstance(env, str) and env in environments:
            self.add(path, f"environment {quote(env)} is also defined in environments; it is either live or deleted")


def resolve_file(base_dir: Path, name: str) -> Path:
    return Path(os.path.normpath(base_dir / name))


def _file_problem(path: Path) -> str | None:
    try:
        if not path.exists():
            return f"file not found: {path}"
        if not path.is_file():
            return f"not a regular file: {path}"
        if not os.access(path, os.R_OK):
            return f"file not readable: {path}"
    except (OSError, ValueError) as exc:
        return f"cannot use {quote(str(path))}: {exc}"
    return None
