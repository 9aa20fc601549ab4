"""`--workers N`: N worker processes on one port, one admin listener, one table for all.

Each worker is a full gateway (public and gRPC listeners, its own event loop) that binds the
shared ports with SO_REUSEPORT, so the kernel spreads connections across workers. The
supervisor (the parent process) owns what must be single:
- the admin listener: `/metrics` sums the workers' published snapshots, `/readyz` is ready
  when every worker is, `/v1/routing` shows the table and each worker's digest;
- reloads: the supervisor validates the table once (file change, SIGHUP, admin call) and only a
  good table is signalled to every worker (SIGHUP), so workers reload together and never diverge
  on an invalid file;
- signals: SIGTERM drains every worker, then exits 0; a worker that dies is started again.
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
import tempfile
import time
from multiprocessing.process import BaseProcess
from pathlib import Path

from gateway.admin.app import AdminHandler
from gateway.environments.api import EnvironmentsApi
from gateway.http.server import async_handler, serve
from gateway.metrics import Metrics, merge, snapshot
from gateway.state import TableState

log = logging.getLogger("gateway.supervisor")
PUBLISH_SECONDS = 1.0
MONITOR_SECONDS = 0.5


def worker_main(opts, index: int, metrics_dir: str) -> None:  # noqa: ANN001 - ServeOptions, kept picklable
    """Entry point of a worker process (spawned: a fresh interpreter, nothing inherited)."""
    from gateway.runner import install_uvloop

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s worker-{index} %(name)s: %(message)s")
    install_uvloop()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_worker(opts, index, Path(metrics_dir)))


async def _worker(opts, index: int, metrics_dir: Path) -> None:  # noqa: ANN001
    from gateway.runner import Gateway

    gateway = Gateway(dataclasses.replace(opts, admin_port=None, reuse_port=True, watch_interval=0))
    await gateway.start()
    path = metrics_dir / f"worker-{index}-{os.getpid()}.json"

    def publish() -> None:
        data = {
            "pid": os.getpid(), "index": index, "ready": gateway.ready, "time": time.time(),
            "digest": gateway.state.table.digest, "generation": gateway.state.generation,
            "metrics": snapshot(gateway.metrics),
        }  # fmt: skip
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)  # readers never see half a file

    async def publisher() -> None:
        while True:
            publish()
            await asyncio.sleep(PUBLISH_SECONDS)

    task = asyncio.get_running_loop().create_task(publisher())
    await gateway.stopping.wait()
    await gateway.drain()
    task.cancel()
    gateway.ready = False
    publish()  # the final counts of this worker stay in the sums


class Supervisor:
    def __init__(self, opts) -> None:  # noqa: ANN001 - ServeOptions
        self.opts = opts
        self.metrics = Metrics()  # the supervisor's own: table reloads
        self.state = TableState(opts.config, self.metrics, opts.store)
        self.metrics_dir = Path(tempfile.mkdtemp(prefix="gateway-workers-"))
        self.ctx = multiprocessing.get_context("spawn")
        self.workers: dict[int, BaseProcess] = {}
        self.stopping = asyncio.Event()
        self.state.on_swap.append(lambda table: self.signal_workers(signal.SIGHUP))

    def start_worker(self, index: int) -> None:
        proc = self.ctx.Process(target=worker_main, args=(self.opts, index, str(self.metrics_dir)), daemon=False)
        proc.start()
        self.workers[index] = proc
        log.info("worker %d started (pid %d)", index, proc.pid)

    def signal_workers(self, sig: int) -> None:
        for proc in self.workers.values():
            if proc.pid is not None and proc.is_alive():
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
        live = self.live(self.snapshots())
        return len(live) == self.opts.workers and all(s["ready"] for s in live)

    async def monitor(self) -> None:
        while not self.stopping.is_set():
            await asyncio.sleep(MONITOR_SECONDS)
            for index, proc in list(self.workers.items()):
                if not proc.is_alive() and not self.stopping.is_set():
                    log.error("worker %d (pid %s) exited with %s; starting it again", index, proc.pid, proc.exitcode)
                    self.start_worker(index)

    async def run(self) -> None:
        for index in range(self.opts.workers):
            self.start_worker(index)
        environments = EnvironmentsApi(self.state, self.metrics, self.request_counts)
        admin = AdminHandler(self.state, _MergedMetrics(self), self.opts.admin_token, self.ready, environments)
        admin.describe_extra = self.describe_workers
        server = await serve(async_handler(admin), self.opts.admin_host, self.opts.admin_port)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.state.reload("SIGHUP")))
        tasks = [loop.create_task(self.monitor()), loop.create_task(self.state.watch(self.opts.watch_interval))]
        environments.promotions.start()
        await self.stopping.wait()
        await environments.promotions.close()
        log.info("draining %d workers (up to %gs)", len(self.workers), self.opts.drain_timeout)
        self.signal_workers(signal.SIGTERM)
        deadline = time.monotonic() + self.opts.drain_timeout + 5
        for proc in self.workers.values():
            await asyncio.to_thread(proc.join, max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
        for task in tasks:
            task.cancel()
        server.close()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)

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
        for name in ("gateway_inflight_requests", "gateway_held_requests"):
            merge(merged, [{name: m.get(name, [])} for m in live])  # gauges: the living workers only
        merged.reloads.values = dict(self.supervisor.metrics.reloads.values)  # validated here, once
        merged.table_info.values = dict(self.supervisor.metrics.table_info.values)
        merged.promotion.values = dict(self.supervisor.metrics.promotion.values)  # promotions run here
        merged.promotion_state.values = dict(self.supervisor.metrics.promotion_state.values)
        return merged.render()


def run_supervisor(opts) -> int:  # noqa: ANN001 - ServeOptions
    from gateway.runner import install_uvloop

    install_uvloop()
    asyncio.run(Supervisor(opts).run())
    return 0
