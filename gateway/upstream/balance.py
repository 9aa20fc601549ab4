"""Replica balancing, passive outlier ejection and retry decisions (issue 5; SPEC §3 `endpoints`, §6).

Everything here is pure and synchronous: no sockets, no event loop. Time comes from an
injected clock and randomness from an injected `random.Random`, so every decision can be
replayed in a test. The proxy carries the decisions out:

- one `EndpointSet` per deployment (`deployment_key`), rebuilt with `updated()` when a table
  swap changes its addresses or its concurrency target;
- `pick()` before connecting, `started()` / `finished()` around each upstream attempt;
- `should_retry()` and a `RetryBudget` after a failed attempt; a retry goes to `pick(exclude=...)`.

Endpoint health is the state machine `TRANSITIONS` (data, in the manner of h11's `_state.py`):

    HEALTHY --FAILURE_THRESHOLD / HEALTH_FAIL--> EJECTED --BACKOFF_EXPIRED / HEALTH_OK / CAP_RELEASE--> PROBING
    PROBING --SUCCESS--> HEALTHY          PROBING --FAILURE_THRESHOLD / HEALTH_FAIL--> EJECTED

A PROBING endpoint is back in rotation but on probation: one failure ejects it again with a
doubled back-off, one success makes it HEALTHY and resets the back-off.
"""

from __future__ import annotations

import enum
import math
import random
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from gateway.routing.model import Deployment, Upstream

Clock = Callable[[], float]
Outcome = Literal["ok", "connect_failure", "failure", "cancelled"]
OUTCOMES: frozenset[str] = frozenset(("ok", "connect_failure", "failure", "cancelled"))
FAILURE_OUTCOMES: frozenset[str] = frozenset(("connect_failure", "failure"))
PROTOCOLS: frozenset[str] = frozenset(("http", "websocket", "grpc"))


# -- the health state machine, as data ----------------------------------------------------------


class Health(enum.Enum):
    HEALTHY = "healthy"  # in rotation
    EJECTED = "ejected"  # out of rotation until its back-off expires or a health check passes
    PROBING = "probing"  # back in rotation after an ejection; the next outcome decides


class Event(enum.Enum):
    FAILURE_THRESHOLD = "failure_threshold"  # consecutive failures reached the threshold (1 while PROBING)
    BACKOFF_EXPIRED = "backoff_expired"  # the ejection's back-off is over (seen lazily, at the next call)
    SUCCESS = "success"  # an attempt finished `ok`
    HEALTH_FAIL = "health_fail"  # an active health check failed
    HEALTH_OK = "health_ok"  # an active health check passed
    CAP_RELEASE = "cap_release"  # `updated()` shrank the set below the ejected endpoints: released early


H, E = Health, Event
TRANSITIONS: Mapping[tuple[Health, Event], Health] = MappingProxyType(
    {
        (H.HEALTHY, E.SUCCESS): H.HEALTHY,
        (H.HEALTHY, E.HEALTH_OK): H.HEALTHY,
        (H.HEALTHY, E.FAILURE_THRESHOLD): H.EJECTED,
        (H.HEALTHY, E.HEALTH_FAIL): H.EJECTED,
        (H.EJECTED, E.BACKOFF_EXPIRED): H.PROBING,
        (H.EJECTED, E.HEALTH_OK): H.PROBING,
        (H.EJECTED, E.CAP_RELEASE): H.PROBING,
        (H.EJECTED, E.HEALTH_FAIL): H.EJECTED,  # stays out; the ejection is extended, not doubled
        (H.PROBING, E.SUCCESS): H.HEALTHY,  # resets the back-off
        (H.PROBING, E.HEALTH_OK): H.PROBING,  # only real traffic confirms a returning endpoint
        (H.PROBING, E.FAILURE_THRESHOLD): H.EJECTED,
        (H.PROBING, E.HEALTH_FAIL): H.EJECTED,
    }
)
del H, E


class InvalidTransition(RuntimeError):
    """An event that the health state machine does not accept in the current state (a bug in the caller)."""

    def __init__(self, state: Health, event: Event) -> None:
        valid = sorted(e.name for (s, e) in TRANSITIONS if s is state)
        super().__init__(f"endpoint health: event {event.name} is invalid in state {state.name} (valid: {valid})")
        self.state = state
        self.event = event


