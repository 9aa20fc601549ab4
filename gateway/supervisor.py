"""`--workers N`: N worker processes on one port, one admin listener, one table for all.

Each worker is a data plane only (`runner.DataPlane`: public and gRPC listeners, its own event
loop) that binds the shared ports with SO_REUSEPORT, so the kernel spreads connections across
workers. The supervisor (the parent process) runs the control plane
(`environments.control.ControlPlane`: the admin writer, API and listener, the promotions) and owns
what else must be single:
- the admin listener: `/metrics` sums the workers' published snapshots, `/readyz` is ready
  when every worker is, `/v1/routing` shows the table and each worker's digest;
- reloads: the supervisor validates the table once (file change, SIGHUP, admin call) and only a
  good table is signalled to every worker (SIGHUP), so workers reload together and never diverge
  on an invalid file;
- signals: SIGTERM drains every worker, then exits 0; a worker that dies is started again.

In fleet mode (`--store postgresql://...`, SPEC §13) the gateway is one member of the fleet, however
many workers it runs: only the supervisor talks to the database (it follows the store, writes admin
changes, holds promotion leases and publishes the workers' summed counts). Every overlay it serves
it first copies to `overlay.json` in its working directory (`OVERLAY_FILE`), which the workers read
as their admin store on the SIGHUP that follows, so a change another gateway made reaches every
worker within the same second, and while the database is down the workers keep the last good one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from multiprocessing.process import BaseProcess
from pathlib import Path

from gateway.asyncq.service import QueueFiles
from gateway.environments.control import ControlPlane
from gateway.environments.store import JsonFileStore, StoreError
from gateway.metrics import Metrics, merge, snapshot
from gateway.ports import EXIT_CODE, PortUnavailable, binding, check_free
from gateway.runner import DataPlane, ServeOptions, install_signals, install_uvloop, queue_directory
from gateway.state import TableState
from gateway.stores import is_database
from gateway.stores.sync import follow_store

log = logging.getLogger("gateway.supervisor")
PUBLISH_SECONDS = 1.0
MONITOR_SECONDS = 0.5
OVERLAY_FILE = "overlay.json"  # fleet mode: the overlay the supervisor serves, the workers' admin store


def worker_store(opts: ServeOptions, metrics_dir: Path) -> str | None:
    """The admin store a worker reads: the supervisor's copy in fleet mode, else the gateway's own."""
    return str(metrics_dir / OVERLAY_FILE) if is_database(opts.store) else opts.store


def worker_main(opts: ServeOptions, index: int, metrics_dir: str) -> None:
    """Entry point of a worker process (spawned: a fresh interpreter, nothing inherited)."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s worker-{index} %(name)s: %(message)s")
    install_uvloop()
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(Worker(opts, index, Path(metrics_dir)).run())
    except PortUnavailable as exc:  # taken since the supervisor checked it: the supervisor stops (monitor)
        print(f"gateway: {exc}", file=sys.stderr)
        sys.exit(EXIT_CODE)


class Worker:
    """One worker process: a data plane over its own `TableState`, reloaded when the supervisor says (SIGHUP).

    No control plane: it never writes the table or the admin store, and runs no promotions. In fleet
    mode it never connects to the admin store's database either (`worker_store`).
    """

    def __init__(self, opts: ServeOptions, index: int, metrics_dir: Path) -> None:
        self.opts = dataclasses.replace(
            opts, admin_port=None, reuse_port=True, watch_interval=0, queue_gauge=index == 0
        )  # one worker reports the async queue depth: the workers share the queue files
        self.index = index
        self.metrics = Metrics()
        self.state = TableState(opts.config, self.metrics, worker_store(opts, metrics_dir))
        self.state.on_swap.append(lambda table: self.publish())  # the supervisor sees the new digest at once
        self.data = DataPlane(self.opts, self.state, self.metrics)
        self.path = metrics_dir / f"worker-{index}-{os.getpid()}.json"
        self.ready = False
        self.stopping = asyncio.Event()

    def __repr__(self) -> str:
        return f"<Worker {self.index} pid={os.getpid()} {'ready' if self.ready else 'not ready'} {self.data!r}>"

    def publish(self) -> None:
        data = {
            "pid": os.getpid(), "index": self.index, "ready": self.ready, "time": time.time(),
            "digest": self.state.table.digest, "generation": self.state.generation,
            "metrics": snapshot(self.metrics),
        }  # fmt: skip
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)  # readers never see half a file

    async def publisher(self) -> None:
        while True:
            self.publish()
            await asyncio.sleep(PUBLISH_SECONDS)

    async def run(self) -> None:
        await self.data.start()
        install_signals(self.stopping, self.state)
        self.ready = True
        self.publish()
        # The supervisor signals only workers it has seen ready (SIGHUP would kill one still starting):
        # a change it made before this worker said so is caught up here.
        if await asyncio.to_thread(self.state.moved_on):
            await self.state.reload("changed while starting")
        task = asyncio.get_running_loop().create_task(self.publisher())
        await self.stopping.wait()
        self.ready = False
        self.publish()
        await self.data.drain(self.opts.drain_timeout)
        self.data.close()
        task.cancel()
        self.publish()  # the final counts of this worker stay in the sums


