"""Held gRPC calls (SPEC §6): a call to a scaled-to-zero deployment waits while the plane wakes it.

The HTTP side holds calls in `gateway.http.hold`; this is the same rule for the gRPC listener:
- the plane is asked to wake the deployment (`POST <plane url>/wake` with the identity headers;
  one wake in flight per deployment, repeated every WAKE_REPEAT_SECONDS while calls are held);
- on every table swap a held call is resolved again: it goes on to its (now active) target, or
  gets the new decision's error, or stays held;
- it fails with UNAVAILABLE (model_not_ready) after `gateway.hold_timeout_seconds`, or with
  DEADLINE_EXCEEDED at the client's own deadline, whichever comes first;
- held calls are bounded per deployment (`gateway.max_held_calls_per_deployment`, counted
  separately from HTTP's): past the bound, RESOURCE_EXHAUSTED (rate_limited).

While held, the request's DATA is kept but not acknowledged, so HTTP/2 flow control bounds it
(the client stops at its stream window) and nothing is lost. A call held is a record and a timer,
not a task; `gateway_held_requests` counts it with `protocol="grpc"`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from gateway.environments.planecall import PlaneCaller
from gateway.errors import GatewayError, ModelNotReady, RateLimited, UpstreamTimeout
from gateway.grpc.framing import CANCELLED, CallHead, error_trailers
from gateway.grpc.h2server import DISCARD, Handler, ServerStream
from gateway.http.hold import WAKE_REPEAT_SECONDS, WAKE_TIMEOUT_SECONDS
from gateway.routing.model import Table
from gateway.routing.resolve import Route, resolve_grpc

if TYPE_CHECKING:
    from gateway.grpc.relay import GrpcRelay

log = logging.getLogger("gateway.grpc.hold")
Key = tuple[str, str]  # (model id, deployment id)
ERROR_HEAD = [(b":status", b"200"), (b"content-type", b"application/grpc")]


class HeldCall:
    """The stream's handler while its call is held: keeps the request data, unacknowledged."""

    __slots__ = ("holds", "stream", "head", "route", "request_id", "started", "labels", "key", "data", "ended",
                 "timer", "deadline_is_clients", "done")  # fmt: skip

    def __init__(
        self, holds: GrpcHolds, stream: ServerStream, head: CallHead, route: Route, request_id: str, started: float
    ) -> None:  # fmt: skip
        self.holds = holds
        self.stream = stream
        self.head = head
        self.route = route
        self.request_id = request_id
        self.started = started
        self.labels: tuple = ()
        self.key: Key = ("", "")
        self.data: list[tuple[bytes, int]] = []
        self.ended = False
        self.done = False
        table = holds.relay.state.table
        wait = table.gateway.hold_timeout_seconds
        self.deadline_is_clients = head.timeout is not None and head.timeout < wait
        limit = head.timeout if self.deadline_is_clients and head.timeout is not None else wait
        self.timer: asyncio.TimerHandle | None = holds.loop.call_at(started + limit, self._expired)

    def __repr__(self) -> str:
        return f"<HeldCall {self.head.call.method} {self.key[0]}/{self.key[1]} {self.request_id[:8]}>"

    def client_data(self, data: bytes, flow: int) -> None:
        if self.done:
            self.stream.ack(flow)
        else:
            self.data.append((data, flow))

    def client_end(self) -> None:
        self.ended = True

    def client_reset(self) -> None:
        if not self.done:
            self.holds.remove(self)
            self._end(CANCELLED)

    def client_drained(self) -> None:
        pass

    def _expired(self) -> None:
        self.timer = None
        if self.done:
            return
        self.holds.remove(self)
        dep = self.route.deployment
        if self.deadline_is_clients:
            self.answer(UpstreamTimeout(f"the call's deadline passed while deployment '{dep.id}' was waking up"))
        else:
            wait = self.holds.relay.state.table.gateway.hold_timeout_seconds
            self.answer(ModelNotReady(f"deployment '{dep.id}' is scaled to zero and did not wake up within {wait:g}s"))

    def answer(self, error: GatewayError) -> None:
        """End the call with the gateway's error; the data it held is acknowledged (and dropped)."""
        self.stream.respond(ERROR_HEAD + error_trailers(error, self.request_id), end=True)
        self._end(error.grpc_status)

    def _end(self, code: int) -> None:
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        owed = sum(flow for _, flow in self.data)
        self.data = []
        if owed and not self.stream.reset:
            self.stream.ack(owed)
        self.holds.relay._observe(self.labels, code, self.started)

    def release(self, route: Route) -> None:
        """Go on as a relayed call to `route`, replaying what the client sent meanwhile."""
        from gateway.grpc.relay import RelayedCall

        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        call = RelayedCall(self.holds.relay, self.stream, self.head, route, self.request_id, self.started)
        self.stream.handler = call
        data, self.data = self.data, []
        for chunk, flow in data:
            call.client_data(chunk, flow)
        if self.ended:
            call.client_end()