def transition(state: Health, event: Event) -> Health:
    """The state after `event` in `state`; raises `InvalidTransition` when the table has no such edge."""
    try:
        return TRANSITIONS[state, event]
    except KeyError:
        raise InvalidTransition(state, event) from None


# -- policy -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EjectionPolicy:
    """Passive outlier ejection settings, shared by every `EndpointSet` of a gateway.

    `max_ejected_percent` caps ejections at floor(endpoints * percent / 100): with 50 %, one of
    2 or 3 endpoints, two of 4 or 5, and never the only endpoint.
    """

    consecutive_failures: int = 5
    max_ejected_percent: float = 50.0
    backoff_base_seconds: float = 5.0
    backoff_max_seconds: float = 300.0

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1:
            raise ValueError(f"consecutive_failures must be at least 1, not {self.consecutive_failures}")
        if not 0 <= self.max_ejected_percent <= 100:
            raise ValueError(f"max_ejected_percent must be within 0..100, not {self.max_ejected_percent}")
        if not 0 < self.backoff_base_seconds <= self.backoff_max_seconds:
            raise ValueError(
                f"backoff_base_seconds ({self.backoff_base_seconds}) must be above 0 and at most "
                f"backoff_max_seconds ({self.backoff_max_seconds})"
            )

    def max_ejected(self, endpoints: int) -> int:
        """How many of `endpoints` may be ejected at once: floor(endpoints * percent / 100)."""
        return math.floor(endpoints * self.max_ejected_percent / 100)

    def backoff(self, ejections: int) -> float:
        """Back-off of the `ejections`-th ejection since the endpoint last served: base * 2**(n-1), capped."""
        return min(self.backoff_base_seconds * 2.0 ** min(ejections - 1, 64), self.backoff_max_seconds)


DEFAULT_POLICY = EjectionPolicy()


# -- endpoints ----------------------------------------------------------------------------------


class Endpoint:
    """One replica address and its balancing state. Read it freely; only `EndpointSet` changes it.

    Equality and hashing are by identity: `updated()` carries the same object over to the next set,
    so a call started before a table swap finishes on the endpoint it started on.
    """

    __slots__ = ("upstream", "capacity", "in_flight", "state", "failures", "ejections", "ejected_until")

    def __init__(self, upstream: Upstream, capacity: int | None) -> None:
        self.upstream = upstream
        self.capacity = capacity  # concurrent calls this address is meant to take; None = unbounded
        self.in_flight = 0
        self.state = Health.HEALTHY
        self.failures = 0  # consecutive failures since the last success or state change
        self.ejections = 0  # ejections since the endpoint last served successfully (the back-off level)
        self.ejected_until = 0.0  # clock time; meaningful while EJECTED

    def __repr__(self) -> str:
        cap = "" if self.capacity is None else f"/{self.capacity}"
        until = f" until {self.ejected_until:g}" if self.state is Health.EJECTED else ""
        return (
            f"<Endpoint {self.upstream.base_url} {self.state.name}{until} | in-flight {self.in_flight}{cap} | "
            f"failures {self.failures} | ejections {self.ejections}>"
        )


def replica_count(deployment: Deployment, discovered: int = 0) -> int:
    """How many replicas a deployment has, for backpressure (SPEC §6, §12 `replicas`).

    Listed `endpoints`: one replica each. `endpoints_srv`: the `discovered` SRV targets (0 until the
    first answer). Otherwise the plane's `url` stands for `replicas` (default 1).
    `EndpointSet.replica_count()` answers the same for a live set.
    """
    if deployment.endpoints_srv is not None:
        return discovered
    if deployment.endpoints:
        return len(deployment.endpoints)
    return deployment.replicas or 1


def deployment_key(deployment: Deployment) -> tuple[str, str]:
    """The identity an `EndpointSet` is kept under: (model id, deployment id), stable across table swaps."""
    return (deployment.model_id, deployment.id)


