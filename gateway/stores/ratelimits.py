"""Fleet-wide rate limits (SPEC §13, issue 14): the members' usage exchanged through PostgreSQL.

With `--store postgresql://...` every gateway process (every worker under `--workers N`) is a
member. Every `PERIOD_SECONDS` a background task writes the member's row of
`rate_limit_members` (its heartbeat and its usage of each limit it counts: recent demand, open
calls) and reads the rows of the other live members (seen within `LIVE_SECONDS`), in one
transaction; the limiter then sizes each counter to this member's part of its limit
(`Limiter.place`, the parts from `gateway.calls.fleetshare`). Calls never wait on this: they are
decided on the counters in memory, and the exchange runs in a thread.

When no exchange has succeeded for `STALE_SECONDS` (the database down, or slower than that),
the store is stale and each limit does as its `fleet_failure` says ("open": this member counts
the whole limit, "closed": 429 refusals), until an exchange succeeds again. The first exchange
is made before the gateway serves, so it starts with its parts. A member that stops deletes its
row (the others take its part at their next exchange); the row of one that died is ignored
after `LIVE_SECONDS` and deleted by any member after `FORGET_SECONDS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from gateway.calls.fleetshare import FleetView, LimitId, Usage
from gateway.calls.ratelimit import Limiter
from gateway.environments.store import StoreError
from gateway.state import TableState
from gateway.stores import cache_path, is_database
from gateway.stores.postgres import PostgresAdminStore

log = logging.getLogger("gateway.store")

PERIOD_SECONDS = 0.2  # between exchanges: the fleet's counters lag each other by about this much
STALE_SECONDS = 2.0  # without a successful exchange: each limit falls back to its fleet_failure
LIVE_SECONDS = 3.0  # a member not seen for this long is out of the fleet (its part goes to the others)
FORGET_SECONDS = 60.0  # a dead member's row is deleted after this long

WRITE = """
INSERT INTO rate_limit_members (member, seen_at, usage) VALUES (%s, now(), %s)
ON CONFLICT (member) DO UPDATE SET seen_at = now(), usage = EXCLUDED.usage
"""
READ = """
SELECT member, usage FROM rate_limit_members
WHERE seen_at > now() - make_interval(secs => %s)
"""
FORGET = "DELETE FROM rate_limit_members WHERE seen_at < now() - make_interval(secs => %s)"
LEAVE = "DELETE FROM rate_limit_members WHERE member = %s"


def member_id() -> str:
    return f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"


def encode(usage: list[tuple[LimitId, Usage]]) -> list[list[Any]]:
    return [[*lid, round(u.demand, 3), u.open] for lid, u in usage]


def decode(me: str, rows: list[tuple[str, Any]]) -> FleetView:
    """The view of one exchange's read; an entry this binary cannot read is skipped (a newer gateway's)."""
    usage: dict[LimitId, dict[str, Usage]] = {}
    members = {me}
    for member, entries in rows:
        members.add(member)
        if member == me or not isinstance(entries, list):
            continue
        for entry in entries:
            try:
                limit, team, name, demand, opened = entry
                usage.setdefault((str(limit), str(team), str(name)), {})[member] = Usage(float(demand), int(opened))
            except (TypeError, ValueError):
                continue
    return FleetView(me, tuple(sorted(members)), usage)


class FleetUsage:
    """The store's side: write this member's usage and read the others' (in a thread: it blocks)."""

    def __init__(self, store: PostgresAdminStore, member: str | None = None) -> None:
        self.store = store
        self.member = member or member_id()

    def __repr__(self) -> str:
        return f"<FleetUsage {self.member} on {self.store.path}>"

    def exchange(self, usage: list[tuple[LimitId, Usage]]) -> FleetView:
        """One transaction: this member's row written, every live member's read. Raises StoreError."""

        def work(conn: psycopg.Connection) -> list[tuple[str, Any]]:
            conn.execute(WRITE, (self.member, Jsonb(encode(usage))))
            conn.execute(FORGET, (FORGET_SECONDS,))
            return conn.execute(READ, (LIVE_SECONDS,)).fetchall()

        return decode(self.member, self.store.run(work))

    def leave(self) -> None:
        self.store.run(lambda conn: conn.execute(LEAVE, (self.member,)))


class FleetLimits:
    """The event loop's side: exchange every period, and keep the limiter's counters at their parts."""

    def __init__(self, usage: FleetUsage, limiter: Limiter, clock: Callable[[], float]) -> None:
        self.usage = usage
        self.limiter = limiter
        self.clock = clock
        self.last_ok: float | None = None  # loop time of the last successful exchange
        self.stale = False
        self.task: asyncio.Task | None = None
        self.first = asyncio.Event()  # the first exchange ended (well or not)

    def __repr__(self) -> str:
        return f"<FleetLimits {self.usage.member} {'stale' if self.stale else 'ok'} {self.limiter!r}>"

    async def start(self) -> None:
        """Exchange once (at most STALE_SECONDS), then every period in the background."""
        self.task = asyncio.get_running_loop().create_task(self.run())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.first.wait(), STALE_SECONDS)
        self.check()

    async def run(self) -> None:
        while True:
            await self.exchange()
            self.first.set()
            await asyncio.sleep(PERIOD_SECONDS)

    async def exchange(self) -> None:
        loop = asyncio.get_running_loop()
        pending = loop.run_in_executor(None, self.usage.exchange, self.limiter.report())
        while True:  # the database may be slow: the limits go stale on time all the same
            done, _ = await asyncio.wait({pending}, timeout=PERIOD_SECONDS)
            if done:
                break
            self.check()
        try:
            view = pending.result()
        except StoreError as exc:
            log.debug("rate-limit usage not exchanged: %s", exc)
            self.check()
            return
        self.last_ok = self.clock()
        if self.stale:
            log.info("fleet rate limits: the store answers again, limits are fleet-wide again")
            self.stale = False
        self.limiter.place(view)

    def _stale_now(self) -> bool:
        return self.last_ok is None or self.clock() - self.last_ok > STALE_SECONDS

    def check(self) -> None:
        """Past STALE_SECONDS without an exchange: each limit to its fleet_failure (again: new counters too)."""
        if not self._stale_now():
            return
        if not self.stale:
            log.warning("fleet rate limits: no exchange with the store for %gs; each limit does as its "
                        "fleet_failure says (open: counted here alone, closed: refused)", STALE_SECONDS)  # fmt: skip
            self.stale = True
        self.limiter.place(None)

    async def close(self) -> None:
        """Stop exchanging and leave the fleet (the others take this member's parts at once)."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        try:
            await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, self.usage.leave), STALE_SECONDS)
        except (StoreError, TimeoutError) as exc:
            log.info("rate-limit membership not removed (it goes stale in %gs): %s", LIVE_SECONDS, exc)


def fleet_limits(state: TableState, limiter: Limiter, url: str | None = None) -> FleetLimits | None:
    """The fleet-wide limits of a gateway whose store (`url`, `--store`) is a database; None otherwise
    (per worker). A worker of `--workers N` serves the supervisor's copy of the overlay (its
    `state.store` is a file) but is a member of the limits itself: it exchanges through a store of
    its own on the same URL (only `run` is used: no cache, no metrics of its own: the supervisor
    reports the store's health)."""
    store = state.store
    if not isinstance(store, PostgresAdminStore):
        if not is_database(url):
            return None
        store = PostgresAdminStore(str(url), cache_path(state.path))
    return FleetLimits(FleetUsage(store), limiter, asyncio.get_running_loop().time)
