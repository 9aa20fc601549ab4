"""Cache entries and what to do with them at a given moment. Pure: no clock, no I/O, no dnspython.

One entry per name (and per kind: addresses or SRV). `plan(entry, now, ...)` is the whole policy:

| entry at `now`                                        | use    | also start a background query |
|-------------------------------------------------------|--------|-------------------------------|
| none                                                  | QUERY  |                               |
| answer, before its refresh point                      | VALUE  | no                            |
| answer, in the last quarter of its TTL                | VALUE  | yes (refresh ahead)           |
| answer, expired < stale_seconds ago, last query failed| STALE  | yes, once `retry_at` passed   |
| answer, expired, last query did not fail              | QUERY  | (the caller waits for it)     |
| answer, expired >= stale_seconds ago                  | QUERY  | (ERROR before `retry_at`)     |
| negative (NXDOMAIN / no records), within its TTL      | ERROR  | no                            |
| failure only (never answered), before `retry_at`      | ERROR  | no                            |

After a caller's own QUERY finished, `plan(..., may_query=False)` maps what is left to VALUE, STALE
or ERROR; it never asks for another query, so a caller waits for at most one.

Stale answers follow RFC 8767 ("Serving Stale Data to Improve DNS Resiliency"): served only when
fresh data cannot be had, for a bounded time past the TTL, and after a failure the stale answer is
served at once (its "failure recheck timer", here `retry_seconds`) instead of making every caller
wait for another timeout.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

from gateway.dns.lookup import Failed, Negative, Outcome, Records

# Refresh ahead during the last quarter of the TTL when the name is used. Unbound's `prefetch`
# uses the last 10%; a quarter lets a name used every few seconds with a short TTL still be refreshed
# before it expires, so its callers never wait on a query.
REFRESH_AHEAD = 0.25
NEVER = -math.inf


class Use(enum.Enum):
    VALUE = "value"  # serve the cached answer
    STALE = "stale"  # serve the expired answer: the resolver is failing (RFC 8767)
    ERROR = "error"  # fail with the entry's negative answer or failure
    QUERY = "query"  # wait for a query (joining the one in flight), then plan again with may_query=False


@dataclass(frozen=True, slots=True)
class Entry:
    """What is known about one name; replaced whole, never mutated (a caller keeps its snapshot)."""

    value: tuple[Any, ...]  # addresses or (host, port) pairs; () for a negative or failure-only entry
    ttl: float  # the clamped TTL of `value` (or of the negative answer)
    expires: float  # end of the TTL
    refresh_at: float  # refresh ahead from here on (only for an answer)
    negative: str | None = None  # why the name has nothing (NXDOMAIN, no records): a negative answer
    failure: str | None = None  # why the latest query failed; None once a query succeeds
    retry_at: float = NEVER  # after a failure, no new query before this


@dataclass(frozen=True, slots=True)
class Plan:
    use: Use
    refresh: bool = False


SERVE = Plan(Use.VALUE)
QUERY = Plan(Use.QUERY)
ERROR = Plan(Use.ERROR)


def plan(entry: Entry | None, now: float, stale_seconds: float, *, may_query: bool = True) -> Plan:
    """What a caller does with `entry` at `now` (see the module table). Never QUERY when not `may_query`."""
    if entry is None:
        return QUERY if may_query else ERROR
    if entry.value:
        if now < entry.refresh_at:
            return SERVE
        if now < entry.expires:
            return Plan(Use.VALUE, refresh=may_query and now >= entry.retry_at)
        if now < entry.expires + stale_seconds and (entry.failure is not None or not may_query):
            return Plan(Use.STALE, refresh=may_query and now >= entry.retry_at)
        return QUERY if may_query and now >= entry.retry_at else ERROR
    if entry.negative is not None:
        return ERROR if now < entry.expires or not may_query else QUERY
    return ERROR if now < entry.retry_at or not may_query else QUERY  # failure only


def clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


def answered(value: tuple[Any, ...], ttl: float, now: float) -> Entry:
    """A fresh entry for an answer whose (already clamped) TTL starts at `now`."""
    return Entry(value, ttl, now + ttl, now + ttl * (1.0 - REFRESH_AHEAD))


def denied(reason: str, ttl: float, now: float) -> Entry:
    """A negative entry: the name has nothing to connect to, for `ttl` seconds."""
    return Entry((), ttl, now + ttl, now + ttl, negative=reason)


def failed(previous: Entry | None, reason: str, now: float, retry_seconds: float) -> Entry:
    """The entry after a failed query: a previous answer is kept (for stale use), marked failing."""
    if previous is not None and previous.value:
        return Entry(previous.value, previous.ttl, previous.expires, previous.refresh_at,
                     failure=reason, retry_at=now + retry_seconds)  # fmt: skip
    return Entry((), 0.0, NEVER, NEVER, failure=reason, retry_at=now + retry_seconds)


def combine_addresses(a: Outcome, aaaa: Outcome) -> Outcome:
    """One outcome for a name from its A and AAAA outcomes.

    Any addresses win: IPv4 first, then IPv6, each in answer order, with the smaller TTL; a family
    that failed while the other answered is left out (logged by the caller) rather than failing the
    name. No addresses and any failure: a failure (nothing is known). Both negative: negative.
    """
    answers = [o for o in (a, aaaa) if isinstance(o, Records) and o.values]
    if answers:
        return Records(tuple(v for o in answers for v in o.values), min(o.ttl for o in answers))
    failures = [o for o in (a, aaaa) if isinstance(o, Failed)]
    if failures:
        return Failed("; ".join(dict.fromkeys(f.reason for f in failures)))
    negatives = [o for o in (a, aaaa) if isinstance(o, Negative)]
    nxdomain = any(n.nxdomain for n in negatives)
    reason = "no such name (NXDOMAIN)" if nxdomain else "no A or AAAA records"
    if negatives and all(n.reason.startswith("not a valid DNS name") for n in negatives):
        reason = negatives[0].reason
    return Negative(reason, min((n.ttl for n in negatives), default=0.0), nxdomain=nxdomain)


def order_services(outcome: Outcome) -> Outcome:
    """SRV records -> (target, port) pairs by priority (lowest first), then weight (heaviest first).

    RFC 2782: a target of "." means the service is decidedly not available at this name; those
    records are dropped, and if nothing else is left the answer is negative. Duplicates are dropped.
    """
    if not isinstance(outcome, Records):
        return outcome
    records = sorted(outcome.values, key=lambda r: (r[0], -r[1], r[3], r[2]))
    pairs = tuple(dict.fromkeys((target, port) for _priority, _weight, port, target in records if target != "."))
    if not pairs:
        return Negative("the service is declared unavailable (SRV target '.', RFC 2782)", outcome.ttl)
    return Records(pairs, outcome.ttl)
