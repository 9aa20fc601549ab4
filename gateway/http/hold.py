"""Held calls (SPEC §6): scale-from-zero holding and per-environment backpressure.

A call is held, not failed, while its deployment is scaled to zero (the gateway asks the plane
to wake it) or while the deployment already has `concurrency_target` x replicas calls in flight
and the environment's policy is QUEUE_ON_FULL. A held call costs a record and a timer, no task:

- its request body is not read further than the server's usual buffer (`Body` pauses reading
  past BODY_BUFFER_HIGH_WATER until a sink attaches), so nothing is lost and nothing grows;
- it leaves the hold when the handler releases it (a table swap, a freed slot), when the client
  goes away (dropped, nothing is sent anywhere), or at `gateway.hold_timeout_seconds` (503
  `model_not_ready` + Retry-After);
- held calls are bounded per deployment (`gateway.max_held_calls_per_deployment`); past the bound
  a call gets 429 `rate_limited` + Retry-After at once.

While calls are held for a wake, one `Waker` task per deployment sends `POST <plane>/wake` (one
in flight at a time) and repeats it every WAKE_REPEAT_SECONDS until no call is held for it.

The decisions (`admission`, `concurrency_limit`) are pure functions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Literal

from gateway.http.server import Request
from gateway.metrics import Metrics
from gateway.routing.model import Environment
from gateway.routing.resolve import Route

log = logging.getLogger("gateway.hold")

WAKE_REPEAT_SECONDS = 10.0  # a wake is sent again this long after the previous one ended
WAKE_TIMEOUT_SECONDS = 30.0  # a plane's /wake must answer within this (at most the deployment's own limit)
RETRY_AFTER_NOT_READY = "30"  # a held call timed out waiting for a scaled-to-zero deployment
RETRY_AFTER_FULL = "5"  # a held call timed out waiting for a slot, or the hold bound was reached
RETRY_AFTER_REJECT = "1"  # REJECT_ON_FULL

Key = tuple[str, str]  # (model id, deployment id): what holds and wakes are counted per
Reason = Literal["wake", "full"]
Admission = Literal["go", "queue", "reject"]


# -- pure decisions ------------------------------------------------------------------------------


def concurrency_limit(env: Environment | None, replicas: int) -> int | None:
    """Calls a deployment of `replicas` replicas may have in flight for `env` before backpressure
    applies (SPEC §6: `concurrency_target` x replicas); None = no limit.

    `replicas` is the live count, `EndpointSet.replica_count()`: listed endpoints, discovered SRV
    targets, else the deployment's `replicas` field (see `gateway.upstream.balance.replica_count`).
    """
    if env is None or env.autoscaling.concurrency_target is None:
        return None
    return env.autoscaling.concurrency_target * replicas


def admission(in_flight: int, limit: int | None, waiting: int, policy: str) -> Admission:
    """What to do with a call: go now, queue (hold) it, or reject it with 429.

    A call goes when the deployment has room and no earlier call is waiting for a slot (a new
    call never overtakes a queued one).
    """
    if limit is None or (in_flight < limit and waiting == 0):
        return "go"
    return "reject" if policy == "REJECT_ON_FULL" else "queue"


# -- the held calls -------------------------------------------------------------------------------


class Held:
    """One held call: what is needed to go on with it, and its place in the hold."""

    __slots__ = ("req", "request_id", "started", "labels", "key", "reason", "timer", "route")

    def __init__(self, req: Request, request_id: str, started: float) -> None:
        self.req = req
        self.request_id = request_id
        self.started = started
        self.labels: tuple = ()
        self.key: Key = ("", "")
        self.reason: Reason = "wake"
        self.timer: asyncio.TimerHandle | None = None
        self.route: Route | None = None

    def __repr__(self) -> str:
        return f"<Held {self.request_id[:8]} {self.key[0]}/{self.key[1]} {self.reason}>"


class Holds:
    """Held calls per deployment, their timers, gauge and wakers.

    `expire(held)` answers a call whose hold timed out; `dropped(held)` is told of a client that
    went away while held; `wake(route)` sends one wake for a deployment.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, metrics: Metrics, expire: Callable[[Held], None],
        dropped: Callable[[Held], None], wake: Callable[[Route, float], Awaitable[None]],
    ) -> None:  # fmt: skip
        self.loop = loop
        self.metrics = metrics
        self.expire = expire
        self.dropped = dropped
        self.wake = wake
        self.by_key: dict[Key, dict[Held, None]] = {}  # insertion-ordered: first held, first out
        self.full_waiting: dict[Key, int] = {}  # calls held for a slot, per deployment
        self.wakers: dict[Key, asyncio.Task] = {}
        self.total = 0

    def __repr__(self) -> str:
        waits = sum(self.full_waiting.values())
        return f"<Holds {self.total} held | {waits} for a slot | {len(self.wakers)} wakers>"

    def waiting(self, key: Key) -> int:
        return self.full_waiting.get(key, 0)

    def add(self, held: Held, route: Route, labels: tuple, reason: Reason, timeout: float, bound: int) -> bool:
        """Hold `held` for `route`'s deployment; False (nothing held) when the bound is reached."""
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
            task = self.loop.create_task(self._wake_loop(key))
            self.wakers[key] = task
        if held.timer is None:  # a call held again after a release keeps its first deadline
            held.timer = self.loop.call_later(timeout, self._expired, held)
        held.req.conn.on_lost = lambda: self._client_lost(held)
        return True

    def remove(self, held: Held) -> bool:
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
        if held.req.conn.on_lost is not None:
            held.req.conn.on_lost = None
        return True

    def finish(self, held: Held) -> None:
        """`held` leaves for good (released, answered): stop its timer."""
        if held.timer is not None:
            held.timer.cancel()
            held.timer = None

    def next_for_slot(self, key: Key) -> Held | None:
        """The longest-waiting call held for a slot of deployment `key`, taken out of the hold."""
        for held in self.by_key.get(key, ()):
            if held.reason == "full":
                self.remove(held)
                return held
        return None

    def take_all(self) -> list[Held]:
        """Every held call, oldest first per deployment, taken out of the hold (a table swap)."""
        every = [held for calls in self.by_key.values() for held in calls]
        for held in every:
            self.remove(held)
        return every

    def close(self) -> None:
        for task in self.wakers.values():
            task.cancel()

    # -- endings ---------------------------------------------------------------------------

    def _expired(self, held: Held) -> None:
        held.timer = None
        if self.remove(held):
            self.expire(held)

    def _client_lost(self, held: Held) -> None:
        if self.remove(held):
            self.finish(held)
            self.dropped(held)

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