def replica_layout(deployment: Deployment, concurrency_target: int | None) -> tuple[tuple[Upstream, ...], int | None]:
    """The addresses of a deployment and the capacity of each (SPEC §3 `endpoints`, §6 backpressure).

    Listed `endpoints` are one replica each, so each takes `concurrency_target` calls. Without
    them the plane's `url` stands for all `replicas` (default 1) and takes target x replicas.
    A `replicas` field next to listed endpoints is not used for capacity. None = unbounded.
    With `endpoints_srv` the addresses are discovered at run time (`gateway.upstream.discovery`):
    none here, and each discovered target is one replica taking `concurrency_target` calls.
    """
    if concurrency_target is not None and concurrency_target < 1:
        raise ValueError(f"concurrency_target must be at least 1, not {concurrency_target}")
    if deployment.endpoints_srv is not None:
        return (), concurrency_target
    if deployment.endpoints:
        return deployment.endpoints, concurrency_target
    per_url = None if concurrency_target is None else concurrency_target * (deployment.replicas or 1)
    return (deployment.plane.url,), per_url


class _Unchanged(enum.Enum):
    UNCHANGED = "unchanged"


UNCHANGED = _Unchanged.UNCHANGED


class EndpointSet:
    """The replicas of one deployment: power-of-two-choices picks and passive outlier ejection.

    Outcomes (`finished`): `ok`; `connect_failure` (refused, unreachable, or timed out
    connecting); `failure` (a 5xx answered by the plane, or the call broke mid-way; which 5xx
    count is the caller's choice); `cancelled` (the client went away: neither success nor
    failure). Only `connect_failure` and `failure` count towards ejection; a 4xx is `ok`.

    After `updated()` this set is superseded: every method then acts on the newest set, so a
    caller that kept a reference across a table swap still balances and counts correctly.

    A set may be empty while an SRV-discovered deployment has no replicas (not yet discovered, or
    the SRV name stopped resolving): `pick` then returns None and `unavailable` says why.
    """

    def __init__(
        self,
        key: Hashable,
        upstreams: Sequence[Upstream],
        capacity: int | None = None,
        *,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
        policy: EjectionPolicy = DEFAULT_POLICY,
        replicas: int | None = None,
        unavailable: str | None = None,
    ) -> None:
        """`capacity` is per address (see `replica_layout`); `replicas` defaults to one per address.

        Raises ValueError for duplicate addresses, and for no address unless `unavailable` says why.
        """
        self.key = key
        self.clock = clock
        self.rng = rng if rng is not None else random.Random()
        self.policy = policy
        self._capacity = _check_capacity(capacity)
        self._endpoints = tuple(Endpoint(u, self._capacity) for u in _check_upstreams(upstreams, unavailable))
        self._members = frozenset(self._endpoints)
        self._replicas = len(self._endpoints) if replicas is None else replicas
        self.unavailable = unavailable if not self._endpoints else None
        self._successor: EndpointSet | None = None
        self._refused = 0

    @classmethod
    def for_deployment(
        cls,
        deployment: Deployment,
        concurrency_target: int | None,
        *,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
        policy: EjectionPolicy = DEFAULT_POLICY,
    ) -> EndpointSet:
        """A new set for `deployment`, keyed by `deployment_key`, laid out by `replica_layout`.

        An `endpoints_srv` deployment starts empty (`unavailable` says so) until discovery fills it.
        """
        upstreams, capacity = replica_layout(deployment, concurrency_target)
        unavailable = None
        if deployment.endpoints_srv is not None:
            unavailable = (
                f"replicas of deployment '{deployment.id}' not discovered yet (SRV {deployment.endpoints_srv!r})"
            )
        return cls(deployment_key(deployment), upstreams, capacity, clock=clock, rng=rng, policy=policy,
                   replicas=replica_count(deployment, len(upstreams)), unavailable=unavailable)  # fmt: skip

    def updated(
        self,
        upstreams: Sequence[Upstream],
        capacity: int | None | _Unchanged = UNCHANGED,
        *,
        replicas: int | None = None,
        unavailable: str | None = None,
    ) -> EndpointSet:
        """The set for a new address list; this one is superseded and forwards to it.

        Addresses that remain keep their Endpoint object (state, failures, back-off, calls in
        flight); new ones start HEALTHY. Calls still in flight on a removed address finish without
        effect. If the remaining ejected endpoints exceed the cap of the new size, those whose
        back-off ends first return early (CAP_RELEASE). `capacity` defaults to the current one;
        `replicas` to one per address. An empty list needs `unavailable`, the reason calls get.
        """
        current = self._newest()
        new = EndpointSet.__new__(EndpointSet)
        new.key, new.clock, new.rng, new.policy = current.key, current.clock, current.rng, current.policy
        new._refused = current._refused
        new._successor = None
        if capacity is UNCHANGED:
            capacity = current._capacity
        new._capacity = capacity = _check_capacity(capacity)
        old = {ep.upstream: ep for ep in current._endpoints}
        new._endpoints = tuple(old.get(u) or Endpoint(u, capacity) for u in _check_upstreams(upstreams, unavailable))
        new._members = frozenset(new._endpoints)
        new._replicas = len(new._endpoints) if replicas is None else replicas
        new.unavailable = unavailable if not new._endpoints else None
        for ep in new._endpoints:
            ep.capacity = capacity
        new._release_over_cap(new.clock())
        current._successor = new
        return new

    # -- picking --------------------------------------------------------------------------------

    def pick(self, exclude: frozenset[Endpoint | Upstream] = frozenset()) -> Endpoint | None:
        """The endpoint for the next attempt, or None when none is eligible.

        Eligible: not EJECTED (back-offs are checked against the clock here) and neither it nor its
        Upstream in `exclude`. Of two distinct eligible endpoints drawn at random, the one with
        fewer calls in flight relative to its capacity wins (ties: the first drawn). A single
        eligible endpoint is returned without drawing. Does not count the call: see `started`.
        """
        s = self._newest()
        s._expire(s.clock())
        endpoints: Sequence[Endpoint] = s._endpoints
        if len(endpoints) == 1 and not exclude:  # the common single-replica case, without a scan
            only = endpoints[0]
            return None if only.state is Health.EJECTED else only
        if exclude or any(ep.state is Health.EJECTED for ep in endpoints):
            endpoints = [
                ep
                for ep in endpoints
                if ep.state is not Health.EJECTED and ep not in exclude and ep.upstream not in exclude
            ]
        n = len(endpoints)
        if n <= 1:
            return endpoints[0] if n else None
        i = s.rng.randrange(n)
        j = s.rng.randrange(n - 1)
        a, b = endpoints[i], endpoints[j + (j >= i)]
        # a.in_flight / a.capacity <= b.in_flight / b.capacity, in integers
        return a if a.in_flight * (b.capacity or 1) <= b.in_flight * (a.capacity or 1) else b

    def pick_or_least_loaded(self, exclude: frozenset[Endpoint | Upstream] = frozenset()) -> Endpoint | None:
        """`pick`, or when every candidate is ejected, the least loaded of them anyway (Envoy's panic
        mode): an ejected replica may be back before its back-off ends, as after a restart, and
        trying it beats failing the call. None only when `exclude` leaves nothing at all."""
        ep = self.pick(exclude)
        if ep is not None:
            return ep
        candidates = [e for e in self._newest()._endpoints if e not in exclude and e.upstream not in exclude]
        return min(candidates, key=lambda e: e.in_flight, default=None)

    # -- outcomes -------------------------------------------------------------------------------

    def started(self, ep: Endpoint) -> None:
        """Count an attempt on `ep` as in flight until `finished(ep, ...)`."""
        ep.in_flight += 1

    def finished(self, ep: Endpoint, outcome: Outcome) -> None:
        """End an attempt started on `ep` and feed its outcome to outlier ejection.

        A failure counts towards `consecutive_failures` (1 while PROBING) and `ok` resets the
        count; `cancelled` only ends the attempt. Outcomes of attempts on an EJECTED endpoint (calls
        that started before it was ejected) or on an address a table swap removed only end the
        attempt. An ejection the `max_ejected_percent` cap refuses leaves the endpoint in rotation,
        and each further failure tries again. Raises ValueError for an unknown outcome or an
        attempt that was never started.
        """
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}; expected one of {sorted(OUTCOMES)}")
        if ep.in_flight < 1:
            raise ValueError(f"finished() without started() on {ep!r}")
        ep.in_flight -= 1
        s = self._newest()
        if outcome == "cancelled" or ep not in s._members:
            return
        now = s.clock()
        s._expire(now)
        if ep.state is Health.EJECTED:
            return
        if outcome == "ok":
            ep.failures = 0
            s._apply(ep, Event.SUCCESS, now)
            return
        ep.failures += 1
        threshold = 1 if ep.state is Health.PROBING else s.policy.consecutive_failures
        if ep.failures >= threshold:
            s._apply(ep, Event.FAILURE_THRESHOLD, now)

    def health_result(self, ep: Endpoint, healthy: bool) -> None:
        """Feed an active health check of `ep`.

        Unhealthy ejects (the same back-off and cap as passive ejection), and extends the ejection
        of an endpoint already out. Healthy returns an ejected endpoint to rotation as PROBING. A
        result for an address a table swap removed is ignored.
        """
        s = self._newest()
        if ep not in s._members:
            return
        now = s.clock()
        s._expire(now)
        s._apply(ep, Event.HEALTH_OK if healthy else Event.HEALTH_FAIL, now)

    # -- admission (§6 backpressure) and inspection ---------------------------------------------

    def in_flight_total(self) -> int:
        """Attempts in flight across the current addresses."""
        return sum(ep.in_flight for ep in self._newest()._endpoints)

    def capacity(self) -> int | None:
        """The deployment's concurrency: the sum of per-address capacities, or None when unbounded.

        0 for an empty (SRV, nothing discovered) set with a concurrency target.
        """
        s = self._newest()
        return None if s._capacity is None else s._capacity * len(s._endpoints)

    def replica_count(self) -> int:
        """The deployment's replicas for backpressure (SPEC §6): listed endpoints, discovered SRV
        targets (0 while none), or the plane url's `replicas` (see `replica_count()` the function)."""
        return self._newest()._replicas

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """The current endpoints, in table order."""
        return self._newest()._endpoints

    def ejected_count(self) -> int:
        """Endpoints out of rotation now (an expired back-off does not count, even before `pick` sees it)."""
        s = self._newest()
        now = s.clock()
        return sum(1 for ep in s._endpoints if s._is_ejected(ep, now))

    @property
    def refused_ejections(self) -> int:
        """Ejections the `max_ejected_percent` cap refused so far (for metrics)."""
        return self._newest()._refused

    @property
    def superseded(self) -> bool:
        return self._successor is not None

    def __repr__(self) -> str:
        s = self._newest()
        n = len(s._endpoints)
        flights = "/".join(str(ep.in_flight) for ep in s._endpoints)
        prefix = "superseded -> " if s is not self else ""
        noun = "endpoint" if n == 1 else "endpoints"
        if not n:
            return f"<EndpointSet {prefix}no endpoints | unavailable: {s.unavailable}>"
        return f"<EndpointSet {prefix}{n} {noun} | {s.ejected_count()} ejected | in-flight {flights}>"

    # -- internals ------------------------------------------------------------------------------

    def _newest(self) -> EndpointSet:
        s = self
        while s._successor is not None:
            s = s._successor
        return s

    @staticmethod
    def _is_ejected(ep: Endpoint, now: float) -> bool:
        return ep.state is Health.EJECTED and now < ep.ejected_until

    def _expire(self, now: float) -> None:
        for ep in self._endpoints:
            if ep.state is Health.EJECTED and now >= ep.ejected_until:
                self._apply(ep, Event.BACKOFF_EXPIRED, now)

    def _apply(self, ep: Endpoint, event: Event, now: float) -> None:
        """Run one transition of `ep` and its effects; the cap guards every entry into EJECTED."""
        target = transition(ep.state, event)
        entering = target is Health.EJECTED and ep.state is not Health.EJECTED
        if entering and self._ejected_states() >= self.policy.max_ejected(len(self._endpoints)):
            self._refused += 1
            return
        if entering:
            ep.ejections += 1
            ep.ejected_until = now + self.policy.backoff(ep.ejections)
        elif target is Health.EJECTED:  # HEALTH_FAIL while out: extend, keep the level
            ep.ejected_until = max(ep.ejected_until, now + self.policy.backoff(ep.ejections))
        if target is Health.HEALTHY and ep.state is Health.PROBING:
            ep.ejections = 0
        if target is not ep.state:
            ep.failures = 0
        ep.state = target

    def _ejected_states(self) -> int:
        return sum(1 for ep in self._endpoints if ep.state is Health.EJECTED)

    def _release_over_cap(self, now: float) -> None:
        self._expire(now)
        ejected = sorted((ep for ep in self._endpoints if ep.state is Health.EJECTED), key=lambda ep: ep.ejected_until)
        for ep in ejected[: max(0, len(ejected) - self.policy.max_ejected(len(self._endpoints)))]:
            self._apply(ep, Event.CAP_RELEASE, now)


