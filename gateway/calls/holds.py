"""Held calls (SPEC §6) of every protocol: one hold and one waker per deployment.

A call is held, not failed, while its deployment is scaled to zero (the gateway asks the plane to
wake it) or while the deployment already has `concurrency_target` x replicas calls in flight and
the environment's policy is QUEUE_ON_FULL. HTTP, WebSocket and gRPC calls wait in the same hold:
they share its bound (`gateway.max_held_calls_per_deployment`), its order (first held, first
released) and its waker. A held call costs a record and a timer, no task; what it holds of its
request (an HTTP body buffer, unacknowledged HTTP/2 DATA) is bounded by its protocol's own flow
control.

The adapter's held call (`Waiting`) decides what its protocol answers; the hold only decides when:
- `release()`: a table swap or a freed slot lets it go on (it re-resolves against the new table);
- `expired()`: its deadline passed (`gateway.hold_timeout_seconds`, or a gRPC client's deadline);
- the adapter calls `Holds.drop(held)` when its client goes away.

While calls are held for a wake, one waker task per deployment calls `wake(route, timeout)` (one in
flight at a time), repeated every WAKE_REPEAT_SECONDS until no call is held for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Literal, Protocol

from gateway.metrics import Metrics
from gateway.routing.resolve import Route

log = logging.getLogger("gateway.hold")

WAKE_REPEAT_SECONDS = 10.0  # a wake is sent again this long after the previous one ended
WAKE_TIMEOUT_SECONDS = 30.0  # a plane's /wake must answer within this (at most the deployment's own limit)

Key = tuple[str, str]  # (model id, deployment id): what holds and wakes are counted per
Reason = Literal["wake", "full"]
Released = Literal["sent", "held", "answered"]


class Waiting(Protocol):
    """A protocol adapter's held call. The hold sets `key`, `route`, `labels`, `reason` and `timer`."""

    key: Key
    route: Route | None
    labels: tuple
    reason: Reason
    timer: asyncio.TimerHandle | None

    def release(self) -> Released: ...  # go on (re-resolved against the serving table)

    def expired(self) -> None: ...  # answer the call: its deadline passed while held


class Holds:
    """Held calls per deployment, their timers, the `gateway_held_requests` gauge and the wakers."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, metrics: Metrics, wake: Callable[[Route, float], Awaitable[None]]
    ) -> None:  # fmt: skip
        self.loop = loop
        self.metrics = metrics
        self.wake = wake
        self.by_key: dict[Key, dict[Waiting, None]] = {}  # insertion-ordered: first held, first out
        self.full_waiting: dict[Key, int] = {}  # calls held for a slot, per deployment
        self.wakers: dict[Key, asyncio.Task] = {}
        self.total = 0

    def __repr__(self) -> str:
        waits = sum(self.full_waiting.values())
        return f"<Holds {self.total} held | {waits} for a slot | {len(self.wakers)} wakers>"

    def waiting(self, key: Key) -> int:
        return self.full_waiting.get(key, 0)

    def add(self, held: Waiting, route: Route, labels: tuple, reason: Reason, deadline: float, bound: int) -> bool:
        """Hold `held` for `route`'s deployment until the loop time `deadline`; False (nothing held)
        when the deployment already has `bound` calls held."""
        dep = route.deployment
        key = (route.model.id, dep.id)
        calls = self.by_key.get(key)
        if calls is not None and len(calls) >= bound:
            return False
        if calls is None:
            calls = self.by_key[key] = {}
        calls[held] = None
        held.key, held.route, held.labels, held.reason = key, route, labels, reason
        self.total += 1
        self.metrics.held.inc(labels)
        if reason == "full":
            self.full_waiting[key] = self.full_waiting.get(key, 0) + 1
        elif key not in self.wakers:
            self.wakers[key] = self.loop.create_task(self._wake_loop(key))
        if held.timer is None:  # a call held again after a release keeps its first deadline
            held.timer = self.loop.call_at(deadline, self._expired, held)
        return True

    def remove(self, held: Waiting) -> bool:
        """Take `held` out of the hold (its timer keeps running); False if it was not held."""
        calls = self.by_key.get(held.key)
        if calls is None or held not in calls:
            return False
        del calls[held]
        if not calls:
            del self.by_key[held.key]
        if held.reason == "full":
            left = self.full_waiting[held.key] - 1
            if left:
                self.full_waiting[held.key] = left
            else:
                del self.full_waiting[held.key]
        self.total -= 1
        self.metrics.held.dec(held.labels)
        return True

    def finish(self, held: Waiting) -> None:
        """`held` leaves for good (released, answered, dropped): stop its timer."""
        if held.timer is not None:
            held.timer.cancel()
            held.timer = None

    def drop(self, held: Waiting) -> bool:
        """The client of `held` went away: out of the hold for good; False if it was not held."""
        if not self.remove(held):
            return False
        self.finish(held)
        return True

    def next_for_slot(self, key: Key) -> Waiting | None:
        """The longest-waiting call held for a slot of deployment `key`, taken out of the hold."""
        for held in self.by_key.get(key, ()):
            if held.reason == "full":
                self.remove(held)
                return held
        return None

    def take_all(self) -> list[Waiting]:
        """Every held call, oldest first per deployment, taken out of the hold (a table swap)."""
        every = [held for calls in self.by_key.values() for held in calls]
        for held in every:
            self.remove(held)
        return every

    def close(self) -> None:
        for task in self.wakers.values():
            task.cancel()

    def _expired(self, held: Waiting) -> None:
        held.timer = None
        if self.remove(held):
            held.expired()

    # -- waking ----------------------------------------------------------------------------

    async def _wake_loop(self, key: Key) -> None:
        """One wake in flight per deployment, repeated while calls stay held for it."""
        try:
            while True:
                route = self._wake_route(key)
                if route is None:
                    return
                timeout = min(WAKE_TIMEOUT_SECONDS, route.deployment.timeouts.response_start_seconds)
                await self.wake(route, timeout)
                await asyncio.sleep(WAKE_REPEAT_SECONDS)
        finally:
            if self.wakers.get(key) is asyncio.current_task():
                del self.wakers[key]

    def _wake_route(self, key: Key) -> Route | None:
        route = None
        for held in self.by_key.get(key, ()):
            if held.reason == "wake":
                route = held.route  # the newest: its table is the most recent one
        return route
