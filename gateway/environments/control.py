"""The control plane: what a gateway must run exactly once, however many processes serve calls.

It owns the admin writer (the only path by which admin changes reach the table and the store),
the promotions, the §6 environments API and the admin listener (SPEC §11). A single-process
gateway runs it next to its data plane (`gateway.runner.Gateway`); with `--workers N` the
supervisor runs it and the workers run data planes only (`gateway.supervisor`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from gateway.admin.app import AdminHandler
from gateway.environments.api import EnvironmentsApi
from gateway.environments.keys_api import KeysApi
from gateway.environments.promotion import Promotions
from gateway.environments.writer import AdminWriter
from gateway.http.server import async_handler, serve
from gateway.metrics import Metrics
from gateway.state import TableState
from gateway.stores.leases import FleetLeases
from gateway.stores.postgres import PostgresAdminStore


class ControlPlane:
    """`metrics`: where promotions publish; `admin_metrics`: what `/metrics` renders (default: `metrics`)."""

    def __init__(
        self,
        state: TableState,
        metrics: Metrics,
        request_counts: Callable[[], dict[tuple, float]],
        *,
        token: str | None,
        ready: Callable[[], bool],
        admin_metrics: Metrics | None = None,
        describe_extra: Callable[[], dict] | None = None,
    ) -> None:
        self.state = state
        self.writer = AdminWriter(state)
        self.promotions = Promotions(self.writer, metrics, request_counts)
        if isinstance(state.store, PostgresAdminStore):  # fleet mode (SPEC §13): promotions under leases
            self.promotions.use_fleet(FleetLeases(state.store))
        self.api = EnvironmentsApi(self.writer, self.promotions.actions)
        self.keys = KeysApi(self.writer)
        parts = {**self.api.handlers(), **self.keys.handlers()}
        self.admin = AdminHandler(state, admin_metrics or metrics, token, ready, parts)
        self.admin.describe_extra = describe_extra
        self.server: asyncio.base_events.Server | None = None

    def __repr__(self) -> str:
        return f"<ControlPlane admin port={self.admin_port} {self.writer!r} {self.promotions!r}>"

    @property
    def admin_port(self) -> int | None:
        return self.server.sockets[0].getsockname()[1] if self.server is not None else None

    async def listen(self, host: str, port: int) -> None:
        """Open the admin listener."""
        self.server = await serve(async_handler(self.admin), host, port)

    def start(self) -> None:
        """Continue the promotions that were running when the gateway stopped."""
        self.promotions.start()

    async def stop(self) -> None:
        """Stop the promotions; their records stay as persisted and continue at the next start."""
        await self.promotions.close()

    def close(self) -> None:
        """Close the admin listener (after `stop`)."""
        if self.server is not None:
            self.server.close()
