"""Rate limits and concurrency caps per API key and per team (SPEC §12 `rate_limit`, issue 13).

A call of a key with limits takes, when it arrives and before backpressure or the hold: a token
of the key's bucket and of its team's (`requests_per_second` refilled, `burst` deep) and one of
the open-call slots of each (`max_concurrent`). Past any of them it is refused with 429
`rate_limited` (gRPC RESOURCE_EXHAUSTED), `Retry-After`, and the IETF fields `RateLimit-Policy` /
`RateLimit` (draft-ietf-httpapi-ratelimit-headers-09, structured-field lists). A refused call
takes nothing. The slots are given back once, when the call ends (`Permit.release`), whatever
the protocol and however it ends; a held call keeps its slots while it waits.

Per worker without a database store: each worker process counts its own calls. With one (fleet
mode, SPEC §13) the limits hold fleet-wide: each counter is sized to this member's part of its
limit (`place`, after each exchange of usage through the store, `gateway.stores.ratelimits`;
the parts: `gateway.calls.fleetshare`), and a call is still decided here alone, never waiting
on the database. While the store is stale each limit does as its `fleet_failure` says: "open"
counts the whole limit in this member, "closed" refuses (429, kind "store").

`decide` is pure (the counters and the time in, a refusal or None out); `Limiter` keeps the
counters and applies it. A table reload keeps a counter whose limit did not change as it is; a
changed one is retuned (its tokens capped at the new burst, its open calls kept).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

from gateway.calls.fleetshare import FleetView, LimitId, Usage, part
from gateway.errors import RateLimited
from gateway.metrics import Metrics
from gateway.routing.model import ApiKey, RateLimit, Table

RETRY_AFTER_CONCURRENCY = 1  # a slot frees when any open call ends: try again soon
RETRY_AFTER_STORE = 2  # fail-closed while the fleet store is stale (stale after 2 s without an exchange)
DEMAND_WEIGHT = 0.5  # of the last exchange period in a counter's demand (an exponential average)
PRUNE_AT = 4096  # counters kept before idle ones (a full bucket, nothing open) are forgotten
WHO = {"key": "API key", "team": "team"}


class TokenBucket:
    """`burst` tokens at most, refilled at `rate` per second from `now`; a call takes one."""

    __slots__ = ("rate", "burst", "tokens", "at")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.at = now

    def __repr__(self) -> str:
        return f"<TokenBucket {self.tokens:.1f}/{self.burst:g} +{self.rate:g}/s>"

    def level(self, now: float) -> float:
        return min(self.burst, self.tokens + max(0.0, now - self.at) * self.rate)

    def wait(self, now: float) -> float:
        """Seconds until a token is there; 0.0 when one is there now."""
        return max(0.0, (1.0 - self.level(now)) / self.rate)

    def take(self, now: float) -> bool:
        """One token at time `now`; False (nothing taken) when the bucket has none."""
        tokens = self.level(now)
        self.at = now
        if tokens < 1.0:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1.0
        return True

    def retune(self, rate: float, burst: float, now: float) -> None:
        self.tokens = min(float(burst), self.level(now))
        self.at = now
        self.rate = rate
        self.burst = float(burst)


def default_burst(rate: float) -> int:
    """A rate without a burst: one second's worth (at least one call)."""
    return max(1, math.ceil(rate))