class GrpcHolds:
    """The gRPC listener's held calls per deployment, their wakers and their releases."""

    def __init__(self, relay: GrpcRelay) -> None:
        self.relay = relay
        self.loop = relay.loop
        self.by_key: dict[Key, dict[HeldCall, None]] = {}  # insertion-ordered: first held, first out
        self.wakers: dict[Key, asyncio.Task[None]] = {}
        self.caller = PlaneCaller(relay.metrics)
        relay.state.on_swap.append(self._table_swapped)

    def __repr__(self) -> str:
        return f"<GrpcHolds {sum(map(len, self.by_key.values()))} held | {len(self.wakers)} wakers>"

    def hold(self, stream: ServerStream, head: CallHead, route: Route, request_id: str, started: float) -> Handler:
        """The handler of a call whose target is scaled to zero: held, or answered when the bound is reached."""
        held = HeldCall(self, stream, head, route, request_id, started)
        if not self.add(held, route):
            dep = route.deployment
            held.labels = (route.model.id, route.environment, dep.id, dep.region, "grpc")
            held.answer(RateLimited(f"too many calls are waiting for deployment '{dep.id}' to wake up; retry later"))
            return DISCARD
        return held

    def add(self, held: HeldCall, route: Route) -> bool:
        dep = route.deployment
        key = (route.model.id, dep.id)
        calls = self.by_key.get(key)
        if calls is not None and len(calls) >= self.relay.state.table.gateway.max_held_calls_per_deployment:
            return False
        if calls is None:
            calls = self.by_key[key] = {}
        calls[held] = None
        held.route, held.key = route, key
        held.labels = (route.model.id, route.environment, dep.id, dep.region, "grpc")
        self.relay.metrics.held.inc(held.labels)
        if key not in self.wakers:
            self.wakers[key] = self.loop.create_task(self._wake_loop(key))
        return True

    def remove(self, held: HeldCall) -> None:
        calls = self.by_key.get(held.key)
        if calls is None or held not in calls:
            return
        del calls[held]
        if not calls:
            del self.by_key[held.key]
        self.relay.metrics.held.dec(held.labels)

    def close(self) -> None:
        for task in self.wakers.values():
            task.cancel()
        self.caller.close()

    def _table_swapped(self, table: Table) -> None:
        self.loop.call_soon(self._swapped)  # after every swap callback: the pools have seen the new table

    def _swapped(self) -> None:
        """Resolve every held call against the serving table: release, answer, or keep holding."""
        table = self.relay.state.table
        every = [held for calls in self.by_key.values() for held in calls]
        for held in every:
            self.remove(held)
        for held in every:
            if held.done:
                continue
            try:
                route = resolve_grpc(table, held.head.call)
            except GatewayError as error:
                held.answer(error)
                continue
            if route.action == "hold":
                if not self.add(held, route):
                    held.answer(RateLimited(f"too many calls are waiting for deployment '{route.deployment.id}'"))
            else:
                held.release(route)

    async def _wake_loop(self, key: Key) -> None:
        try:
            while self.by_key.get(key):
                held = next(reversed(self.by_key[key]))  # the newest: its route is of the newest table
                await self._wake(self.relay.state.table, held.route)
                await asyncio.sleep(WAKE_REPEAT_SECONDS)
        finally:
            if self.wakers.get(key) is asyncio.current_task():
                del self.wakers[key]

    async def _wake(self, table: Table, route: Route) -> None:
        dep = route.deployment
        timeout = min(WAKE_TIMEOUT_SECONDS, dep.timeouts.response_start_seconds)
        try:
            answer = await self.caller.call(table, dep, route.environment, "POST", "/wake", to_plane=True,
                                            timeout=timeout)  # fmt: skip
            log.info("wake of %s/%s for held gRPC calls answered %d", dep.model_id, dep.id, answer.status)
        except GatewayError as error:
            log.warning("wake of %s/%s for held gRPC calls failed: %s", dep.model_id, dep.id, error.message)
