"""Running a gateway: listeners, reload triggers, signals and drain (SPEC §3, §11)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
from dataclasses import dataclass, field

from gateway.admin.app import AdminHandler
from gateway.environments.api import EnvironmentsApi
from gateway.grpc.listener import GrpcListener, tls_context
from gateway.http.public import PublicHandler
from gateway.http.server import HttpConnection, async_handler, serve
from gateway.metrics import Metrics
from gateway.state import TableState
from gateway.tls import server_context
from gateway.upstream.pool import Pool

log = logging.getLogger("gateway")


@dataclass
class ServeOptions:
    config: str
    store: str | None = None  # the admin store (SPEC §6 changes); None: next to the config file
    host: str = "127.0.0.1"
    port: int = 8080
    admin_host: str = "127.0.0.1"
    admin_port: int | None = 9090  # None: no admin listener (a worker under the supervisor)
    admin_token: str | None = None
    grpc_port: int | None = None
    workers: int = 1
    reuse_port: bool = False  # SO_REUSEPORT: several workers share the public and gRPC ports
    drain_timeout: float = 30.0
    tls_cert: str | None = None
    tls_key: str | None = None
    grpc_tls_cert: str | None = None
    grpc_tls_key: str | None = None
    watch_interval: float = 1.0
    extra: dict = field(default_factory=dict)


class OptionsError(ValueError):
    pass


def check_options(opts: ServeOptions) -> None:
    if opts.admin_token is None and not _is_loopback(opts.admin_host):
        raise OptionsError(
            f"refusing to bind the admin listener to {opts.admin_host} without an admin token "
            "(set --admin-token or GATEWAY_ADMIN_TOKEN)"
        )
    if bool(opts.tls_cert) != bool(opts.tls_key):
        raise OptionsError("--tls-cert and --tls-key go together")
    if opts.workers < 1:
        raise OptionsError("--workers must be at least 1")
    if bool(opts.grpc_tls_cert) != bool(opts.grpc_tls_key):
        raise OptionsError("--grpc-tls-cert and --grpc-tls-key go together")
    if opts.grpc_tls_cert and opts.grpc_port is None:
        raise OptionsError("--grpc-tls-cert needs --grpc-port")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Gateway:
    """One worker: public, admin and (with --grpc-port) gRPC listeners over one `TableState`."""

    def __init__(self, opts: ServeOptions) -> None:
        self.opts = opts
        self.metrics = Metrics()
        self.state = TableState(opts.config, self.metrics, opts.store)
        self.pool = Pool()
        self.public: PublicHandler | None = None  # needs the running loop: made in start()
        self.environments = (
            EnvironmentsApi(self.state, self.metrics, lambda: self.metrics.requests.values)
            if opts.admin_port is not None
            else None  # a worker: the supervisor owns the admin API and runs the promotions
        )
        self.admin = AdminHandler(self.state, self.metrics, opts.admin_token, lambda: self.ready, self.environments)
        self.connections: set[HttpConnection] = set()
        self.servers: list[asyncio.base_events.Server] = []
        self.grpc: GrpcListener | None = None
        self.ready = False
        self.stopping = asyncio.Event()
        self.tasks: list[asyncio.Task] = []

    @property
    def public_port(self) -> int:
        return self.servers[0].sockets[0].getsockname()[1]

    @property
    def admin_port(self) -> int | None:
        return self.servers[1].sockets[0].getsockname()[1] if len(self.servers) > 1 else None

    @property
    def grpc_port(self) -> int | None:
        return self.grpc.port if self.grpc is not None else None

    async def start(self) -> None:
        opts = self.opts
        ctx = None
        if opts.tls_cert:
            ctx = server_context(opts.tls_cert, opts.tls_key or opts.tls_cert)
        self.public = PublicHandler(self.state, self.pool, self.metrics, "https" if ctx else "http")
        public = await serve(
            self.public, opts.host, opts.port, scheme="https" if ctx else "http", ssl=ctx, tracker=self.connections,
            reuse_port=opts.reuse_port,
        )  # fmt: skip
        self.servers = [public]
        if opts.admin_port is not None:
            self.servers.append(await serve(async_handler(self.admin), opts.admin_host, opts.admin_port))
        if opts.grpc_port is not None:
            cert, key = opts.grpc_tls_cert, opts.grpc_tls_key
            self.grpc = GrpcListener(
                self.state, self.metrics, tls_context(cert, key) if cert and key else None, self.public.connector
            )
            await self.grpc.start(opts.host, opts.grpc_port, reuse_port=opts.reuse_port)
        loop = asyncio.get_running_loop()
        if opts.watch_interval > 0:  # a worker under the supervisor is told when to reload instead
            self.tasks.append(loop.create_task(self.state.watch(opts.watch_interval)))
        try:
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.state.reload("SIGHUP")))
            loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
            loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        except (NotImplementedError, RuntimeError):
            pass  # not the main thread (tests run gateways in threads)
        if self.environments is not None:
            self.environments.promotions.start()
        self.ready = True
        log.info(
            "gateway serving %s on %s:%d, admin on %s:%s",
            self.state.table,
            opts.host,
            self.public_port,
            opts.admin_host,
            self.admin_port,
        )
        if self.grpc is not None:
            log.info("gRPC (%s) on %s:%d", "TLS" if self.grpc.tls else "h2c", opts.host, self.grpc_port)

    async def drain(self) -> None:
        """Stop accepting, let calls in flight finish (up to the drain timeout), then close."""
        self.ready = False
        self.servers[0].close()
        if self.grpc is not None:
            self.grpc.stop_accepting()  # GOAWAY: clients open no new streams; open ones go on
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.opts.drain_timeout
        while loop.time() < deadline and (
            any(c.current is not None for c in self.connections) or (self.grpc is not None and self.grpc.busy)
        ):
            await asyncio.sleep(0.05)
        if self.grpc is not None:
            await self.grpc.close()
        for conn in list(self.connections):
            conn.close()
        for server in self.servers:
            server.close()
        for task in self.tasks:
            task.cancel()
        if self.environments is not None:
            await self.environments.promotions.close()
        if self.public is not None:
            self.public.close()
        self.pool.close()

    async def run(self) -> None:
        await self.start()
        await self.stopping.wait()
        log.info("draining (up to %gs)", self.opts.drain_timeout)
        await self.drain()


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; tolerate its absence
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run_serve(opts: ServeOptions) -> int:
    check_options(opts)
    if opts.workers > 1:
        from gateway.supervisor import run_supervisor

        return run_supervisor(opts)
    install_uvloop()
    asyncio.run(Gateway(opts).run())
    return 0
