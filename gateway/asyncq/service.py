"""The async queue of one worker (SPEC §10): submit, look up, cancel, and the scheduler that runs
stored requests through the call pipeline and delivers their webhooks.

The queue's worker is one more adapter of the pipeline (`gateway.calls`): a run resolves its
route again (`resolve_async_run`: the environment's deployment now, in the request's region),
asks `Pipeline.admit` like any call (so it is counted in the deployment's in-flight, and a
scaled-to-zero deployment is woken), and goes to the replica the pipeline picked, through the
region-checked connector. Async runs only take concurrency that synchronous calls leave free:
`concurrency_target` (1 when unset) x replicas, minus every call in flight, and nothing while a
synchronous call waits in the hold for that deployment. A plane's 429 backs the target off.

Every transition is written to the region's store before the gateway acts on it (see
`gateway.asyncq.store`); this object keeps only what a restart may lose: which claims are
running here, back-off of targets, and counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

from gateway.asyncq import webhook
from gateway.asyncq.placement import QueueFiles as QueueFiles  # the supervisor's reader of the queues
from gateway.asyncq.placement import Store, open_region_store, queue_report, served_regions
from gateway.asyncq.request import (
    FINAL,
    MAX_RESULT_BYTES,
    MAX_RUN_SECONDS,
    AsyncRequest,
    Submit,
    backoff_seconds,
    error_code_of,
    retryable_status,
)
from gateway.asyncq.store import LEASE_SECONDS
from gateway.calls.admission import concurrency_limit
from gateway.calls.info import CallInfo
from gateway.calls.pipeline import Go, Pipeline
from gateway.calls.ratelimit import TokenBucket, default_burst
from gateway.environments.store import StoreError
from gateway.errors import GatewayError, MisdirectedRequest, ModelNotFound, ModelUnavailable, RateLimited
from gateway.metrics import Metrics
from gateway.routing.model import Table
from gateway.routing.resolve import RequestLookup, Route, resolve_async_run
from gateway.state import TableState
from gateway.stores.db import StoreUnavailable

log = logging.getLogger("gateway.asyncq")

TICK_SECONDS = 0.05  # the scheduler's pace while there is work
IDLE_SECONDS = 0.25  # and while there is none (another worker's submits are seen this late)
RENEW_SECONDS = LEASE_SECONDS / 3
PURGE_SECONDS = 30.0
WAKE_EVERY_SECONDS = 30.0
BACKOFF_429 = (1.0, 30.0)  # a target's back-off after a plane's 429: first, at most
MAX_WEBHOOKS_IN_FLIGHT = 64
SCAN_SECONDS = 1.0  # the store's list of targets with work, and the depth gauge, are read this often
COUNT_SECONDS = 1.0  # a team's open requests are counted again this often (its limit is that approximate)
STORE_BACKOFF = (0.25, 5.0)  # the scheduler's wait before it tries an unreachable store again: first, at most
PERSIST_BACKOFF = (0.1, 2.0)  # a run's outcome is written again this often while its store is unreachable


class AsyncService:
    """See the module docstring. One per worker; `start()` begins scheduling, `close()` ends it."""

    def __init__(
        self, state: TableState, pipeline: Pipeline, metrics: Metrics, directory: Path, *, gauge: bool = True,
        databases: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        self.state = state
        self.pipeline = pipeline
        self.metrics = metrics
        self.directory = directory
        self.databases = dict(databases or {})  # region -> its queue database (--queue-store REGION=URL)
        self.loop = asyncio.get_running_loop()
        self.stores: dict[str, Store] = {}
        self.running: dict[str, tuple[Store, asyncio.Task]] = {}  # request id -> its run or delivery
        self.down: dict[str, tuple[float, float]] = {}  # region -> (loop time to try its store again, last wait)
        self.backoff: dict[tuple, tuple[float, float]] = {}  # target -> (until, last delay)
        self.woken: dict[tuple, float] = {}  # (model, deployment) -> when a wake was last sent
        self.kick = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.senders = self._senders(state.table)
        self.secrets: tuple[bytes, ...] = ()
        self.secret_error: str | None = None
        self._load_secrets(state.table)
        self.limits: dict[tuple[str, str], TokenBucket] = {}  # (team, kind) -> its bucket
        self.open_counts: dict[tuple[str, str], tuple[int, float]] = {}  # (region, team) -> (count, when)
        # Targets known to have queued work: this worker's submits and requeues at once, the store's
        # whole list (other workers' submits, a restart's backlog) every SCAN_SECONDS.
        self.pending: set[tuple[str, str, str, str]] = set()  # (region, model, environment, deployment)
        self.scanned = -SCAN_SECONDS
        self.gauged = -SCAN_SECONDS
        self.gauge = gauge  # under --workers N one worker reports the depth (the others read the same files)
        state.on_swap.append(self._table_swapped)

    def __repr__(self) -> str:
        return f"<AsyncService {sorted(self.stores)} | {len(self.running)} running>"

    def start(self) -> None:
        for region in self._served(self.state.table):
            store = self.store(region)  # open every served region's store now: recovery starts at once
            if self.databases:  # fleet mode: say which regions are in a database and which stay in files
                log.info("async queue of region %s: %s", region, store.where)
        self.task = self.loop.create_task(self._schedule())

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        for _, task in list(self.running.values()):
            task.cancel()
        await asyncio.gather(*(t for _, t in self.running.values()), return_exceptions=True)
        for store in self.stores.values():
            await asyncio.to_thread(store.close)

    # -- table --------------------------------------------------------------------------------

    def _served(self, table: Table) -> list[str]:
        return served_regions(table)

    def _senders(self, table: Table) -> webhook.WebhookSender:
        return webhook.WebhookSender(self.pipeline.connector, table.gateway.async_settings.webhook_allowed_hosts)

    def _load_secrets(self, table: Table) -> None:
        specs = [dict(spec) for spec in table.gateway.async_settings.webhook_secrets]
        try:
            self.secrets, self.secret_error = webhook.load_secrets(specs), None
        except ValueError as exc:  # webhooks go unsigned? No: they wait, and the error is logged and shown
            self.secrets, self.secret_error = (), str(exc)
            log.error("async webhooks: %s", exc)

    def _table_swapped(self, table: Table) -> None:
        self.senders = self._senders(table)
        self._load_secrets(table)
        self.kick.set()

    def store(self, region: str) -> Store:
        store = self.stores.get(region)
        if store is None:
            store = open_region_store(self.directory, self.databases, region)
            self.stores[region] = store
        return store

    # -- the API's operations -------------------------------------------------------------------

    async def submit(self, route: Route, submit: Submit, request_id: str, caller: str) -> None:
        """Store the request durably (returns once it is fsync'd); 429 past the team's limits."""
        team = self.state.table.teams[route.model.team]
        self._take(team.name, "submit", team.async_limits.submits_per_second)
        region = route.region or route.deployment.region  # async routes always name their store's region
        store = self.store(region)
        if await self._open_count(store, team.name) >= team.async_limits.max_queued:
            raise RateLimited(
                f"team '{team.name}' has {team.async_limits.max_queued} async requests queued or in progress; "
                "retry once some have run",
                headers=(("retry-after", "10"),),
            )
        now = time.time()
        req = AsyncRequest(
            request_id=request_id, team=team.name, region=region, model_id=route.model.id,
            kind=route.model.kind, environment=route.environment, deployment_id=route.deployment.id, caller=caller,
            priority=submit.priority, max_time_in_queue_seconds=submit.max_time_in_queue_seconds, retry=submit.retry,
            webhook_endpoint=submit.webhook_endpoint, body=submit.model_input, created_at=now, next_at=now,
        )  # fmt: skip
        async with unavailable_as_503(region):
            await store.insert(req)
        count, when = self.open_counts[(region, team.name)]
        self.open_counts[(region, team.name)] = (count + 1, when)
        self.pending.add(target_of(req))
        self.metrics.async_requests.inc(self._labels(req) + ("QUEUED",))
        self.kick.set()

    async def _open_count(self, store: Store, team: str) -> int:
        """The team's queued + in-progress requests in `store`: counted at most every COUNT_SECONDS,
        and kept up by this worker's submits in between (a COUNT per submit was most of its cost)."""
        key = (store.region, team)
        now = self.loop.time()
        count, when = self.open_counts.get(key, (0, -COUNT_SECONDS))
        if now - when >= COUNT_SECONDS:
            async with unavailable_as_503(store.region):
                count = await store.team_open(team)
            when = self.loop.time()
            self.open_counts[key] = (count, when)
        return count

    async def lookup(self, lookup: RequestLookup) -> tuple[Store, AsyncRequest]:
        """The request `lookup` names, if the caller may see it (its team, its model, its region)."""
        self._take(
            lookup.api_key.team,
            "status",
            self.state.table.teams[lookup.api_key.team].async_limits.status_calls_per_second,
        )
        regions = [lookup.region] if lookup.region else self._served(self.state.table)
        away = None  # a region whose store did not answer: "not found" cannot be said then
        for region in regions:
            if lookup.region is not None and region not in self._served(self.state.table):
                raise MisdirectedRequest(f"this gateway does not serve region '{region}'")
            store = self.store(region)
            try:
                req = await store.get(lookup.request_id)
            except StoreError:
                away = region  # another region's store may still have it
                continue
            if req is not None and req.team == lookup.api_key.team and req.model_id == lookup.model.id:
                return store, req
        if away is not None:
            async with unavailable_as_503(away):
                raise StoreUnavailable(f"the async queue store of region '{away}' did not answer")
        raise ModelNotFound(f"async request '{lookup.request_id}' not found")

    async def cancel(self, lookup: RequestLookup) -> dict:
        store, req = await self.lookup(lookup)
        async with unavailable_as_503(store.region):
            was = await store.cancel(req.request_id, time.time())
        if was == "QUEUED":
            self.metrics.async_requests.inc(self._labels(req) + ("CANCELED",))
            return {"request_id": req.request_id, "canceled": True, "message": "the request was canceled"}
        if was == "IN_PROGRESS":
            message = "the request is in progress: it runs to its end"
        else:
            message = f"the request already ended ({was})"
        return {"request_id": req.request_id, "canceled": False, "message": message}

    async def queue_status(self, route: Route) -> dict:
        team = self.state.table.teams[route.model.team]
        self._take(team.name, "status", team.async_limits.status_calls_per_second)
        region = route.region or route.deployment.region
        async with unavailable_as_503(region):
            queued, running = await self.store(region).queue_counts(
                route.model.id, route.environment, "" if route.environment else route.deployment.id
            )
        id_field = "chain_id" if route.model.kind == "chain" else "model_id"
        return {
            id_field: route.model.id, "deployment_id": route.deployment.id,
            "num_queued_requests": queued, "num_in_progress_requests": running,
        }  # fmt: skip

    async def queues(self) -> dict:
        """The admin read of the queues (`GET /v1/async/queues`)."""
        return {**await queue_report(self.directory, self.stores), "running_here": len(self.running),
                "webhook_secrets_error": self.secret_error}  # fmt: skip

    def _take(self, team: str, kind: str, rate: float) -> None:
        """A token of the team's `kind` bucket (per worker; burst = one second's worth, at least 1), else 429."""
        now = self.loop.time()
        bucket = self.limits.get((team, kind))
        if bucket is None:
            bucket = self.limits[(team, kind)] = TokenBucket(rate, default_burst(rate), now)
        elif bucket.rate != rate:  # the table changed the limit
            bucket.retune(rate, default_burst(rate), now)
        if not bucket.take(now):
            wait = max(1, math.ceil(bucket.wait(now)))
            raise RateLimited(
                f"team '{team}' is past its async {'submit' if kind == 'submit' else 'status call'} rate; retry later",
                headers=(("retry-after", str(wait)),),
            )

    # -- the scheduler --------------------------------------------------------------------------

    async def _schedule(self) -> None:
        last_renew = last_purge = 0.0
        while True:
            busy = False
            try:
                now = time.time()
                # The depth before this step's claims: a request claimed only to be put back (its
                # deployment scaled to zero, full) is waiting, and would never be seen after them.
                if self.gauge and self.loop.time() - self.gauged >= SCAN_SECONDS:
                    self.gauged = self.loop.time()
                    await self._gauge()
                scan = self.loop.time() - self.scanned >= SCAN_SECONDS
                if scan:
                    self.scanned = self.loop.time()
                for store in self._reachable():
                    try:
                        busy |= await self._claim_runs(store, now, scan)
                        busy |= await self._claim_webhooks(store, now)
                    except StoreUnavailable as exc:
                        self._store_down(store, exc)
                    else:
                        self._store_up(store)
                if now - last_renew >= RENEW_SECONDS and self.running:
                    last_renew = now
                    await self._renew(now)
                ttl = self.state.table.gateway.async_settings.result_ttl_seconds
                if now - last_purge >= min(PURGE_SECONDS, max(0.5, ttl / 4)):
                    last_purge = now
                    await self._purge(now)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug or a store error must not stop the queue: log and go on
                log.exception("async scheduler step failed")
            self.kick.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK_SECONDS if busy else IDLE_SECONDS):
                    await self.kick.wait()

    def _reachable(self) -> list[Store]:
        """The stores to work on this step: not those that failed a moment ago (they are tried
        again with back-off, so a database that is down is not hammered, nor the log filled)."""
        now = self.loop.time()
        return [store for region, store in list(self.stores.items()) if self.down.get(region, (0.0, 0.0))[0] <= now]

    def _store_down(self, store: Store, exc: StoreError) -> None:
        _, last = self.down.get(store.region, (0.0, 0.0))
        delay = min(STORE_BACKOFF[1], last * 2 if last else STORE_BACKOFF[0])
        if not last:
            log.warning("async queue of region %s: %s; the scheduler retries with back-off", store.region, exc)
        self.down[store.region] = (self.loop.time() + delay, delay)

    def _store_up(self, store: Store) -> None:
        if self.down.pop(store.region, None) is not None:
            log.info("async queue of region %s: the store answers again; the queue resumes", store.region)
            self.scanned = -SCAN_SECONDS  # read its whole list of targets at the next step

    async def _claim_runs(self, store: Store, now: float, scan: bool) -> bool:
        busy = False
        region = store.region
        if scan:
            self.pending.update((region, *target) for target in await store.targets(now))
        for key in [k for k in self.pending if k[0] == region]:
            _, model_id, environment, deployment_id = key
            until, _ = self.backoff.get(key, (0.0, 0.0))
            if until > now:
                busy = True
                continue
            free = self._free(model_id, environment, deployment_id, region)
            if free <= 0:
                busy = True
                continue
            claimed = await store.claim_runs(model_id, environment, deployment_id, free, now)
            for req in claimed:
                self._spawn(store, req, self._run(store, req))
            if len(claimed) < free:
                self.pending.discard(key)  # nothing more is ready now; a submit, requeue or scan adds it back
            busy = busy or bool(claimed)
        return busy

    async def _claim_webhooks(self, store: Store, now: float) -> bool:
        room = MAX_WEBHOOKS_IN_FLIGHT - len(self.running)
        if room <= 0 or not await store.webhooks_due(now):
            return False
        for req in await store.claim_webhooks(room, now):
            if req.request_id not in self.running:
                self._spawn(store, req, self._deliver(store, req))
        return True

    def _spawn(self, store: Store, req: AsyncRequest, work: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(work)
        rid = req.request_id
        self.running[rid] = (store, task)
        task.add_done_callback(lambda _t: self.running.pop(rid, None))

    def _free(self, model_id: str, environment: str, deployment_id: str, region: str) -> int:
        """Runs this target may start now: what synchronous calls leave of the deployment's
        concurrency (SPEC §10), never while a synchronous call is held for it."""
        try:
            route = resolve_async_run(self.state.table, model_id, environment, deployment_id, region, "")
        except GatewayError:
            return 1  # the run fails (or waits) with the error; let one through to record it
        if route.action == "hold":
            return 1  # one run at a time wakes the deployment and waits
        endpoints = self.pipeline.replicas.get(route)
        replicas = max(1, endpoints.replica_count())
        limit = concurrency_limit(route.model.environments.get(route.environment), replicas) or replicas  # target 1
        if self.pipeline.holds.waiting((route.model.id, route.deployment.id)):
            return 0
        return limit - endpoints.in_flight_total()

    async def _renew(self, now: float) -> None:
        by_store: dict[Store, list[str]] = {}
        for rid, (store, _) in self.running.items():
            by_store.setdefault(store, []).append(rid)
        for store, ids in by_store.items():
            try:
                await store.renew(ids, now)
            except StoreUnavailable as exc:  # renewed at the next tick; a lease lasts three of them
                self._store_down(store, exc)

    async def _purge(self, now: float) -> None:
        ttl = self.state.table.gateway.async_settings.result_ttl_seconds
        for store in self._reachable():
            try:
                purged = await store.purge(now - ttl)
            except StoreUnavailable as exc:
                self._store_down(store, exc)
                continue
            if purged:
                log.info("async store %s: purged %d requests past their result TTL", store.region, purged)

    async def _gauge(self) -> None:
        rows = []
        for store in self._reachable():
            try:
                rows += [(store.region, row) for row in await store.depth()]
            except StoreUnavailable as exc:
                self._store_down(store, exc)
        depth = self.metrics.async_depth
        depth.values.clear()
        for region, (model, env, dep, priority, queued) in rows:
            depth.set((model, env, dep, region, str(priority)), queued)

    def _labels(self, req: AsyncRequest) -> tuple:
        return (req.model_id, req.environment, req.deployment_id, req.region)

    # -- one run --------------------------------------------------------------------------------

    async def _run(self, store: Store, req: AsyncRequest) -> None:
        try:
            await self._run_once(store, req)
        except asyncio.CancelledError:
            raise  # the gateway stops: the claim stays, and its lease lets another process take it
        except Exception:
            log.exception("async run of %s failed unexpectedly", req.request_id)
            req.errors = [{"code": "INTERNAL_SERVER_ERROR", "message": "the gateway failed running the request"}]
            await self._end(store, req, "FAILED")

    async def _run_once(self, store: Store, req: AsyncRequest) -> None:
        table, now = self.state.table, time.time()
        if now > req.deadline and req.attempts <= 1:
            req.errors = [{"code": "MODEL_NOT_READY", "message": "the request waited in the queue past its "
                           "max_time_in_queue_seconds"}]  # fmt: skip
            await self._end(store, req, "EXPIRED")
            return
        try:
            route = resolve_async_run(table, req.model_id, req.environment, req.deployment_id, req.region, req.caller)
        except GatewayError as refused:
            await self._failed_attempt(store, req, 0, refused.message, retry=refused.status in (503, 504))
            return
        if route.action == "hold":  # scaled to zero: wake it and wait in the queue (SPEC §6)
            self._wake(route, req.request_id)
            await self._requeue(store, req, 1.0, counts=False)
            return
        decision = self.pipeline.admit(route)
        if not isinstance(decision, Go) or decision.endpoint is None:
            await self._requeue(store, req, TICK_SECONDS * 4, counts=False)  # full, or no replica right now
            return
        req.deployment_id = route.deployment.id
        labels = self.pipeline.constants.of(route).labels["http"]
        self.metrics.async_wait.observe(self._labels(req), max(0.0, now - req.created_at))
        started = self.loop.time()
        info = None
        observer = self.pipeline.observer
        traced = None if observer is None else observer.wanted("")
        if traced is not None:  # a line per run in the access log, a span per traced run (issue 13)
            info = CallInfo(req.request_id, "", "", "POST", route.upstream_target, "async", route, traced=traced)
            info.bytes_in = len(req.body)
        record = self.pipeline.begin(labels, decision, started, info)
        error: GatewayError | None = None
        status = 0
        answer = None
        try:
            answer = await self.pipeline.caller.call(
                table, route.deployment, route.environment, "POST", route.upstream_target, req.body,
                timeout=MAX_RUN_SECONDS,  # no client waits on the line: a run may last an hour (SPEC §10)
                request_id=req.request_id, upstream=decision.endpoint.upstream, max_answer_bytes=MAX_RESULT_BYTES,
                extra=(info.trace_lines() or b"") if info is not None else b"",
            )  # fmt: skip
            status = answer.status
            if info is not None:
                info.bytes_out = len(answer.body)
        except GatewayError as exc:
            error = exc
        finally:
            record.end(str(status or (error.status if error else 0)), status, error)
            self.metrics.async_run.observe(self._labels(req), self.loop.time() - started)
        if error is not None or answer is None:
            await self._failed_attempt(store, req, 0, error.message if error else "no answer", retry=True)
            return
        if status == 429:
            self._back_off(req)
            await self._requeue(store, req, 0.0, counts=False)
            return
        if 200 <= status < 300:
            if answer.truncated:
                req.errors = [{"code": "MODEL_PREDICT_ERROR", "message": "result too large"}]
                await self._end(store, req, "FAILED")
                return
            req.result = answer.body
            req.errors = []
            await self._end(store, req, "SUCCEEDED")
            return
        message = answer.body[:512].decode("utf-8", "replace") or f"the model answered {status}"
        await self._failed_attempt(store, req, status, message, retry=retryable_status(status))

    async def _failed_attempt(self, store: Store, req: AsyncRequest, status: int, message: str, *,
                              retry: bool) -> None:  # fmt: skip
        code = error_code_of(status)
        req.errors = [{"code": code, "message": message}]
        retry_cfg = req.retry
        if retry and req.attempts < retry_cfg.max_attempts:
            delay = backoff_seconds(req.attempts, retry_cfg.initial_delay_ms, retry_cfg.max_delay_ms)
            await self._requeue(store, req, delay, counts=True)
            return
        await self._end(store, req, "FAILED")

    async def _requeue(self, store: Store, req: AsyncRequest, delay: float, *, counts: bool) -> None:
        """Back to QUEUED, to run after `delay`; `counts=False`: this was not an attempt."""
        now = time.time()
        if not counts:
            req.attempts -= 1
        req.set_status("QUEUED", now)
        req.next_at = now + delay
        await self._persist(store, req, release=True)
        key = target_of(req)
        self.pending.add(key)
        if delay <= 0:
            self.kick.set()
        else:  # due then: back in the pending set, and the scheduler woken (not only by the next scan)
            self.loop.call_later(delay, self._due, key)

    def _due(self, key: tuple[str, str, str, str]) -> None:
        self.pending.add(key)
        self.kick.set()

    def _back_off(self, req: AsyncRequest) -> None:
        key = target_of(req)
        _, last = self.backoff.get(key, (0.0, 0.0))
        delay = min(BACKOFF_429[1], last * 2 if last else BACKOFF_429[0])
        self.backoff[key] = (time.time() + delay, delay)

    def _wake(self, route: Route, request_id: str) -> None:
        key = (route.model.id, route.deployment.id)
        now = time.time()
        if now - self.woken.get(key, 0.0) >= WAKE_EVERY_SECONDS:
            self.woken[key] = now
            self.pipeline.wake_soon(route, request_id)

    async def _end(self, store: Store, req: AsyncRequest, status: str) -> None:
        """The run is over: write the outcome (durable), then deliver the webhook if there is one."""
        now = time.time()
        req.set_status(status, now)
        req.completed_at = now
        req.next_at = now
        key = target_of(req)
        if status == "SUCCEEDED":
            self.backoff.pop(key, None)
        has_webhook = req.webhook_endpoint is not None and req.webhook_status == "PENDING"
        await self._persist(store, req, release=not has_webhook)
        self.metrics.async_requests.inc(self._labels(req) + (status,))
        self.kick.set()  # a slot freed: the next queued request may go now
        if has_webhook:
            await self._deliver(store, req)

    # -- webhooks -------------------------------------------------------------------------------

    async def _deliver(self, store: Store, req: AsyncRequest) -> None:
        if req.status not in FINAL or req.webhook_endpoint is None:
            return
        if self.secret_error is not None:  # never send unsigned when signing was asked for
            req.next_at = time.time() + RENEW_SECONDS
            await self._persist(store, req, release=True)
            return
        data = None
        if req.status == "SUCCEEDED" and req.result is not None:
            try:
                data = json.loads(req.result)
            except ValueError:
                data = req.result.decode("utf-8", "replace")
        now = time.time()
        body = webhook.payload(req.request_id, req.model_id, req.deployment_id, data, req.errors, now)
        headers = webhook.signature_headers(body, req.request_id, int(now), self.secrets)
        delivery = await self.senders.deliver(req.webhook_endpoint, body, headers)
        self.metrics.webhooks.inc((req.model_id, req.region, delivery.outcome))
        req.webhook_attempts += 1
        retry = self.state.table.gateway.async_settings.webhook_retry
        now = time.time()
        if delivery.outcome == "delivered":
            req.webhook_status = "SUCCEEDED"
        elif delivery.outcome == "retry" and req.webhook_attempts < retry.max_attempts:
            req.next_at = now + backoff_seconds(req.webhook_attempts, retry.initial_delay_ms, retry.max_delay_ms)
            log.info("webhook of %s: %s; retry %d in %.1f s", req.request_id, delivery.message,
                     req.webhook_attempts, req.next_at - now)  # fmt: skip
        else:
            log.warning("webhook of %s failed for good: %s", req.request_id, delivery.message)
            req.webhook_status = "FAILED"
            req.set_status("WEBHOOK_FAILED", now)
            self.metrics.async_requests.inc(self._labels(req) + ("WEBHOOK_FAILED",))
        await self._persist(store, req, release=True)

    async def _persist(self, store: Store, req: AsyncRequest, *, release: bool) -> None:
        """Write a run's or a delivery's outcome; while the store is unreachable, again until it
        answers (the claim stays this process's meanwhile: nothing is lost, nothing run again here)."""
        delay = PERSIST_BACKOFF[0]
        while True:
            try:
                await store.save(req, release=release)
                return
            except StoreUnavailable:
                await asyncio.sleep(delay)
                delay = min(delay * 2, PERSIST_BACKOFF[1])


def target_of(req: AsyncRequest) -> tuple[str, str, str, str]:
    """The queue a request waits in: (region, model, environment, deployment; "" for an environment)."""
    return (req.region, req.model_id, req.environment, "" if req.environment else req.deployment_id)


@contextlib.asynccontextmanager
async def unavailable_as_503(region: str) -> AsyncIterator[None]:
    """A store that cannot be reached (or refuses) answers the API's call 503 `model_unavailable`, and
    nothing was written; the database's own error goes to the log, not to the caller."""
    try:
        yield
    except StoreError as exc:
        log.debug("async queue of region %s: %s", region, exc)
        raise ModelUnavailable(
            f"the async queue of region '{region}' is unavailable right now (its store cannot be reached); retry later",
            headers=(("retry-after", "1"),),
        ) from None
