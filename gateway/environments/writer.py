"""The one writer of admin changes (SPEC §6): the admin API and the promotions both write through it.

A change is made the same way whoever makes it: copy the overlay, change the copy, and hand it to
`TableState.apply`, which composes it with the table file, validates the result with the table's
own rules, persists it in the admin store and swaps the serving table. The write states the
revision it was based on; the store refuses it (`StoreConflict`, 409 here) when the store moved on
meanwhile, e.g. another gateway wrote it.

`lock` serializes the admin changes of one gateway: a caller that checks something before it
writes (only one promotion per environment, a deployment still in use) holds it across both, so
two concurrent promote calls cannot both win.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Callable
from typing import Any

from gateway.environments.overlay import compose
from gateway.environments.store import StoreConflict, StoreError
from gateway.errors import Conflict, InternalError, InvalidChange
from gateway.routing.loader import TableInvalid
from gateway.routing.model import Table
from gateway.state import TableState

log = logging.getLogger("gateway.admin.writer")

Mutation = Callable[[dict[str, Any]], object]


class AdminWriter:
    def __init__(self, state: TableState) -> None:
        self.state = state
        self.lock = asyncio.Lock()  # every admin change of environments and deployments

    def __repr__(self) -> str:
        return f"<AdminWriter revision={self.revision} {'locked' if self.lock.locked() else 'idle'}>"

    @property
    def overlay(self) -> dict[str, Any]:
        """The overlay serving now (read it, never change it: changes go through `change`)."""
        return self.state.overlay

    @property
    def revision(self) -> int:
        return int(self.state.overlay.get("revision", 0))

    async def check(self, mutate: Mutation) -> None:
        """Whether a change would be valid now, without applying it: raises InvalidChange as `change` would.

        For a change made later (a promotion's settings, applied when it succeeds), refused up front.
        """
        overlay = copy.deepcopy(self.state.overlay)
        mutate(overlay)
        try:
            await asyncio.get_running_loop().run_in_executor(None, compose, self.state.base, overlay)
        except TableInvalid as exc:
            raise InvalidChange(
                "the change breaks the routing table's rules: " + exc.problems[0], exc.problems
            ) from None

    async def change(self, reason: str, mutate: Mutation) -> Table:
        """Apply one change to a copy of the overlay; serve and persist it, or refuse it whole.

        Raises InvalidChange (400: it breaks a table rule), Conflict (409: the store moved on) or
        InternalError (500: the store could not be written); nothing changes then.
        """
        based_on = self.revision
        overlay = copy.deepcopy(self.state.overlay)
        mutate(overlay)
        overlay["revision"] = based_on + 1
        try:
            return await self.state.apply(overlay, reason)
        except TableInvalid as exc:
            raise InvalidChange(
                "the change breaks the routing table's rules: " + exc.problems[0], exc.problems
            ) from None
        except StoreConflict as exc:
            log.warning("admin change (%s) refused: %s; reading the store again", reason, exc)
            await self.state.reload("the admin store moved on")  # a retry is based on what is stored now
            raise Conflict(f"{exc}; read the current state and try again") from None
        except StoreError as exc:
            raise InternalError(str(exc)) from None
