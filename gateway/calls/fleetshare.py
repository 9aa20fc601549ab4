"""Fleet-wide rate limits (SPEC §13, issue 14): this gateway's part of a key's or a team's limit.

With a database store every gateway process (every worker under `--workers N`) is a member of
the fleet, and a `rate_limit` holds for the fleet, not for each member. A member decides every
call alone, on its own counters (`gateway.calls.ratelimit`), sized to its part of each limit;
the parts come from the usage the members exchange through the store every ~0.2 s
(`gateway.stores.ratelimits`). This module is that computation, pure: the last exchange's view
of the fleet in, this member's part out.

- **Rate and burst.** Member i gets `share_i` of both: `share_i = (1 - h) * d_i / D + h / N`,
  where `d_i` is its recent demand (calls a second arriving, admitted or not), `D` the fleet's,
  `N` the live members, and `h = max(SPARE, 1 - D / R)` the part split equally. Below the limit,
  each member gets what it uses plus an equal part of the room left; past it, the rate follows
  the demand, and SPARE of it is still split equally, so that a gateway that starts to see the
  key's calls has some at once. Nobody's demand: an equal split. The shares of one view sum to
  1, so the fleet's buckets refill at R and hold B, except that a bucket always holds one call
  (a member whose part of B is under one token may still admit one call).
- **Concurrency.** A member may have its own open calls plus its share of the free slots
  (`max_concurrent` minus every member's open calls), rounded up: while any slot is free every
  member may open one more call, so none refuses while the fleet has room; the rounding lets
  the fleet open at most one call a member past the cap, and only when calls start on several
  members within one exchange. Past the cap (free < 0) each gives back its share of the excess.

The members' views differ by at most one exchange, so the fleet can also overshoot a rate while
shares move (a member raises its part before another lowers its own): at most the rate's worth
of one exchange period per change. The limiter passes a member's own demand as of the exchange
before the last (`Counter.settled`), never newer than the others' it reads, so that demand
starting everywhere at once does not give every member most of the limit for a period. README "Fleet-wide rate limits" states the bound.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from gateway.routing.model import RateLimit

SPARE = 0.1  # of a limit past its rate, split equally among the live members

LimitId = tuple[str, str, str]  # (limit "key" | "team", team, name): one counter, fleet-wide


class Usage(NamedTuple):
    """One member's report of one limit."""

    demand: float  # calls a second arriving lately (admitted or refused)
    open: int  # calls open now


class Part(NamedTuple):
    """This member's part of one limit."""

    share: float  # of the rate and the burst, 0 < share <= 1
    cap: int | None  # calls this member may have open (None: the limit has no max_concurrent)


@dataclass(frozen=True)
class FleetView:
    """What one exchange read: the live members and the other members' usage."""

    me: str
    members: tuple[str, ...]  # live members, sorted, this one included
    usage: Mapping[LimitId, Mapping[str, Usage]] = field(default_factory=dict)  # by limit, then member (not me)

    def __repr__(self) -> str:
        return f"<FleetView {self.me} of {len(self.members)} members | {len(self.usage)} limits reported>"


def shares(demands: Mapping[str, float], rate: float | None) -> dict[str, float]:
    """Each member's share of a limit from its recent demand (see the module docstring); they sum to 1."""
    n = len(demands)
    total = sum(demands.values())
    if total <= 0.0:
        return {m: 1.0 / n for m in demands}
    spare = SPARE if rate is None else max(SPARE, 1.0 - total / rate)
    return {m: (1.0 - spare) * d / total + spare / n for m, d in demands.items()}


def slots(free: int, share: float) -> int:
    """A member's part of `free` slots (0 < share <= 1), rounded up: one at least while any is free.
    Negative `free` (the fleet is past its cap): the slots it gives back, its part of the excess rounded up."""
    part = abs(free) * share - 1e-9  # 3 slots at a share of 1/3 are one slot, not a float's 1.0000000000000002
    return math.ceil(part) if free > 0 else -math.ceil(part)


def part(view: FleetView, limit: LimitId, spec: RateLimit, mine: Usage) -> Part:
    """This member's part of `limit` (`spec`), given its own usage now and the others' in `view`."""
    reports = view.usage.get(limit, {})
    demands = dict.fromkeys(view.members, 0.0)
    demands.update((m, u.demand) for m, u in reports.items() if m in demands)
    demands[view.me] = mine.demand
    weights = shares(demands, spec.requests_per_second)
    cap = None
    if spec.max_concurrent is not None:
        opened = mine.open + sum(u.open for m, u in reports.items() if m != view.me and m in demands)
        cap = max(0, mine.open + slots(spec.max_concurrent - opened, weights[view.me]))
    return Part(weights[view.me], cap)