def _check_upstreams(upstreams: Iterable[Upstream], unavailable: str | None = None) -> tuple[Upstream, ...]:
    result = tuple(upstreams)
    if not result and not unavailable:
        raise ValueError("an endpoint set needs at least one address (or the reason it has none)")
    if len(set(result)) != len(result):
        raise ValueError(f"duplicate addresses in {[u.base_url for u in result]}")
    return result


def _check_capacity(capacity: int | None) -> int | None:
    if capacity is not None and capacity < 1:
        raise ValueError(f"capacity must be at least 1 or None, not {capacity}")
    return capacity


# -- retries ------------------------------------------------------------------------------------


def should_retry(
    *, bytes_sent: int, streaming: bool, protocol: str, attempt: int, max_attempts: int = 2, outcome: str
) -> bool:
    """Whether a failed attempt may be sent again, to another endpoint (`pick(exclude=...)`).

    Only a `connect_failure` with no byte of the request written (`bytes_sent == 0`) is safe: the
    plane cannot have seen the call. Never once the request body started flowing (`streaming`),
    never for `websocket` or `grpc`, and only while `attempt` (1 = the first try) is below
    `max_attempts` (2 = one retry). The caller must also hold `RetryBudget.can_retry()`.
    Raises ValueError for an unknown outcome or protocol and for counts out of range.
    """
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown outcome {outcome!r}; expected one of {sorted(OUTCOMES)}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {sorted(PROTOCOLS)}")
    if bytes_sent < 0 or attempt < 1 or max_attempts < 1:
        raise ValueError(
            f"bytes_sent >= 0, attempt >= 1, max_attempts >= 1: got {bytes_sent}, {attempt}, {max_attempts}"
        )
    return (
        outcome == "connect_failure"
        and bytes_sent == 0
        and not streaming
        and protocol == "http"
        and attempt < max_attempts
    )


