"""The replica sets of a gateway worker: one `EndpointSet` per deployment, kept across table swaps,
with the background work some deployments ask for (issue 5):

- `endpoints_srv`: an `SrvDiscovery` task keeps the set's addresses in step with the SRV records;
- `health_check` on a deployment with several addresses (`endpoints` or `endpoints_srv`): a
  `HealthProber` task probes every replica. A deployment reached only through its plane's `url` is
  one address that is never ejected, so it is not probed.

`ReplicaSets.get(route)` is the call path: one dict lookup and an identity check. `sync(table)` runs
at start and on every table swap: it starts, retargets or stops the background work, and forgets the
deployments that left the table. `close()` stops everything (gateway shutdown).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from gateway.metrics import Metrics
from gateway.routing.model import Deployment, Table, Upstream
from gateway.routing.resolve import Route
from gateway.upstream.balance import EndpointSet, replica_count, replica_layout
from gateway.upstream.connect import Connector
from gateway.upstream.discovery import SrvDiscovery
from gateway.upstream.health import MAX_STATUS_LINE, HealthProber, probe, probe_head

Key = tuple[str, str]  # (model id, deployment id), as `balance.deployment_key`


@dataclass(slots=True, eq=False)
class _Entry:
    deployment: Deployment  # the deployment in the newest table
    endpoints: EndpointSet  # the newest set (older ones forward to it)
    routed: Deployment | None = None  # the deployment object the set was last laid out for by `get`
    discovery: SrvDiscovery | None = None
    prober: HealthProber | None = None


class ReplicaSets:
    """Per-deployment replica sets for one worker; see the module docstring.

    `connector` is the worker's one region-checked connector: discovery asks its current resolver
    (replaced when the nameservers change) and probes connect through it, like calls do.
    """

    def __init__(self, connector: Connector, metrics: Metrics | None) -> None:
        self._connector = connector
        self._resolver = lambda: connector.resolver
        self._metrics = metrics
        self._entries: dict[Key, _Entry] = {}
        self._table: Table | None = None

    # -- the call path --------------------------------------------------------------------------------

    def get(self, route: Route) -> EndpointSet:
        """The deployment's replica set, with its health state carried across swaps and discovery."""
        dep = route.deployment
        entry = self._entries.get((route.model.id, dep.id))
        if entry is not None and entry.routed is dep:
            return entry.endpoints
        return self._lay_out(route, entry)

    def _lay_out(self, route: Route, entry: _Entry | None) -> EndpointSet:
        dep = route.deployment
        env = route.model.environments.get(route.environment)
        target = env.autoscaling.concurrency_target if env is not None else None
        if entry is None:
            entry = self._entries[(route.model.id, dep.id)] = _Entry(dep, EndpointSet.for_deployment(dep, target))
        elif entry.deployment is not dep:
            return entry.endpoints  # a call still on an older table: the set follows the newest one
        else:
            current = entry.endpoints
            if dep.endpoints_srv is not None:  # addresses come from discovery; only the capacity is laid out
                upstreams = tuple(ep.upstream for ep in current.endpoints)
                entry.endpoints = current.updated(upstreams, target, replicas=len(upstreams),
                                                  unavailable=current.unavailable)  # fmt: skip
            else:
                entry.endpoints = current.updated(*replica_layout(dep, target), replicas=replica_count(dep))
        entry.routed = dep
        return entry.endpoints

    # -- table swaps and shutdown ---------------------------------------------------------------------

    def sync(self, table: Table) -> None:
        """Follow a new table: start, retarget or stop discovery and probes; drop departed deployments."""
        self._table = table
        kept: set[Key] = set()
        for model in table.models.values():
            for dep in model.deployments.values():
                key = (model.id, dep.id)
                entry = self._entries.get(key)
                if entry is None and not _needs_background(dep):
                    continue  # laid out by the first call, as before
                if entry is None:
                    entry = self._entries[key] = _Entry(dep, EndpointSet.for_deployment(dep, None))
                entry.deployment = dep
                kept.add(key)
                self._sync_discovery(key, entry)
                self._sync_prober(key, entry)
        for key in [key for key in self._entries if key not in kept]:
            self._stop(self._entries.pop(key))

    def close(self) -> None:
        """Stop every discovery and probe task (the gateway is shutting down)."""
        for entry in self._entries.values():
            self._stop(entry)

    def discovery(self, model_id: str, deployment_id: str) -> SrvDiscovery | None:
        entry = self._entries.get((model_id, deployment_id))
        return entry.discovery if entry is not None else None

    def prober(self, model_id: str, deployment_id: str) -> HealthProber | None:
        entry = self._entries.get((model_id, deployment_id))
        return entry.prober if entry is not None else None

    def __repr__(self) -> str:
        entries = self._entries.values()
        discovering = sum(1 for e in entries if e.discovery is not None)
        probing = sum(1 for e in entries if e.prober is not None)
        return f"<ReplicaSets {len(self._entries)} deployments | {discovering} discovered | {probing} probed>"

    # -- background work ------------------------------------------------------------------------------

    def _sync_discovery(self, key: Key, entry: _Entry) -> None:
        dep, old = entry.deployment, entry.discovery
        scheme = dep.plane.url.scheme
        if old is not None and dep.endpoints_srv == old.name and scheme == old.scheme:
            return  # the same name: keep following it, replicas and their state stay
        if old is not None:
            old.stop()
            entry.discovery = None
        if dep.endpoints_srv is None:
            return
        what = f"deployment '{dep.id}' of model '{key[0]}'"
        entry.endpoints = entry.endpoints.updated(
            (), replicas=0, unavailable=f"replicas of {what} not discovered yet (SRV {dep.endpoints_srv!r})"
        )

        def on_answer(upstreams: tuple[Upstream, ...], reason: str | None) -> None:
            entry.endpoints = entry.endpoints.updated(upstreams, replicas=len(upstreams), unavailable=reason)

        entry.discovery = SrvDiscovery(dep.endpoints_srv, scheme, self._resolver, on_answer, what=what).start()

    def _sync_prober(self, key: Key, entry: _Entry) -> None:
        dep = entry.deployment
        check = dep.health_check if dep.endpoints or dep.endpoints_srv is not None else None
        if check is None:
            if entry.prober is not None:
                entry.prober.stop()
                entry.prober = None
            return
        if entry.prober is not None:
            entry.prober.check = check  # the next round uses the new setting; views are kept
            return

        async def probe_one(up: Upstream) -> str:
            dep, table = entry.deployment, self._table
            hc = dep.health_check
            if table is None or hc is None:
                return "no_address"
            region = table.regions[dep.plane.region]
            connector = self._connector
            ctx = connector.ssl_for(dep.plane) if up.scheme == "https" else None

            async def open_stream(up: Upstream) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
                return await connector.open_stream(
                    up.host,
                    up.port,
                    region,
                    timeout=hc.timeout_seconds,
                    tls=ctx,
                    limit=MAX_STATUS_LINE,  # type: ignore[union-attr]
                )

            head = probe_head(up, hc.path, key[0], dep.id)
            return await probe(up, head, hc.timeout_seconds, open_stream)

        entry.prober = HealthProber(key, check, lambda: entry.endpoints, probe_one, self._metrics).start()

    @staticmethod
    def _stop(entry: _Entry) -> None:
        if entry.discovery is not None:
            entry.discovery.stop()
            entry.discovery = None
        if entry.prober is not None:
            entry.prober.stop()
            entry.prober = None


def _needs_background(dep: Deployment) -> bool:
    return dep.endpoints_srv is not None or (dep.health_check is not None and bool(dep.endpoints))
