"""The protocol-neutral call pipeline (issue 10): admission, holds, replica pick, accounting.

Every front end is an adapter: it parses its protocol, resolves the route (`gateway.routing`),
then asks the worker's one `Pipeline` what to do with the call (`admit`), carries that out on its
own wire, and reports the end once (`CallRecord.end`). What is decided here is decided the same
way for HTTP/1.1, WebSocket and gRPC calls:

- rate limits and concurrency caps per API key and per team (`gateway.calls.ratelimit`): taken
  once when a call arrives (`limit`), before backpressure and the hold, given back at its end;
- admission by the environment's backpressure over the deployment's in-flight calls of every
  protocol (SPEC §6); a call released from the hold goes before new ones;
- one hold and one waker per deployment, shared by the protocols (`gateway.calls.holds`);
- the replica a call goes to (`EndpointSet.pick_or_least_loaded`) and its in-flight count;
- at the end, once: the replica's outcome (only the plane's faults eject it), in-flight, request
  count and latency, `gateway_upstream_errors_total{kind}`, and the slot it frees for a held call.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, NamedTuple

from gateway.calls.admission import RETRY_AFTER_REJECT, admission, concurrency_limit
from gateway.calls.constants import Constants
from gateway.calls.holds import Holds, Key, Reason, Waiting
from gateway.calls.info import CallInfo
from gateway.calls.outcome import error_kind, outcome_of
from gateway.calls.ratelimit import NO_PERMIT, Limiter, Permit
from gateway.environments.planecall import PlaneCaller
from gateway.errors import GatewayError, ModelUnavailable, RateLimited
from gateway.metrics import Metrics
from gateway.routing.model import ApiKey, Table
from gateway.routing.resolve import Route
from gateway.state import TableState
from gateway.upstream.balance import Endpoint, EndpointSet, Outcome, RetryBudget
from gateway.upstream.connect import Connector
from gateway.upstream.replicas import ReplicaSets

if TYPE_CHECKING:
    from gateway.obs.observer import Observer

log = logging.getLogger("gateway.calls")


class Go(NamedTuple):
    """Admitted: send the call to `endpoint` of `endpoints` (None: a gRPC call to a deployment
    whose replica set has no address now; it is counted on none)."""

    endpoints: EndpointSet
    endpoint: Endpoint | None


Decision = Go | Reason | GatewayError  # go, hold ("wake" / "full"), or answer with the error


class Pipeline:
    """One per worker, shared by every adapter; see the module docstring. It owns `connector`."""

    def __init__(self, state: TableState, metrics: Metrics, connector: Connector) -> None:
        self.state = state
        self.metrics = metrics
        self.connector = connector
        self.loop = asyncio.get_running_loop()
        self.budget = RetryBudget()
        # Replica sets per deployment, with SRV discovery and active health checks (issue 5).
        self.replicas = ReplicaSets(connector, metrics)
        self.replicas.sync(state.table)
        self.holds = Holds(self.loop, metrics, self.wake)
        self.caller = PlaneCaller(metrics)
        self.background: set[asyncio.Task] = set()
        self.constants = Constants()  # labels and identity fields of the serving table's routes
        self.limiter = Limiter(metrics, self.loop.time)  # rate_limit of keys and teams (fleet-wide: stores.ratelimits)
        # The access log and tracing (issue 13); None: off, and adapters build no CallInfo.
        self.observer: Observer | None = None
        state.on_swap.append(self._table_swapped)

    def __repr__(self) -> str:
        return f"<Pipeline {self.holds!r} | {self.connector!r}>"

    def close(self) -> None:
        self.holds.close()
        self.replicas.close()
        self.caller.close()
        self.connector.close()

    # -- admission ----------------------------------------------------------------------------

    def limit(self, key: ApiKey) -> Permit:
        """Once per call, when it arrives: its share of `key`'s and its team's `rate_limit`, to be
        released when it ends (`CallRecord.end` releases it for an admitted call); RateLimited past one."""
        table = self.state.table
        if key.rate_limit is None:  # the common case, without a call: no limit of its own, nor its team's
            team = table.teams.get(key.team)
            if team is None or team.rate_limit is None:
                return NO_PERMIT
        return self.limiter.admit(table, key)

    def admit(self, route: Route, *, released: bool = False, endpoint_needed: bool = True) -> Decision:
        """What to do with a routed call now (SPEC §6). `released`: it comes out of the hold, so it
        is at the head of the queue rather than behind the calls waiting. Without `endpoint_needed`
        (gRPC goes to the plane's gRPC address) a deployment with no replica address still goes."""
        dep = route.deployment
        if route.action == "hold":
            return "wake"
        endpoints = self.replicas.get(route)
        env = route.model.environments.get(route.environment)
        if env is not None:
            if env.autoscaling.concurrency_target is not None:
                waiting = 0 if released else self.holds.waiting((route.model.id, dep.id))
                limit = concurrency_limit(env, endpoints.replica_count())
                decision = admission(endpoints.in_flight_total(), limit, waiting, env.backpressure)
                if decision == "queue":
                    return "full"
                if decision == "reject":
                    return RateLimited(
                        f"deployment '{dep.id}' is at its concurrency limit; retry later",
                        headers=(("retry-after", RETRY_AFTER_REJECT),),
                    )
        ep = endpoints.pick_or_least_loaded()
        if ep is None and endpoint_needed:  # no replica: SRV discovery found none (yet); 503, never a crash
            return ModelUnavailable(endpoints.unavailable or f"deployment '{dep.id}' has no address")
        if env is not None:
            self.metrics.split.inc((route.model.id, route.environment, dep.id, route.side))
        return Go(endpoints, ep)

    def hold(self, held: Waiting, route: Route, labels: tuple, reason: Reason, deadline: float) -> bool:
        """Put `held` in its deployment's hold until `deadline` (loop time); False when it is full."""
        bound = self.state.table.gateway.max_held_calls_per_deployment
        return self.holds.add(held, route, labels, reason, deadline, bound)

    def begin(
        self, labels: tuple, go: Go, started: float, info: CallInfo | None = None, *, permit: Permit = NO_PERMIT,
        attempt: bool = True,
    ) -> CallRecord:  # fmt: skip
        """Account an admitted call; `info` (only with an observer) is reported at its end, `permit`
        (the key's rate_limit slots) released at its end. Without `attempt` the adapter names the
        first attempt's address itself (`CallRecord.attempt_to`)."""
        return CallRecord(self, labels, go, started, info, attempt, permit)

    def unadmitted(self, labels: tuple, code: str, started: float, info: CallInfo | None = None) -> None:
        """Count a call the pipeline never admitted (refused, answered by the gateway, held and dropped)."""
        self.metrics.requests.inc(labels + (code,))
        self.metrics.duration.observe(labels, self.loop.time() - started)
        if info is not None and self.observer is not None:
            self.observer.unadmitted(info, labels, code, started)

    # -- releasing held calls -------------------------------------------------------------------

    def _table_swapped(self, table: Table) -> None:
        self.constants = Constants()  # a new object: a call in flight keeps its own table's
        self.limiter.prune()
        self.connector.table_swapped(table)
        self.replicas.sync(table)  # after the connector: discovery asks its new resolver
        if self.holds.total:
            self.loop.call_soon(self._release_all)  # after every swap callback has seen the new table

    def _release_all(self) -> None:
        for held in self.holds.take_all():
            self._release(held)

    def _release(self, held: Waiting) -> str:
        outcome = held.release()
        if outcome != "held":
            self.holds.finish(held)  # its hold deadline no longer applies
        return outcome

    def slot_freed(self, key: Key) -> None:
        """One slot of deployment `key` freed: the longest-waiting call takes it; one answered
        without taking it passes it on."""
        while (held := self.holds.next_for_slot(key)) is not None:
            if self._release(held) != "answered":
                return

    # -- waking -------------------------------------------------------------------------------

    async def wake(self, route: Route, timeout: float, request_id: str | None = None) -> None:
        """`POST <plane url>/wake` with the identity headers of SPEC §4; failures are logged."""
        dep = route.deployment
        try:
            answer = await self.caller.call(
                self.state.table, dep, route.environment, "POST", "/wake", to_plane=True, timeout=timeout,
                request_id=request_id,
            )  # fmt: skip
        except GatewayError as error:
            log.warning("wake of %s/%s failed: %s", route.model.id, dep.id, error.message)
            return
        log.info("wake of %s/%s answered %s", route.model.id, dep.id, answer.status)

    def wake_soon(self, route: Route, request_id: str) -> None:
        """The wake endpoint's background call (it answered 202 already)."""
        timeout = route.deployment.timeouts.response_start_seconds
        task = self.loop.create_task(self.wake(route, timeout, request_id))
        self.background.add(task)
        task.add_done_callback(self.background.discard)


class CallRecord:
    """One admitted call's accounting, done once whatever protocol carried it."""

    __slots__ = ("pipeline", "labels", "started", "endpoints", "endpoint", "ended", "info", "permit")

    def __init__(
        self, pipeline: Pipeline, labels: tuple, go: Go, started: float, info: CallInfo | None = None,
        attempt: bool = True, permit: Permit = NO_PERMIT,
    ) -> None:  # fmt: skip
        self.pipeline = pipeline
        self.permit = permit  # the key's and team's open-call slots (gateway.calls.ratelimit)
        self.labels = labels  # model, environment, deployment, region, protocol
        self.started = started
        self.endpoints = go.endpoints
        self.endpoint = go.endpoint  # the attempt in flight; None once it ended
        self.ended = False
        pipeline.metrics.inflight.inc(labels)
        if go.endpoint is not None:
            go.endpoints.started(go.endpoint)
        pipeline.budget.record_request()
        self.info = info  # the access log's and tracing's view of the call; None when neither is on
        if info is not None and pipeline.observer is not None:
            if info.traced:  # the server span; nothing to do for a call only logged
                pipeline.observer.started(info, labels, started)
            if attempt and go.endpoint is not None:
                pipeline.observer.attempt(info, go.endpoint.upstream.authority)

    def __repr__(self) -> str:
        return f"<CallRecord {'/'.join(self.labels[:3])} {'ended' if self.ended else 'in flight'}>"

    def attempt_failed(self, error: GatewayError) -> None:
        """The attempt on the current endpoint failed before anything was sent (a connect failure)."""
        self._count_error(error)
        if self.endpoint is not None:
            self.endpoints.finished(self.endpoint, outcome_of(error, error.status))
            self.endpoint = None
        if self.info is not None and self.pipeline.observer is not None:
            self.pipeline.observer.attempt_failed(self.info, error)

    def retry_on(self, ep: Endpoint) -> None:
        """Go on with another attempt, on `ep`."""
        self.pipeline.budget.record_retry()
        self.endpoints.started(ep)
        self.endpoint = ep
        self.attempt_to(ep.upstream.authority)

    def attempt_to(self, address: str) -> None:
        """An attempt starts on the plane at `address` (observed calls only: the log's upstream, a client span)."""
        if self.info is not None and self.pipeline.observer is not None:
            self.pipeline.observer.attempt(self.info, address)

    def end(self, code: str, status: int = 0, error: GatewayError | None = None, *, judge: bool = True) -> None:
        """The call is over: `code` labels the request metric (HTTP status or gRPC code name);
        `status`/`error` give the replica's outcome (`judge=False`: no verdict, e.g. a gRPC call
        counted on a replica it did not use)."""
        if self.ended:
            return
        self.ended = True
        if self.permit.counters:
            self.permit.release()
        p = self.pipeline
        if error is not None:
            self._count_error(error)
        if self.endpoint is not None:
            if not judge:
                outcome: Outcome = "cancelled"
            elif error is None and status < 400:  # the common case, as outcome_of would judge it
                outcome = "ok"
            else:
                outcome = outcome_of(error, status)
            self.endpoints.finished(self.endpoint, outcome)
            self.endpoint = None
        p.metrics.inflight.dec(self.labels)
        p.metrics.requests.inc(self.labels + (code,))
        now = p.loop.time()
        p.metrics.duration.observe(self.labels, now - self.started)
        if self.info is not None and p.observer is not None:
            p.observer.ended(self.info, self.labels, code, self.started, error, now)
        if p.holds.full_waiting:  # a slot freed: the longest-waiting call of that deployment may go
            p.slot_freed((self.labels[0], self.labels[2]))

    def _count_error(self, error: GatewayError | None) -> None:
        kind = error_kind(error)
        if kind is not None:
            self.pipeline.metrics.upstream_errors.inc(self.labels + (kind,))