class RetryBudget:
    """Bounds retries to a share of recent traffic, so retries cannot multiply an outage.

    A retry is allowed while, counting it, the retries in the window stay within
    max(min_per_second * window_seconds, ratio * requests in the window). The window is kept
    in 10 slots of window_seconds / 10: an event stops counting between 0.9 and 1 window after it
    was recorded. Call `record_request()` once per client call (not per retry attempt).
    """

    SLOTS = 10

    def __init__(
        self, ratio: float = 0.2, min_per_second: float = 10, window_seconds: float = 10, clock: Clock = time.monotonic
    ) -> None:
        if ratio < 0 or min_per_second < 0 or window_seconds <= 0:
            raise ValueError(
                f"ratio >= 0, min_per_second >= 0, window_seconds > 0: got {ratio}, {min_per_second}, {window_seconds}"
            )
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.window_seconds = window_seconds
        self.clock = clock
        self._slot_seconds = window_seconds / self.SLOTS
        self._ids = [-(2**62)] * self.SLOTS  # the absolute slot number each entry counts for
        self._requests = [0] * self.SLOTS
        self._retries = [0] * self.SLOTS

    def record_request(self) -> None:
        """Count one client call in the window."""
        self._requests[self._current()] += 1

    def record_retry(self) -> None:
        """Count one retry attempt in the window (call it when the retry is sent)."""
        self._retries[self._current()] += 1

    def can_retry(self) -> bool:
        """Whether one more retry fits the budget now. Does not record it."""
        requests, retries = self._totals()
        return retries + 1 <= self._limit(requests)

    def __repr__(self) -> str:
        requests, retries = self._totals()
        return (
            f"<RetryBudget {retries} retries / {requests} requests in {self.window_seconds:g} s | "
            f"limit {self._limit(requests):g}>"
        )

    def _limit(self, requests: int) -> float:
        return max(self.min_per_second * self.window_seconds, self.ratio * requests)

    def _current(self) -> int:
        slot = math.floor(self.clock() / self._slot_seconds)
        i = slot % self.SLOTS
        if self._ids[i] != slot:
            self._ids[i], self._requests[i], self._retries[i] = slot, 0, 0
        return i

    def _totals(self) -> tuple[int, int]:
        slot = math.floor(self.clock() / self._slot_seconds)
        live = [i for i in range(self.SLOTS) if slot - self.SLOTS < self._ids[i] <= slot]
        return sum(self._requests[i] for i in live), sum(self._retries[i] for i in live)
