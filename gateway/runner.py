"""Running a gateway: listeners, reload triggers, signals and drain (SPEC §3, §11).

Two roles, composed here and in `gateway.supervisor`: the data plane (`DataPlane`: the public and
gRPC listeners, which only read the table) and the control plane (`environments.control.ControlPlane`:
the admin writer, API, listener and promotions). One process runs both (`Gateway`); with
`--workers N` the supervisor runs the control plane and each worker a data plane only.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

from gateway.asyncq.service import AsyncService
from gateway.calls.pipeline import Pipeline
from gateway.environments.control import ControlPlane
from gateway.grpc.h2server import H2Connection, H2Server
from gateway.grpc.listener import GrpcListener, tls_context
from gateway.http.h2 import PublicApp
from gateway.http.h2sweep import H2Sweeper
from gateway.http.public import PublicHandler
from gateway.http.server import HttpConnection, serve
from gateway.metrics import Metrics
from gateway.obs.setup import check_observing, observer
from gateway.ports import binding
from gateway.state import TableState
from gateway.stores import is_database
from gateway.stores.ratelimits import FleetLimits, fleet_limits
from gateway.stores.sync import follow_store
from gateway.tls import server_context
from gateway.upstream.connect import Connector
from gateway.upstream.pool import Pool

log = logging.getLogger("gateway")


@dataclass
class ServeOptions:
    config: str
    store: str | None = None  # the admin store (SPEC §6 changes); None: next to the config file
    store_cache: str | None = None  # fleet mode: the local cache of the overlay; None: next to the config file
    host: str = "127.0.0.1"
    port: int = 8080
    admin_host: str = "127.0.0.1"
    admin_port: int | None = 9090  # None: no admin listener, hence no control plane
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
    queue_store: str | None = None  # directory of the embedded async stores (SPEC §10); None: next to the table
    queue_databases: dict[str, str] = field(default_factory=dict)  # region -> its queue database (--queue-store R=URL)
    queue_gauge: bool = True  # this process reports the async queue depth (one worker of N: they share the files)
    access_log: str | None = None  # SPEC §12 --access-log FILE ("-": stdout); None: off (issue 13)
    access_log_format: str = "json"  # or "combined"
    otel: bool = False  # OpenTelemetry tracing (the [otel] extra)
    otel_sample_ratio: float = 1.0
    embedded: bool = False  # inside an ASGI server (gateway.asgi): it owns the public socket and the signals
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
    try:
        check_observing(opts)
    except ValueError as error:
        raise OptionsError(str(error)) from None
    if opts.store_cache and not is_database(opts.store):
        raise OptionsError("--store-cache goes with --store postgresql://... (fleet mode)")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class DataPlane:
    """The listeners that serve calls (public HTTP, and gRPC with --grpc-port) over one `TableState`.

    It reads the table and never changes it: admin changes come from the control plane
    (`gateway.environments.control`), in this process or, under the supervisor, as a SIGHUP reload.
    """

    def __init__(self, opts: ServeOptions, state: TableState, metrics: Metrics) -> None:
        self.opts = opts
        self.state = state
        self.metrics = metrics
        self.pool = Pool()
        self.public: PublicHandler | None = None  # needs the running loop: made in start()
        self.pipeline: Pipeline | None = None  # likewise: the call pipeline every listener shares
        self.server: asyncio.base_events.Server | None = None
        self.grpc: GrpcListener | None = None
        self.h2: GrpcListener | None = None  # the public port's HTTP/2 connections (issue 13): no socket of its own
        self.connections: set[HttpConnection] = set()
        self.asyncs: AsyncService | None = None  # the async queue (SPEC §10): an adapter of the pipeline
        self.span_exporter: object = None  # tests: the SDK's in-memory exporter in place of OTLP
        self.fleet_limits: FleetLimits | None = None  # a database store: rate limits held fleet-wide

    def __repr__(self) -> str:
        port = self.public_port if self.server is not None else None
        return f"<DataPlane public port={port} grpc port={self.grpc_port} connections={len(self.connections)}>"

    @property
    def public_port(self) -> int:
        if self.server is None:
            raise RuntimeError("the data plane has not started")
        return self.server.sockets[0].getsockname()[1]

    @property
    def grpc_port(self) -> int | None:
        return self.grpc.port if self.grpc is not None else None

    @property
    def busy(self) -> bool:
        """Calls in flight on any listener."""
        listeners = (self.grpc, self.h2)
        return any(c.current is not None for c in self.connections) or any(g is not None and g.busy for g in listeners)

    async def start(self) -> None:
        opts = self.opts
        ctx = None
        if opts.tls_cert:
            # One TLS port for HTTP/1.1, HTTP/2 and gRPC, as the platform's own :443 (issue 13).
            ctx = server_context(opts.tls_cert, opts.tls_key or opts.tls_cert, ["h2", "http/1.1"])
        public = self.assemble("https" if ctx else "http")
        self.fleet_limits = fleet_limits(self.state, public.pipeline.limiter, opts.store)
        if self.fleet_limits is not None:  # each process (each worker) is a member of the fleet's limits
            await self.fleet_limits.start()  # the first exchange before serving: it starts with its parts
        if opts.embedded:
            return  # the ASGI server carries the public calls to `self.public` (gateway/asgi/)
        # HTTP/2 connections of the public port: HTTP calls to the public handler, gRPC to a relay of its own.
        h2 = self.h2 = GrpcListener(self.state, self.metrics, None, public.pipeline)
        h2.server = H2Server(PublicApp(public, h2.relay), extended_connect=True)  # WebSocket too (RFC 8441)
        H2Sweeper(h2.server)  # slow header blocks and request bodies, as HTTP/1.1's sweep (gateway/http/h2sweep.py)
        with binding("--port", opts.host, opts.port):
            self.server = await serve(
                public, opts.host, opts.port, scheme="https" if ctx else "http", ssl=ctx,
                tracker=self.connections, reuse_port=opts.reuse_port, h2=lambda: H2Connection(h2.server),
            )  # fmt: skip
        if opts.grpc_port is not None:
            cert, key = opts.grpc_tls_cert, opts.grpc_tls_key
            self.grpc = GrpcListener(
                self.state, self.metrics, tls_context(cert, key) if cert and key else None, public.pipeline
            )
            with binding("--grpc-port", opts.host, opts.grpc_port):
                await self.grpc.start(opts.host, opts.grpc_port, reuse_port=opts.reuse_port)
            H2Sweeper(self.grpc.server)  # its slow header blocks (gRPC streams' bodies are not swept)

    def assemble(self, scheme: str) -> PublicHandler:
        """The public handler over one call pipeline and async queue, for every front end (native, ASGI)."""
        # One call pipeline per worker for every listener: admission, holds, replicas, the connector (issue 10).
        self.pipeline = Pipeline(
            self.state, self.metrics, Connector(self.state.table.gateway.dns_nameservers, self.metrics)
        )
        self.pipeline.observer = observer(self.opts, self.metrics, self.span_exporter)
        self.public = PublicHandler(self.state, self.pool, self.metrics, scheme, self.pipeline)
        self.asyncs = AsyncService(
            self.state, self.pipeline, self.metrics, queue_directory(self.opts), gauge=self.opts.queue_gauge,
            databases=self.opts.queue_databases,
        )  # fmt: skip
        self.asyncs.start()
        self.public.asyncs = self.asyncs
        return self.public

    async def drain(self, timeout: float) -> None:
        """Stop accepting, let calls in flight finish (up to `timeout`), then close every connection."""
        if self.server is not None:
            self.server.close()
        for listener in (self.grpc, self.h2):
            if listener is not None:
                listener.stop_accepting()  # GOAWAY: clients open no new streams; open ones go on
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline and self.busy:
            await asyncio.sleep(0.05)
        for listener in (self.grpc, self.h2):
            if listener is not None:
                await listener.close()
        for conn in list(self.connections):
            conn.close()
        if self.asyncs is not None:
            await self.asyncs.close()  # runs in flight stay claimed: their leases hand them on
        if self.fleet_limits is not None:
            await self.fleet_limits.close()

    def close(self) -> None:
        if self.public is not None:
            self.public.close()
        if self.pipeline is not None:
            self.pipeline.close()
            if self.pipeline.observer is not None:
                self.pipeline.observer.close()  # after the drain: every call's line is written
        self.pool.close()


def queue_directory(opts: ServeOptions) -> Path:
    """Where the embedded async stores live: `--queue-store`, else the table's directory (SPEC §10)."""
    return Path(opts.queue_store) if opts.queue_store else Path(opts.config).resolve().parent


