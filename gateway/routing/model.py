"""The compiled routing table: immutable, validated, ready for O(1) lookups.

`gateway.routing.loader` builds a `Table` from a YAML/JSON document (SPEC §3) and
is the only place that creates these objects. Everything here is frozen: a
reload builds a new `Table` on the side and swaps one reference, so a request
keeps the snapshot it started with.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, NoReturn

DeploymentStatus = Literal["active", "scaled_to_zero", "inactive"]
ModelKind = Literal["model", "chain"]
BackpressurePolicy = Literal["QUEUE_ON_FULL", "REJECT_ON_FULL"]
SamplingMode = Literal["RANDOM", "USER_SESSION"]

EMPTY: Mapping = MappingProxyType({})


def _read_only(*args: object, **kwargs: object) -> NoReturn:
    raise TypeError("a compiled table's mappings are read-only")


def _no_attribute(name: str) -> property:
    def missing(self: object) -> NoReturn:
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    return property(missing)


class FrozenDict(dict):  # type: ignore[type-arg]
    """A read-only dict: the compiled table's mappings (a model's deployments and environments, ...).

    It reads like a `MappingProxyType` over a dict (item assignment raises TypeError, the mutating
    methods do not exist), but is the dict itself: a proxy per mapping cost 40 bytes, 8 MiB for a
    100,000-model table, and a lookup through a proxy costs one more indirection.
    """

    __slots__ = ()
    __setitem__ = __delitem__ = __ior__ = _read_only
    clear = _no_attribute("clear")
    pop = _no_attribute("pop")
    popitem = _no_attribute("popitem")
    setdefault = _no_attribute("setdefault")
    update = _no_attribute("update")

    def __repr__(self) -> str:
        return f"FrozenDict({dict.__repr__(self)})"


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Per-phase upstream limits in seconds (SPEC §12 `timeouts`)."""

    connect_seconds: float = 5.0
    response_start_seconds: float = 1200.0
    idle_seconds: float = 300.0
    total_seconds: float = 1200.0


@dataclass(frozen=True, slots=True)
class Region:
    name: str
    networks: tuple[str, ...] = ()  # CIDR strings; empty = no restriction


@dataclass(frozen=True, slots=True)
class Upstream:
    """One HTTP base address: scheme, host, port (parsed once at compile time)."""

    scheme: Literal["http", "https"]
    host: str
    port: int
    # host:port, as the Host header and the access log name it (read per call: made once)
    authority: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6 literals need brackets (RFC 3986)
        object.__setattr__(self, "authority", f"{host}:{self.port}")

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.authority}"


@dataclass(frozen=True, slots=True)
class PlaneTLS:
    ca: str | None = None
    cert: str | None = None
    key: str | None = None


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """Active health checks of a deployment's replicas (`health_check` on a plane or a deployment).

    Every `interval_seconds` each replica gets `GET path`; a 2xx within `timeout_seconds` passes,
    anything else fails. `unhealthy_threshold` failures in a row eject it (never more than half of a
    deployment), `healthy_threshold` passes in a row return it (`gateway.upstream.health`).
    """

    path: str = "/healthz"
    interval_seconds: float = 5.0
    timeout_seconds: float = 1.0
    unhealthy_threshold: int = 2
    healthy_threshold: int = 1


@dataclass(frozen=True, slots=True)
class Plane:
    name: str
    region: str
    url: Upstream
    grpc: str | None = None  # "host:port" for h2c
    timeouts: Timeouts | None = None  # plane-level override; None = inherit
    tls: PlaneTLS | None = None
    health_check: HealthCheck | None = None  # the plane's own setting; deployments hold the merged one


@dataclass(frozen=True, slots=True)
class Deployment:
    id: str
    model_id: str
    plane: Plane
    status: DeploymentStatus = "active"
    development: bool = False
    endpoints: tuple[Upstream, ...] = ()  # replica addresses; empty = plane.url
    replicas: int | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)  # fully resolved (deployment > plane > gateway)
    endpoints_srv: str | None = None  # SRV name whose targets are the replicas (exclusive with endpoints)
    health_check: HealthCheck | None = None  # fully resolved (deployment > plane); None = no active checks
    retry_on_reset: bool = True  # SPEC §12: one retry on another replica when the connection broke unanswered

    @property
    def region(self) -> str:
        return self.plane.region


@dataclass(frozen=True, slots=True)
class Canary:
    deployment: Deployment
    percent: float  # 0..100


@dataclass(frozen=True, slots=True)
class Shadow:
    deployment: Deployment
    percent: float  # 0..100
    max_body_bytes: int = 1024 * 1024
    # The fields below come from the admin API's traffic routing rules (issue 12); a table file's
    # shadow keeps the defaults: drawn per call, never expires, fire and forget.
    sampling_mode: SamplingMode = "RANDOM"  # USER_SESSION: sticky per caller, like a canary
    expires_at: float | None = None  # Unix seconds; past it, the shadow sends nothing
    propagate_cancellation: bool = False  # the copy is cancelled when the client goes away
    environment: str | None = None  # the x-baseten-environment of a copy to an environment target


