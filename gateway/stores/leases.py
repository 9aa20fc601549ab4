"""Promotions in a fleet (SPEC §13): one gateway advances each ramp, under a lease in the store.

Every gateway's control plane runs `FleetPromotions.run`: once a `RENEW_SECONDS` tick it claims
(or renews) the lease of every running promotion in the overlay, and runs exactly the promotions
whose lease it holds. A lease lasts `LEASE_SECONDS`; a gateway that dies stops renewing, and the
first gateway to find its lease expired takes the promotion over, continuing from the record in
the store (the stage and when it started). Which promotion may start at all is decided by the
overlay's revision compare-and-swap (`PostgresAdminStore.save`), not here.

The rollback rule counts the candidate's answers fleet-wide: each tick, every gateway writes its
own cumulative counts of each running candidate to `promotion_counts`, and reads the sum of the
others' (`others`), which the runner adds to its own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import Callable
from typing import Any

import psycopg

from gateway.environments.changes import running_promotion
from gateway.environments.store import StoreError
from gateway.stores.postgres import PostgresAdminStore

log = logging.getLogger("gateway.promotion")

LEASE_SECONDS = 3.0
RENEW_SECONDS = 0.5

Key = tuple[str, str]  # (model id, environment)
Candidate = tuple[str, str, str]  # (model id, environment, deployment)

CLAIM = """
INSERT INTO promotion_leases (model_id, environment, holder, expires_at)
VALUES (%s, %s, %s, now() + make_interval(secs => %s))
ON CONFLICT (model_id, environment) DO UPDATE SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at
WHERE promotion_leases.holder = EXCLUDED.holder OR promotion_leases.expires_at < now()
RETURNING model_id
"""
PUBLISH = """
INSERT INTO promotion_counts (gateway, model_id, environment, deployment, calls, errors) VALUES (%s, %s, %s, %s, %s, %s)
ON CONFLICT (gateway, model_id, environment, deployment)
DO UPDATE SET calls = EXCLUDED.calls, errors = EXCLUDED.errors, updated_at = now()
"""
OTHERS = """
SELECT model_id, environment, deployment, sum(calls), sum(errors) FROM promotion_counts
WHERE gateway <> %s GROUP BY model_id, environment, deployment
"""


def running_keys(overlay: dict[str, Any]) -> dict[Key, str]:
    """Every running promotion of the overlay: its candidate deployment."""
    found = {}
    for model_id, changes in overlay.get("models", {}).items():
        for env in changes.get("environments", {}):
            promotion = running_promotion(overlay, model_id, env)
            if promotion is not None:
                found[(model_id, env)] = promotion["deployment_id"]
    return found


class FleetLeases:
    """The store's side: claim, renew and release leases; publish and sum candidate counts."""

    def __init__(self, store: PostgresAdminStore, holder: str | None = None) -> None:
        self.store = store
        self.holder = holder or f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"

    def __repr__(self) -> str:
        return f"<FleetLeases {self.holder}>"

    def tick(self, running: list[Key], counts: dict[Candidate, tuple[float, float]]) -> tuple[set[Key], dict]:
        """Claim or renew `running`, release the rest, publish `counts`: (keys held, the others' counts)."""

        def work(conn: psycopg.Connection) -> tuple[set[Key], dict]:
            held = {key for key in running if conn.execute(CLAIM, (*key, self.holder, LEASE_SECONDS)).fetchone()}
            mine = conn.execute("SELECT model_id, environment FROM promotion_leases WHERE holder = %s", (self.holder,))
            for key in set(map(tuple, mine.fetchall())) - set(running):
                conn.execute("DELETE FROM promotion_leases WHERE model_id = %s AND environment = %s AND holder = %s",
                             (*key, self.holder))  # fmt: skip
            for candidate, (calls, errors) in counts.items():
                conn.execute(PUBLISH, (self.holder, *candidate, calls, errors))
            others = {tuple(row[:3]): (float(row[3]), float(row[4])) for row in conn.execute(OTHERS, (self.holder,))}
            return held, others

        return self.store.run(work)

    def release_all(self) -> None:
        self.store.run(lambda conn: conn.execute("DELETE FROM promotion_leases WHERE holder = %s", (self.holder,)))


class FleetPromotions:
    """The control plane's loop: run the promotions this gateway holds the lease of, and only those.

    `launch(key)`, `cancel(key)`, `tasks()` and `local_counts(key, dep)` are the `Promotions` side.
    """

    def __init__(
        self,
        leases: FleetLeases,
        overlay: Callable[[], dict[str, Any]],
        launch: Callable[[Key], None],
        cancel: Callable[[Key], None],
        tasks: Callable[[], set[Key]],
        local_counts: Callable[[Key, str], tuple[float, float]],
    ) -> None:
        self.leases = leases
        self.overlay, self.launch, self.cancel, self.tasks, self.local_counts = (
            overlay, launch, cancel, tasks, local_counts
        )  # fmt: skip
        self.others: dict[Candidate, tuple[float, float]] = {}
        self.held: set[Key] = set()
        self.woken = asyncio.Event()

    def __repr__(self) -> str:
        return f"<FleetPromotions {self.leases.holder} holds {sorted('/'.join(k) for k in self.held)}>"

    def counts(self, key: Key, dep: str) -> tuple[float, float]:
        """The candidate's answers fleet-wide: this gateway's now, the others' as of the last tick."""
        calls, errors = self.local_counts(key, dep)
        other_calls, other_errors = self.others.get((*key, dep), (0.0, 0.0))
        return calls + other_calls, errors + other_errors

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            running = running_keys(self.overlay())
            counts = {(*key, dep): self.local_counts(key, dep) for key, dep in running.items()}
            try:
                self.held, self.others = await loop.run_in_executor(None, self.leases.tick, list(running), counts)
            except StoreError as exc:
                log.debug("promotion leases not renewed: %s", exc)  # the writes of a runner fail too meanwhile
            else:
                self._reconcile(set(running))
            try:
                await asyncio.wait_for(self.woken.wait(), RENEW_SECONDS)
            except TimeoutError:
                pass
            self.woken.clear()

    def wake(self) -> None:
        """Claim now (a promotion started here): the gateway that took the call usually runs it."""
        self.woken.set()

    def _reconcile(self, running: set[Key]) -> None:
        tasks = self.tasks()
        for key in sorted((self.held & running) - tasks):
            log.info("promotion lease of %s/%s taken: this gateway advances it", *key)
            self.launch(key)
        for key in sorted(tasks - self.held):
            log.warning("promotion lease of %s/%s lost: another gateway advances it", *key)
            self.cancel(key)

    async def close(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.leases.release_all)
        except StoreError as exc:
            log.warning("promotion leases not released (they expire in %gs): %s", LEASE_SECONDS, exc)