class Counter:
    """The state of one key's (`limit` "key") or team's ("team") limits in this worker: the whole
    limit, or in fleet mode this member's part of it (`share` of the rate and burst, `slots`)."""

    __slots__ = ("limit", "name", "spec", "bucket", "in_flight", "policy", "cap", "share", "slots", "closed",
                 "arrivals", "demand", "settled")  # fmt: skip

    def __init__(self, limit: str, name: str, spec: RateLimit, now: float) -> None:
        self.limit = limit
        self.name = name
        self.spec: RateLimit = spec
        self.bucket: TokenBucket | None = None
        self.in_flight = 0  # open calls, counted whether or not max_concurrent is set
        self.cap: int | None = None  # the open calls allowed here: max_concurrent, or this member's slots
        self.share = 1.0  # of the rate and the burst (fleet mode; 1.0: the whole limit)
        self.slots: int | None = None  # fleet mode: this member's cap (None: the whole max_concurrent)
        self.closed = False  # fleet mode, the store stale and fleet_failure "closed": refuse every call
        self.arrivals = 0  # calls since the last exchange, admitted or not (fleet mode's demand)
        self.demand = 0.0  # calls a second, averaged over the last exchanges
        # The demand this member reported one exchange before the last, which its own part is computed
        # from: the others' reports it reads are as recent or more, so when demand starts on every
        # member at once none takes a share the others have not seen yet (the shares then sum to 1 or less).
        self.settled = 0.0
        self.policy = policy_items(limit, spec)
        self.fit(now)

    def __repr__(self) -> str:
        part = f" share {self.share:.2f}" if self.share != 1.0 else ""
        return f"<Counter {self.limit} {self.name!r} {self.in_flight} open{part} | {self.bucket!r}>"

    def retune(self, spec: RateLimit, now: float) -> None:
        """Apply `spec`; the same limit as before changes nothing (a reload keeps the state)."""
        if spec is self.spec or spec == self.spec:  # the same table's object: the common case, cheap
            return
        self.spec = spec
        self.policy = policy_items(self.limit, spec)
        self.fit(now)

    def place(self, share: float, slots: int | None, closed: bool, now: float) -> None:
        """Fleet mode: this member's part of the limit (after an exchange, or the store stale)."""
        if (share, slots, closed) != (self.share, self.slots, self.closed):
            self.share, self.slots, self.closed = share, slots, closed
            self.fit(now)

    def fit(self, now: float) -> None:
        """Size the bucket and the cap to the limit, or to this member's part of it."""
        spec = self.spec
        rate = spec.requests_per_second
        if rate is None:
            self.bucket = None
        else:
            burst: float = spec.burst or default_burst(rate)
            if self.share < 1.0:  # a bucket holds one call at least, or this member could admit none
                rate, burst = rate * self.share, max(1.0, burst * self.share)
            if self.bucket is None:
                self.bucket = TokenBucket(rate, burst, now)
            else:
                self.bucket.retune(rate, burst, now)
        self.cap = spec.max_concurrent if self.slots is None or spec.max_concurrent is None else self.slots

    def report(self, elapsed: float) -> Usage:
        """Fleet mode, at each exchange: the demand over the `elapsed` seconds since the last, and the open calls."""
        self.settled = self.demand
        if elapsed > 0.0:
            self.demand += DEMAND_WEIGHT * (self.arrivals / elapsed - self.demand)
        self.arrivals = 0
        return Usage(self.demand, self.in_flight)

    def idle(self, now: float) -> bool:
        """Nothing open and a full bucket: the same as a fresh counter, so it may be forgotten."""
        return self.in_flight == 0 and (self.bucket is None or self.bucket.level(now) >= self.bucket.burst)


# -- the decision (pure) ---------------------------------------------------------------------------


class Refusal(NamedTuple):
    limit: str  # "key" | "team"
    name: str  # the key's name or the team's (never a key itself)
    kind: str  # "rate" | "concurrency" | "store" (fleet mode: the store stale, fleet_failure "closed")
    retry_after: int  # seconds


def decide(now: float, counters: Sequence[Counter]) -> Refusal | None:
    """May one more call go at time `now`? None: yes (every bucket has a token, every cap room);
    else the first limit it is past, key before team, rate before concurrency."""
    for c in counters:
        if c.closed:
            return Refusal(c.limit, c.name, "store", RETRY_AFTER_STORE)
        bucket = c.bucket
        if bucket is not None:
            wait = bucket.wait(now)
            if wait > 0.0:
                return Refusal(c.limit, c.name, "rate", max(1, math.ceil(wait)))
        cap = c.cap
        if cap is not None and c.in_flight >= cap:
            return Refusal(c.limit, c.name, "concurrency", RETRY_AFTER_CONCURRENCY)
    return None