@dataclass(frozen=True, slots=True)
class ShadowRule:
    """A traffic routing rule of the admin API (issue 12): the rule as stored, and the shadow it
    sends to now (None: its target deployment or environment is gone, so it sends nothing)."""

    id: str
    stored: Mapping[str, object]
    shadow: Shadow | None


@dataclass(frozen=True, slots=True)
class Autoscaling:
    min_replica: int = 0
    max_replica: int = 1
    concurrency_target: int | None = None


@dataclass(frozen=True, slots=True)
class Environment:
    name: str
    deployment: Deployment | None  # None: created but never promoted ("no deployment yet")
    region: str | None = None  # the team's regional mapping for this name, if any
    canary: Canary | None = None
    shadow: Shadow | None = None
    autoscaling: Autoscaling = field(default_factory=Autoscaling)
    backpressure: BackpressurePolicy = "QUEUE_ON_FULL"
    # A promotion in progress (SPEC §6): the candidate and its current share of the traffic.
    # Set only by the admin overlay (gateway/environments), never by the table file.
    candidate: Canary | None = None
    shadow_rules: tuple[ShadowRule, ...] = ()  # the admin API's traffic routing rules (issue 12)


@dataclass(frozen=True, slots=True)
class Model:
    id: str
    team: str
    kind: ModelKind
    deployments: Mapping[str, Deployment]
    environments: Mapping[str, Environment]
    development: Deployment | None = None
    deleted_environments: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class AsyncLimits:
    """A team's async limits (SPEC §10): past one, 429 `rate_limited` with Retry-After."""

    submits_per_second: float = 200.0
    max_queued: int = 50_000  # queued + in progress
    status_calls_per_second: float = 100.0  # status, result, cancel and queue-status calls


@dataclass(frozen=True, slots=True)
class RateLimit:
    """`rate_limit` of an API key or a team (SPEC §12): a token bucket of `requests_per_second`
    refilled, `burst` deep, and at most `max_concurrent` calls open at once; None = no such limit.
    `fleet_failure`: with a database store, what the limit does while the store is stale (SPEC §13):
    "open" each gateway enforces the whole limit by itself, "closed" refuses the calls."""

    requests_per_second: float | None = None
    burst: int | None = None  # with requests_per_second only; default max(1, requests_per_second)
    max_concurrent: int | None = None
    fleet_failure: str = "open"  # "open" | "closed" (gateway.calls.fleetshare)


@dataclass(frozen=True, slots=True)
class Team:
    name: str
    regional_environments: Mapping[str, str] = field(default_factory=lambda: EMPTY)  # env name -> region
    async_limits: AsyncLimits = field(default_factory=AsyncLimits)
    rate_limit: RateLimit | None = None  # shared by every key of the team (gateway.calls.ratelimit)


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    team: str
    sha256: bytes  # raw 32-byte digest of the whole key
    environments: frozenset[str] | None = None  # None = every environment
    models: frozenset[str] | None = None  # None = every model of the team
    rate_limit: RateLimit | None = None  # this key's own limits (gateway.calls.ratelimit)


@dataclass(frozen=True, slots=True)
class AdminKey:
    """A key of the admin listener (issue 12): `models` None = every model of `team` (scope `team`)."""

    name: str
    team: str
    sha256: bytes  # raw 32-byte digest of the whole key
    models: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class WebhookRetry:
    max_attempts: int = 12
    initial_delay_ms: int = 1000
    max_delay_ms: int = 600_000


@dataclass(frozen=True, slots=True)
class AsyncSettings:
    """`gateway.async` (SPEC §10, §12). Secrets are named sources ({name, secret_env} or {name,
    secret_file}), read by the async service, never kept in the table."""

    result_ttl_seconds: int = 3600
    webhook_secrets: tuple[tuple[tuple[str, str], ...], ...] = ()  # each spec as sorted (key, value) pairs
    webhook_allowed_hosts: frozenset[str] = frozenset()
    webhook_retry: WebhookRetry = field(default_factory=WebhookRetry)


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    regions: frozenset[str] | None = None  # None = serves every region's regional hosts
    hold_timeout_seconds: float = 300.0
    max_held_calls_per_deployment: int = 1000
    timeouts: Timeouts = field(default_factory=Timeouts)
    dns_nameservers: tuple[str, ...] = ()
    async_settings: AsyncSettings = field(default_factory=AsyncSettings)


@dataclass(frozen=True, slots=True)
class Table:
    version: int
    digest: str  # sha256 hex of the source document bytes
    domains: frozenset[str]  # lowercase, no trailing dot
    gateway: GatewaySettings
    regions: Mapping[str, Region]
    planes: Mapping[str, Plane]
    teams: Mapping[str, Team]
    models: Mapping[str, Model]
    api_keys: Mapping[bytes, ApiKey]  # by raw sha256 digest
    source: str = "<memory>"
    admin_keys: Mapping[bytes, AdminKey] = field(default_factory=lambda: EMPTY)  # by raw sha256 digest

    def __repr__(self) -> str:
        return (
            f"<Table v{self.version} {self.digest[:12]} | {len(self.models)} models, "
            f"{len(self.planes)} planes, {len(self.api_keys)} keys>"
        )