def install_signals(stopping: asyncio.Event, state: TableState) -> None:
    """SIGTERM / SIGINT drain, SIGHUP reloads the table."""
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(state.reload("SIGHUP")))
        loop.add_signal_handler(signal.SIGTERM, stopping.set)
        loop.add_signal_handler(signal.SIGINT, stopping.set)
    except (NotImplementedError, RuntimeError):
        pass  # not the main thread (tests run gateways in threads)


class Gateway:
    """A single-process gateway: the data plane and the control plane over one `TableState`.

    Without an admin port there is no control plane (nothing could drive it). With `--workers N`
    this class is not used: the supervisor runs the control plane, each worker a `DataPlane`.
    """

    def __init__(self, opts: ServeOptions) -> None:
        self.opts = opts
        self.metrics = Metrics()
        self.state = TableState(opts.config, self.metrics, opts.store, opts.store_cache)
        self.data = DataPlane(opts, self.state, self.metrics)
        self.control = (
            ControlPlane(
                self.state,
                self.metrics,
                lambda: self.metrics.requests.values,
                token=opts.admin_token,
                ready=lambda: self.ready,
            )  # fmt: skip
            if opts.admin_port is not None
            else None
        )
        self.ready = False
        self.stopping = asyncio.Event()
        self.tasks: list[asyncio.Task] = []

    def __repr__(self) -> str:
        return f"<Gateway {'ready' if self.ready else 'not ready'} {self.data!r} {self.control!r}>"

    @property
    def public_port(self) -> int:
        return self.data.public_port

    @property
    def admin_port(self) -> int | None:
        return self.control.admin_port if self.control is not None else None

    @property
    def grpc_port(self) -> int | None:
        return self.data.grpc_port

    async def start(self) -> None:
        opts = self.opts
        await self.data.start()
        if self.control is not None and self.data.asyncs is not None:
            self.control.admin.serve_async(self.data.asyncs)
        if self.control is not None and opts.admin_port is not None:
            with binding("--admin-port", opts.admin_host, opts.admin_port):
                await self.control.listen(opts.admin_host, opts.admin_port)
        if opts.watch_interval > 0:
            self.tasks.append(asyncio.get_running_loop().create_task(self.state.watch(opts.watch_interval)))
        if is_database(opts.store):
            self.tasks.append(asyncio.get_running_loop().create_task(follow_store(self.state)))
        if not opts.embedded:
            install_signals(self.stopping, self.state)
        if self.control is not None:
            self.control.start()
        self.ready = True
        log.info(
            "gateway serving %s on %s:%s, admin on %s:%s",
            self.state.table,
            opts.host,
            "asgi" if opts.embedded else self.public_port,
            opts.admin_host,
            self.admin_port,
        )
        if self.data.grpc is not None:
            log.info("gRPC (%s) on %s:%d", "TLS" if self.data.grpc.tls else "h2c", opts.host, self.grpc_port)

    async def drain(self) -> None:
        """Stop accepting, let calls in flight finish (up to the drain timeout), then close."""
        self.ready = False
        await self.data.drain(self.opts.drain_timeout)
        for task in self.tasks:
            task.cancel()
        if self.control is not None:
            await self.control.stop()
            self.control.close()
        self.data.close()
        self.state.close()

    async def run(self) -> None:
        try:
            await self.start()
        except BaseException:
            await self.drain()  # close what did open (a busy port fails the start half-way)
            raise
        await self.stopping.wait()
        log.info("draining (up to %gs)", self.opts.drain_timeout)
        await self.drain()


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; tolerate its absence
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run_gateway(opts: ServeOptions) -> int:
    """`gateway serve` in one process (`--workers N` with N > 1 is `supervisor.run_supervisor`)."""
    check_options(opts)
    if opts.workers > 1:
        raise OptionsError("--workers above 1 runs under the supervisor (gateway.supervisor.run_supervisor)")
    install_uvloop()
    asyncio.run(Gateway(opts).run())
    return 0