# -- the IETF fields (draft-ietf-httpapi-ratelimit-headers-09 §4, §5) ------------------------------


def policy_items(limit: str, spec: RateLimit) -> tuple[str, ...]:
    """`RateLimit-Policy` members of one limit, built once per limit. A token bucket is told as its
    burst (`q`) per the time it takes to refill (`w`, whole seconds, at least 1); a concurrency cap
    as `q` with the draft's `qu="concurrency"` unit and no window."""
    items = []
    rate = spec.requests_per_second
    if rate is not None:
        burst = spec.burst or default_burst(rate)
        items.append(f'"{limit}";q={burst};w={max(1, round(burst / rate))}')
    if spec.max_concurrent is not None:
        items.append(f'"{limit}-concurrency";q={spec.max_concurrent};qu="concurrency"')
    return tuple(items)


def state_items(now: float, c: Counter) -> list[str]:
    """`RateLimit` members of one limit at `now`: `r` what is left, `t` seconds until the bucket is full."""
    items = []
    bucket = c.bucket
    if bucket is not None:
        level = bucket.level(now)
        items.append(f'"{c.limit}";r={math.floor(level)};t={math.ceil((bucket.burst - level) / bucket.rate)}')
    if c.cap is not None:
        items.append(f'"{c.limit}-concurrency";r={max(0, c.cap - c.in_flight)}')
    return items


def fields(now: float, counters: Sequence[Counter]) -> tuple[tuple[str, str], ...]:
    """`RateLimit-Policy` and `RateLimit` for the limits a call is under."""
    policy = ", ".join(item for c in counters for item in c.policy)
    state = ", ".join(item for c in counters for item in state_items(now, c))
    return (("ratelimit-policy", policy), ("ratelimit", state))


def refused(refusal: Refusal, now: float, counters: Sequence[Counter]) -> RateLimited:
    who = f"{WHO[refusal.limit]} '{refusal.name}'"
    if refusal.kind == "rate":
        message = f"{who} is past its rate limit; retry in {refusal.retry_after} s"
    elif refusal.kind == "store":
        message = (f"{who} has fleet-wide limits with fleet_failure: closed, and the fleet store is unreachable; "
                   f"retry in {refusal.retry_after} s")  # fmt: skip
    else:
        message = f"{who} has its max_concurrent calls open; retry once one ends"
    return RateLimited(message, headers=(("retry-after", str(refusal.retry_after)), *fields(now, counters)))


# -- the worker's counters ---------------------------------------------------------------------------


def limits_of(table: Table, key: ApiKey) -> list[tuple[str, str, RateLimit]]:
    """The limits a call of `key` is under: (limit, name, spec), the key's then its team's. The one
    place limits are looked up: a key's own come with its record, whichever store it came from."""
    found = []
    if key.rate_limit is not None:
        found.append(("key", key.name, key.rate_limit))
    team = table.teams.get(key.team)
    if team is not None and team.rate_limit is not None:
        found.append(("team", team.name, team.rate_limit))
    return found


class Permit:
    """The open-call slots one admitted call holds; `release()` gives them back, once."""

    __slots__ = ("counters",)

    def __init__(self, counters: Sequence[Counter]) -> None:
        self.counters = counters

    def __repr__(self) -> str:
        return f"<Permit {', '.join(f'{c.limit} {c.name!r}' for c in self.counters) or 'none'}>"

    def header_lines(self, now: float) -> bytes:
        """`RateLimit-Policy` and `RateLimit` lines for an answer the call gets (HTTP/1.1); b"" unlimited."""
        if not self.counters:
            return b""
        return b"".join(b"%s: %s\r\n" % (name.encode(), value.encode()) for name, value in fields(now, self.counters))

    def release(self) -> None:
        for c in self.counters:
            c.in_flight -= 1
        self.counters = ()


