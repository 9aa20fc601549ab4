"""An HTTP or WebSocket call waiting in the deployment's hold (SPEC §6; the hold is `gateway.calls.holds`).

While held, its request body is not read further than the server's usual buffer (`Body` pauses
reading past BODY_BUFFER_HIGH_WATER until a sink attaches), so nothing is lost and nothing grows.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from gateway.calls.holds import Key, Reason, Released
from gateway.calls.ratelimit import NO_PERMIT, Permit
from gateway.http.server import Request
from gateway.routing.resolve import Route


class Owner(Protocol):
    def release_held(self, held: HeldRequest) -> Released: ...

    def held_expired(self, held: HeldRequest) -> None: ...


class HeldRequest:
    """One held HTTP call (`gateway.calls.holds.Waiting`): what is needed to go on with it."""

    __slots__ = ("owner", "req", "request_id", "started", "labels", "key", "reason", "timer", "route", "permit")

    def __init__(self, owner: Owner, req: Request, request_id: str, started: float) -> None:
        self.owner = owner
        self.req = req
        self.request_id = request_id
        self.started = started
        self.labels: tuple = ()
        self.key: Key = ("", "")
        self.reason: Reason = "wake"
        self.timer: asyncio.TimerHandle | None = None
        self.route: Route | None = None
        self.permit: Permit = NO_PERMIT  # the key's rate_limit slots, held while the call waits

    def __repr__(self) -> str:
        return f"<HeldRequest {self.request_id[:8]} {self.key[0]}/{self.key[1]} {self.reason}>"

    def release(self) -> Released:
        return self.owner.release_held(self)

    def expired(self) -> None:
        self.owner.held_expired(self)
