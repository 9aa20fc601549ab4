"""Rate limits and concurrency caps per API key and per team (SPEC §12 `rate_limit`, issue 13).

A call of a key with limits takes, when it arrives and before backpressure or the hold: a token
of the key's bucket and of its team's (`requests_per_second` refilled, `burst` deep) and one of
the open-call slots of each (`max_concurrent`). Past any of them it is refused with 429
`rate_limited` (gRPC RESOURCE_EXHAUSTED), `Retry-After`, and the IETF fields `RateLimit-Policy` /
`RateLimit` (draft-ietf-httpapi-ratelimit-headers-09, structured-field lists). A refused call
takes nothing. The slots are given back once, when the call ends (`Permit.release`), whatever
the protocol and however it ends; a held call keeps its slots while it waits.

Per worker: each worker process counts its own calls (fleet-wide counters come with fleet mode,
SPEC §13). `decide` is pure (the counters and the time in, a refusal or None out); `Limiter`
keeps the counters and applies it. A table reload keeps a counter whose limit did not change as
it is; a changed one is retuned (its tokens capped at the new burst, its open calls kept).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

from gateway.errors import RateLimited
from gateway.metrics import Metrics
from gateway.routing.model import ApiKey, RateLimit, Table

RETRY_AFTER_CONCURRENCY = 1  # a slot frees when any open call ends: try again soon
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
    """The state of one key's (`limit` "key") or team's ("team") limits in this worker."""

    __slots__ = ("limit", "name", "spec", "bucket", "in_flight", "policy")

    def __init__(self, limit: str, name: str, spec: RateLimit, now: float) -> None:
        self.limit = limit
        self.name = name
        self.spec: RateLimit | None = None
        self.bucket: TokenBucket | None = None
        self.in_flight = 0  # open calls, counted whether or not max_concurrent is set
        self.policy: tuple[str, ...] = ()
        self.retune(spec, now)

    def __repr__(self) -> str:
        return f"<Counter {self.limit} {self.name!r} {self.in_flight} open | {self.bucket!r}>"

    def retune(self, spec: RateLimit, now: float) -> None:
        """Apply `spec`; the same limit as before changes nothing (a reload keeps the state)."""
        if spec is self.spec or spec == self.spec:  # the same table's object: the common case, cheap
            return
        rate = spec.requests_per_second
        if rate is None:
            self.bucket = None
        else:
            burst = spec.burst or default_burst(rate)
            if self.bucket is None:
                self.bucket = TokenBucket(rate, burst, now)
            else:
                self.bucket.retune(rate, burst, now)
        self.spec = spec
        self.policy = policy_items(self.limit, spec)

    def idle(self, now: float) -> bool:
        """Nothing open and a full bucket: the same as a fresh counter, so it may be forgotten."""
        return self.in_flight == 0 and (self.bucket is None or self.bucket.level(now) >= self.bucket.burst)


# -- the decision (pure) ---------------------------------------------------------------------------


class Refusal(NamedTuple):
    limit: str  # "key" | "team"
    name: str  # the key's name or the team's (never a key itself)
    kind: str  # "rate" | "concurrency"
    retry_after: int  # seconds


def decide(now: float, counters: Sequence[Counter]) -> Refusal | None:
    """May one more call go at time `now`? None: yes (every bucket has a token, every cap room);
    else the first limit it is past, key before team, rate before concurrency."""
    for c in counters:
        bucket = c.bucket
        if bucket is not None:
            wait = bucket.wait(now)
            if wait > 0.0:
                return Refusal(c.limit, c.name, "rate", max(1, math.ceil(wait)))
        cap = c.spec.max_concurrent if c.spec is not None else None
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
    if c.spec is not None and c.spec.max_concurrent is not None:
        items.append(f'"{c.limit}-concurrency";r={max(0, c.spec.max_concurrent - c.in_flight)}')
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
        self.counters: dict[tuple[str, str, str], Counter] = {}

    def __repr__(self) -> str:
        return f"<Limiter {len(self.counters)} counters | {sum(c.in_flight for c in self.counters.values())} open>"

    def admit(self, table: Table, key: ApiKey) -> Permit:
        """Take one call's share of `key`'s limits and its team's; RateLimited (429) past one."""
        limits = limits_of(table, key)
        if not limits:
            return NO_PERMIT
        now = self.clock()
        counters = [self._counter(limit, key.team, name, spec, now) for limit, name, spec in limits]
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
        found = self.counters.get((limit, team, name))
        if found is None:
            if len(self.counters) >= PRUNE_AT:
                self.prune()
            found = self.counters[(limit, team, name)] = Counter(limit, name, spec, now)
        else:
            found.retune(spec, now)
        return found

    def prune(self) -> None:
        """Forget idle counters (a table swap, or past PRUNE_AT): a new one starts the same."""
        now = self.clock()
        self.counters = {k: c for k, c in self.counters.items() if not c.idle(now)}