NO_PERMIT = Permit(())  # a call under no limit (releasing it does nothing)


class Limiter:
    """The counters of one worker, by (limit, team, name); see the module docstring."""

    def __init__(self, metrics: Metrics, clock: Callable[[], float]) -> None:
        self.metrics = metrics
        self.clock = clock
        self.counters: dict[LimitId, Counter] = {}
        self.fleet = False  # fleet mode: the counters are parts of fleet-wide limits (`place`)
        self.view: FleetView | None = None  # fleet mode: the last exchange's; None: none yet, or the store stale
        self.reported_at: float | None = None

    def __repr__(self) -> str:
        mode = "" if not self.fleet else f" | fleet {'stale' if self.view is None else len(self.view.members)}"
        return (
            f"<Limiter {len(self.counters)} counters | {sum(c.in_flight for c in self.counters.values())} open{mode}>"
        )

    # -- fleet mode (gateway.stores.ratelimits drives these) -----------------------------------------

    def report(self) -> list[tuple[LimitId, Usage]]:
        """This member's usage of every limit it counts, for the next exchange."""
        now = self.clock()
        elapsed = 0.0 if self.reported_at is None else now - self.reported_at
        self.reported_at = now
        return [(lid, c.report(elapsed)) for lid, c in self.counters.items()]

    def place(self, view: FleetView | None) -> None:
        """Fit every counter to this member's part of its limit in `view`; None: the store is stale,
        each limit does as its fleet_failure says. `gateway_rate_limit_fleet_share` shows the parts."""
        self.fleet = True
        self.view = view
        now = self.clock()
        for lid, c in self.counters.items():
            self._place(lid, c, now)
        self.metrics.rate_limit_share.values = {(c.limit, c.name): 0.0 if c.closed else c.share
                                                for c in self.counters.values()}  # fmt: skip

    def _place(self, lid: LimitId, c: Counter, now: float) -> None:
        if self.view is None:
            c.place(1.0, None, c.spec.fleet_failure == "closed", now)
        else:
            share, cap = part(self.view, lid, c.spec, Usage(c.settled, c.in_flight))
            c.place(share, cap, False, now)

    def admit(self, table: Table, key: ApiKey) -> Permit:
        """Take one call's share of `key`'s limits and its team's; RateLimited (429) past one."""
        limits = limits_of(table, key)
        if not limits:
            return NO_PERMIT
        now = self.clock()
        counters = [self._counter(limit, key.team, name, spec, now) for limit, name, spec in limits]
        for c in counters:
            c.arrivals += 1
        refusal = decide(now, counters)
        if refusal is not None:
            self.metrics.rate_limited.inc((refusal.limit, refusal.name, refusal.kind))
            raise refused(refusal, now, counters)
        for c in counters:
            if c.bucket is not None:
                c.bucket.take(now)
            c.in_flight += 1
        return Permit(counters)

    def _counter(self, limit: str, team: str, name: str, spec: RateLimit, now: float) -> Counter:
        lid = (limit, team, name)
        found = self.counters.get(lid)
        if found is None:
            if len(self.counters) >= PRUNE_AT:
                self.prune()
            found = self.counters[lid] = Counter(limit, name, spec, now)
            if self.fleet:
                self._place(lid, found, now)  # its part as of the last exchange (a full bucket of that part)
        else:
            found.retune(spec, now)
        return found

    def prune(self) -> None:
        """Forget idle counters (a table swap, or past PRUNE_AT): a new one starts the same."""
        now = self.clock()
        self.counters = {k: c for k, c in self.counters.items() if not c.idle(now)}
