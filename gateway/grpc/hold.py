"""A gRPC call waiting in its deployment's hold (SPEC §6; the hold itself is `gateway.calls.holds`,
shared with HTTP: the same bound, order and waker per deployment).

- on every table swap, or when a slot frees, a held call is resolved again: it goes on to its
  target, or gets the new decision's error, or stays held;
- it fails with UNAVAILABLE (model_not_ready) after `gateway.hold_timeout_seconds`, or with
  DEADLINE_EXCEEDED at the client's own deadline, whichever comes first;
- past the hold's bound, RESOURCE_EXHAUSTED (rate_limited) at once.

While held, the request's DATA is kept but not acknowledged, so HTTP/2 flow control bounds it
(the client stops at its stream window) and nothing is lost. `gateway_held_requests` counts it
with `protocol="grpc"`.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from gateway.calls.holds import Key, Reason, Released
from gateway.calls.ratelimit import NO_PERMIT, Permit
from gateway.errors import GatewayError, ModelNotReady, UpstreamTimeout
from gateway.grpc.framing import CANCELLED, CallHead, error_trailers
from gateway.grpc.h2server import ServerStream
from gateway.routing.resolve import Route

ERROR_HEAD = [(b":status", b"200"), (b"content-type", b"application/grpc")]


class Owner(Protocol):
    def release_held(self, held: HeldCall) -> Released: ...

    def held_dropped(self, held: HeldCall) -> None: ...

    def observe(
        self,
        labels: tuple,
        code: int,
        started: float,
        stream: ServerStream,
        request_id: str,
        head: CallHead | None,
        route: Route | None = None,
    ) -> None: ...


class HeldCall:
    """The stream's handler while its call is held (`gateway.calls.holds.Waiting`)."""

    __slots__ = ("owner", "stream", "head", "route", "request_id", "started", "labels", "key", "reason", "data",
                 "ended", "timer", "deadline", "deadline_is_clients", "done", "hold_timeout", "permit")  # fmt: skip

    def __init__(
        self, owner: Owner, stream: ServerStream, head: CallHead, route: Route, request_id: str, started: float,
        hold_timeout: float,
    ) -> None:  # fmt: skip
        self.owner = owner
        self.stream = stream
        self.head = head
        self.route: Route | None = route
        self.request_id = request_id
        self.started = started
        self.labels: tuple = ()
        self.key: Key = ("", "")
        self.reason: Reason = "wake"
        self.data: list[tuple[bytes, int]] = []
        self.ended = False
        self.done = False
        self.timer: asyncio.TimerHandle | None = None
        self.hold_timeout = hold_timeout
        self.permit: Permit = NO_PERMIT  # the key's rate_limit slots, given back when the call ends here
        self.deadline_is_clients = head.timeout is not None and head.timeout < hold_timeout
        self.deadline = started + (head.timeout if self.deadline_is_clients and head.timeout else hold_timeout)

    def __repr__(self) -> str:
        return f"<HeldCall {self.head.call.method} {self.key[0]}/{self.key[1]} {self.request_id[:8]}>"

    # -- the stream's handler while held

    def client_data(self, data: bytes, flow: int) -> None:
        if self.done:
            self.stream.ack(flow)
        else:
            self.data.append((data, flow))

    def client_end(self) -> None:
        self.ended = True

    def client_reset(self) -> None:
        if not self.done:
            self.owner.held_dropped(self)
            self._end(CANCELLED)

    def client_drained(self) -> None:
        pass

    # -- the hold's callbacks (Waiting)

    def release(self) -> Released:
        return self.owner.release_held(self)

    def expired(self) -> None:
        if self.done:
            return
        dep_id = self.key[1]
        if self.deadline_is_clients:
            self.answer(UpstreamTimeout(f"the call's deadline passed while deployment '{dep_id}' was held"))
        elif self.reason == "wake":
            wait = self.hold_timeout
            self.answer(ModelNotReady(f"deployment '{dep_id}' is scaled to zero and did not wake up within {wait:g}s"))
        else:
            wait = self.hold_timeout
            self.answer(ModelNotReady(f"deployment '{dep_id}' had no free slot within {wait:g}s"))

    # -- endings

    def answer(self, error: GatewayError) -> None:
        """End the call with the gateway's error; the data it held is acknowledged (and dropped)."""
        self.stream.respond(ERROR_HEAD + error_trailers(error, self.request_id), end=True)
        self._end(error.grpc_status)

    def take_data(self) -> tuple[list[tuple[bytes, int]], bool]:
        """What the client sent meanwhile (to replay on the relayed call), and whether it ended."""
        self.done = True
        data, self.data = self.data, []
        return data, self.ended

    def _end(self, code: int) -> None:
        self.done = True
        self.permit.release()
        owed = sum(flow for _, flow in self.data)
        self.data = []
        if owed and not self.stream.reset:
            self.stream.ack(owed)
        self.owner.observe(self.labels, code, self.started, self.stream, self.request_id, self.head, self.route)