class Supervisor:
    def __init__(self, opts: ServeOptions) -> None:
        self.opts = opts
        self.metrics = Metrics()  # the supervisor's own: table reloads
        self.state = TableState(opts.config, self.metrics, opts.store, opts.store_cache)
        self.metrics_dir = Path(tempfile.mkdtemp(prefix="gateway-workers-"))
        if is_database(opts.store):  # the workers' admin store: what this process serves (module docstring)
            self.mirror = JsonFileStore(str(self.metrics_dir / OVERLAY_FILE))
            self.mirror.write(self.state.overlay)  # before any worker starts; a failure here stops the start
            self.state.on_overlay.append(self.copy_for_workers)
        self.ctx = multiprocessing.get_context("spawn")
        self.workers: dict[int, BaseProcess] = {}
        self.stopping = asyncio.Event()
        self.failed: int | None = None  # the exit code when a worker could not start (a port taken meanwhile)
        self.state.on_swap.append(lambda table: self.signal_workers(signal.SIGHUP, ready_only=True))

    def copy_for_workers(self, overlay: dict) -> None:
        try:
            self.mirror.write(overlay)
        except StoreError as exc:  # never fail the change or the store's follower: the workers lag, and say so
            log.error("cannot copy the admin changes for the workers, which keep the previous ones: %s", exc)

    def start_worker(self, index: int) -> None:
        proc = self.ctx.Process(target=worker_main, args=(self.opts, index, str(self.metrics_dir)), daemon=False)
        proc.start()
        self.workers[index] = proc
        log.info("worker %d started (pid %d)", index, proc.pid)

    def signal_workers(self, sig: int, *, ready_only: bool = False) -> None:
        """`sig` to every live worker; `ready_only`: to those that said they are ready (their handlers are set)."""
        ready = {s["pid"] for s in self.snapshots() if s["ready"]} if ready_only else None
        for proc in self.workers.values():
            if proc.pid is not None and proc.is_alive() and (ready is None or proc.pid in ready):
                os.kill(proc.pid, sig)

    def snapshots(self) -> list[dict]:
        out = []
        for path in self.metrics_dir.glob("worker-*.json"):
            with contextlib.suppress(OSError, ValueError):
                out.append(json.loads(path.read_text()))
        return out

    def live(self, snaps: list[dict]) -> list[dict]:
        pids = {p.pid for p in self.workers.values() if p.is_alive()}
        return [s for s in snaps if s["pid"] in pids]

    def ready(self) -> bool:
        if self.stopping.is_set():
            return False  # draining: load balancers take this gateway out while its calls finish
        live = self.live(self.snapshots())
        return len(live) == self.opts.workers and all(s["ready"] for s in live)

    async def monitor(self) -> None:
        while not self.stopping.is_set():
            await asyncio.sleep(MONITOR_SECONDS)
            for index, proc in list(self.workers.items()):
                if proc.exitcode == EXIT_CODE and not self.stopping.is_set():
                    self.failed = EXIT_CODE  # it printed why; starting it again would fail the same way
                    self.stopping.set()
                elif not proc.is_alive() and not self.stopping.is_set():
                    log.error("worker %d (pid %s) exited with %s; starting it again", index, proc.pid, proc.exitcode)
                    self.start_worker(index)

    async def run(self) -> None:
        opts = self.opts
        check_free("--port", opts.host, opts.port, reuse_port=True)  # one line here, not one per worker
        check_free("--grpc-port", opts.host, opts.grpc_port, reuse_port=True)
        control = ControlPlane(
            self.state, self.metrics, self.request_counts, token=self.opts.admin_token, ready=self.ready,
            admin_metrics=_MergedMetrics(self), describe_extra=self.describe_workers,
        )  # fmt: skip
        queues = QueueFiles(queue_directory(self.opts), self.state, self.opts.queue_databases)
        control.admin.serve_async(queues)  # GET /v1/async/queues over the workers' files
        with binding("--admin-port", opts.admin_host, opts.admin_port or 0):
            await control.listen(opts.admin_host, opts.admin_port or 0)
        for index in range(opts.workers):
            self.start_worker(index)
        install_signals(self.stopping, self.state)
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(self.monitor()), loop.create_task(self.state.watch(self.opts.watch_interval))]
        if is_database(opts.store):
            tasks.append(loop.create_task(follow_store(self.state)))  # fleet mode: one listener per gateway
        control.start()
        await self.stopping.wait()
        await control.stop()
        log.info("draining %d workers (up to %gs)", len(self.workers), self.opts.drain_timeout)
        self.signal_workers(signal.SIGTERM)
        deadline = time.monotonic() + self.opts.drain_timeout + 5
        for proc in self.workers.values():
            await asyncio.to_thread(proc.join, max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
        for task in tasks:
            task.cancel()
        control.close()
        self.state.close()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def processes(self) -> list[tuple[str, int]]:
        """(worker label, pid): the supervisor unlabelled, each live worker as its index."""
        live = sorted((i, p.pid) for i, p in self.workers.items() if p.pid is not None and p.is_alive())
        return [("", os.getpid())] + [(str(index), pid) for index, pid in live]

    def request_counts(self) -> dict[tuple, float]:
        """`gateway_requests_total` summed over every worker (what promotions' rollback rules watch)."""
        merged = Metrics()
        merge(merged, [{"gateway_requests_total": s["metrics"].get("gateway_requests_total", [])}
                       for s in self.snapshots()], gauges=False)  # fmt: skip
        return merged.requests.values

    def describe_workers(self) -> dict:
        live = self.live(self.snapshots())
        return {
            "workers": sorted(
                ({"index": s["index"], "pid": s["pid"], "ready": s["ready"], "digest": s["digest"],
                  "generation": s["generation"]} for s in live),
                key=lambda w: w["index"],
            )
        }  # fmt: skip


class _MergedMetrics(Metrics):
    """What the supervisor's /metrics shows: its own reload counts plus the workers' sums."""

    def __init__(self, supervisor: Supervisor) -> None:
        super().__init__()
        self.supervisor = supervisor

    def render(self) -> bytes:
        merged = Metrics()
        snaps = self.supervisor.snapshots()
        merge(merged, [s["metrics"] for s in snaps], gauges=False)  # counters: every worker that ever ran
        live = [s["metrics"] for s in self.supervisor.live(snaps)]
        for name in ("gateway_inflight_requests", "gateway_held_requests", "gateway_async_queue_depth"):
            merge(merged, [{name: m.get(name, [])} for m in live])  # gauges: the living workers only
        merged.reloads.values = dict(self.supervisor.metrics.reloads.values)  # validated here, once
        merged.table_info.values = dict(self.supervisor.metrics.table_info.values)
        merged.promotion.values = dict(self.supervisor.metrics.promotion.values)  # promotions run here
        merged.promotion_state.values = dict(self.supervisor.metrics.promotion_state.values)
        merged.store_up.values = dict(self.supervisor.metrics.store_up.values)  # fleet mode: only it connects
        merged.store_errors.values = dict(self.supervisor.metrics.store_errors.values)
        merged.processes = self.supervisor.processes  # process_*: the supervisor's, then worker="<index>"
        return merged.render()


def run_supervisor(opts: ServeOptions) -> int:
    """`gateway serve --workers N`: the supervisor's process (the control plane) and N data-plane workers."""
    install_uvloop()
    supervisor = Supervisor(opts)
    try:
        asyncio.run(supervisor.run())
    finally:
        shutil.rmtree(supervisor.metrics_dir, ignore_errors=True)  # also when a port is taken
    return supervisor.failed or 0
