"""Promotions (SPEC §6): wake, smoke check, ramp in 10 stages, pause/resume/cancel, automatic rollback.

A promotion is a record in the overlay (so it survives a restart) and, while it runs, one task
in the process that owns the admin listener (the control plane). Its states and their transitions
are the table in `promotion_states`; this module carries them out: the admin calls (promote,
pause, resume, cancel, force_cancel, force_roll_forward) and the task that waits out each stage,
watches the rollback rule and sends the next event. Every state change is a write through the
admin writer (validated, persisted, swapped), made under its lock on the record as it is then.
The ramp's split is sticky per caller (`Environment.candidate`, resolved like a canary).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from gateway.environments import sdk_views
from gateway.environments.changes import (
    deployment_users,
    env_change,
    latest_promotion,
    promotion_settings,
    read_json,
    running_promotion,
    set_status,
)
from gateway.environments.planecall import PlaneCaller
from gateway.environments.promote_body import (
    DEPLOYMENT_FIELDS,
    FIELDS,
    environment_settings_update,
    production_promote_body,
    promote_options,
    promotion_settings_update,
)
from gateway.environments.promotion_states import (
    STAGES,
    TERMINAL,
    WATCHED,
    Event,
    InvalidTransition,
    State,
    advance,
    describe,
    stage_seconds,
)
from gateway.environments.sdk_settings import settings_changes
from gateway.environments.traffic_rules import promotion_problems
from gateway.environments.views import environment_view, find_deployment, find_environment, find_model
from gateway.environments.writer import AdminWriter
from gateway.errors import ClientError, Conflict, GatewayError, InvalidChange, ModelNotFound
from gateway.http.server import Request
from gateway.metrics import Metrics
from gateway.routing.model import Deployment, Table
from gateway.stores.leases import FleetLeases, FleetPromotions

__all__ = ["STAGES", "STATES", "Promotions", "RollbackWindow", "promote_options", "stage_seconds"]

log = logging.getLogger("gateway.promotion")

WAKE_REPEAT_SECONDS = 30.0
SMOKE_TIMEOUT_SECONDS = 60.0
ROLLBACK_SAMPLE_SECONDS = 0.25
STATES = tuple(state.value for state in State)

Key = tuple[str, str]  # (model id, environment)
# The previous deployment's status after a promotion, by `promotion_cleanup_strategy` (KEEP: unchanged).
CLEANUP_STATUS = {"SCALE_TO_ZERO": "scaled_to_zero", "DEACTIVATE": "inactive"}


class PromotionFailed(Exception):
    """Ends a promotion as FAILED with this message (traffic returns to the previous deployment)."""


class PromotionEnded(Exception):
    """The promotion ended meanwhile (cancelled before any traffic moved, or its environment is gone)."""


class Promotions:
    """Runs the promotions of every environment; owned by the control plane (one per gateway).

    `clock`: wall-clock time for the records (they outlive the process); waits use the loop's clock.
    """

    def __init__(
        self,
        writer: AdminWriter,
        metrics: Metrics,
        request_counts: Callable[[], dict[tuple, float]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.writer = writer
        self.state = writer.state
        self.metrics = metrics
        self.request_counts = request_counts
        self.clock = clock
        self.tasks: dict[Key, asyncio.Task[None]] = {}
        self.kicks: dict[Key, asyncio.Event] = {}
        self.caller = PlaneCaller(metrics)
        self.fleet: FleetPromotions | None = None  # fleet mode: the promotions this gateway holds the lease of
        self._fleet_task: asyncio.Task[None] | None = None
        self.actions = {
            "promote": self.promote,
            "pause_promotion": self.pause,
            "resume_promotion": self.resume,
            "cancel_promotion": self.cancel,
            "force_cancel_promotion": self.force_cancel,
            "force_roll_forward_promotion": self.force_roll_forward,
            "deployments/promote": self.promote_deployment,  # api.PROMOTE_DEPLOYMENT
        }

    def __repr__(self) -> str:
        return f"<Promotions running={sorted('/'.join(key) for key in self.tasks)}>"

    def start(self) -> None:
        """Continue the promotions that were running when the gateway stopped."""
        if self.fleet is not None:  # the lease decides which gateway continues each (gateway.stores.leases)
            self._fleet_task = asyncio.get_running_loop().create_task(self.fleet.run(), name="promotion leases")
            self.state.on_swap.append(self._kick_all)  # another gateway's admin call (pause, cancel) was read
            return
        for model_id, changes in self.state.overlay.get("models", {}).items():
            for env in changes.get("environments", {}):
                promotion = running_promotion(self.state.overlay, model_id, env)
                if promotion is not None:
                    log.info("continuing the promotion of %s/%s (%s)", model_id, env, promotion["status"])
                    self._publish(model_id, env, promotion)
                    self._launch((model_id, env))

    async def close(self) -> None:
        if self._fleet_task is not None:
            self._fleet_task.cancel()
        for task in list(self.tasks.values()):
            task.cancel()
        for task in list(self.tasks.values()):
            try:
                await task
            except BaseException:  # noqa: BLE001 - cancelled or crashed; the record stays as persisted
                pass
        if self.fleet is not None:
            await self.fleet.close()
        self.caller.close()

    def use_fleet(self, leases: FleetLeases) -> None:
        """Fleet mode (SPEC §13): run a promotion only while holding its lease; count answers fleet-wide."""
        self.fleet = FleetPromotions(
            leases, lambda: self.state.overlay, self._launch, self._cancel_task, lambda: set(self.tasks),
            self._local_counts,
        )  # fmt: skip

    def _cancel_task(self, key: Key) -> None:
        task = self.tasks.get(key)
        if task is not None:
            task.cancel()

    # -- admin calls --------------------------------------------------------------------------

    async def promote(self, req: Request, model_id: str, env: str) -> tuple[int, object]:
        return await self.begin(model_id, env, await read_json(req, FIELDS))

    async def promote_deployment(self, req: Request, model_id: str, dep_id: str) -> tuple[int, object]:
        """`POST /v1/models/{id}/deployments/{dep}/promote` (and `development/promote`): the SDK's
        `PromoteRequest`, a promotion of the deployment into production."""
        body = await read_json(req, DEPLOYMENT_FIELDS)
        model = find_model(self.state.table, model_id)
        if dep_id == "development":
            if model.development is None:
                raise ModelNotFound(f"model '{model_id}' has no development deployment")
            dep_id = model.development.id
        return await self.begin(model_id, sdk_views.PRODUCTION, production_promote_body(body, dep_id))

    async def begin(self, model_id: str, env: str, body: dict[str, Any]) -> tuple[int, object]:
        """Start a promotion; the SDK's answer (issue 12): 200 with the promoted deployment, and in
        `previous_deployment` what its cleanup will do (the progress is read from the environment)."""
        settings = promotion_settings(self.state.overlay, model_id, env)
        update = environment_settings_update(body.get("environment_settings_update")) or {}
        if "promotion_settings" in update:  # this promotion already follows the settings it gives the environment
            settings = promotion_settings_update(settings, update["promotion_settings"])
        options = promote_options(body, settings)
        del options["environment_settings_update"]
        async with self.writer.lock:
            model = find_model(self.state.table, model_id)
            environment = find_environment(model, env)
            dep = find_deployment(model, options["deployment_id"])
            if running_promotion(self.state.overlay, model_id, env) is not None:
                raise Conflict(f"environment '{env}' already has a promotion in progress")
            if dep.status == "inactive":
                raise ClientError(f"deployment '{dep.id}' is inactive; activate it before promoting it")
            if environment.deployment is not None and environment.deployment.id == dep.id:
                raise ClientError(f"deployment '{dep.id}' already serves environment '{env}'")
            if environment.region is not None and dep.region != environment.region:
                raise ClientError(
                    f"deployment '{dep.id}' runs in region '{dep.region}', but environment '{env}' is pinned "
                    f"to region '{environment.region}': a regional environment never leaves its region"
                )
            problems = promotion_problems(self.state.table.models, model_id, env, dep)
            if problems:
                raise InvalidChange("a shadow rule would send a regional environment's traffic out of its region: "
                                    + problems[0], problems)  # fmt: skip
            on_success = None
            if update:
                on_success = {"set": settings_changes(update, environment.autoscaling),
                              "promotion_settings": settings if "promotion_settings" in update else None}  # fmt: skip
                await self.writer.check(lambda o: keep_settings(o, model_id, env, on_success))
            now = self.clock()
            record = {
                **options,
                "on_success": on_success,
                "status": State.RELEASING.value,
                "percent": 0,
                "previous_deployment_id": environment.deployment.id if environment.deployment else None,
                "error_message": None,
                "started_at": now,
                "updated_at": now,
                "stage_started_at": None,
                "paused_remaining": None,
            }
            table = await self._write(model_id, env, record, "promote")
            if self.fleet is None:
                self._launch((model_id, env))
            else:  # in a fleet, whichever gateway takes the lease first runs it
                self.fleet.wake()
        model = table.models[model_id]
        previous = record["previous_deployment_id"]
        cleanup = None
        if previous is not None:
            users = deployment_users(model, previous, self.state.overlay, leaving=env)
            cleanup = {"id": previous, "cleanup": "KEEP" if users else options["cleanup"], "still_used_by": users}
        return 200, {**sdk_views.deployment_view(model, model.deployments[dep.id]), "previous_deployment": cleanup}

    # The answers are the SDK's `SignalPromotionResponse` (`success`) and `CancelPromotionResponse`
    # (`status`, `message`), with the environment's keys beside them as SPEC §6 answered before (no clash).

    async def pause(self, req: Request, model_id: str, env: str) -> tuple[int, object]:
        return 200, {"success": True, **await self._control(req, model_id, env, Event.PAUSE, "pause")}

    async def resume(self, req: Request, model_id: str, env: str) -> tuple[int, object]:
        return 200, {"success": True, **await self._control(req, model_id, env, Event.RESUME, "resume")}

    async def cancel(self, req: Request, model_id: str, env: str) -> tuple[int, object]:
        """RAMPING_DOWN when traffic already moved (it walks back down), else CANCELED at once."""
        view = await self._control(req, model_id, env, Event.CANCEL, "cancel")
        status = view["in_progress_promotion"]["status"]
        message = "Promotion canceled" if status == State.CANCELED.value else "Promotion canceled; ramping down"
        return 200, {"status": status, "message": message, **view}

    async def force_cancel(self, req: Request, model_id: str, env: str) -> tuple[int, object]:
        return 200, {"success": True, **await self._control(req, model_id, env, Event.FORCE_CANCEL, "force-cancel")}

    async def force_roll_forward(self, req: Request, model_id: str, env: str) -> tuple[int, object]:
        view = await self._control(req, model_id, env, Event.FORCE_ROLL_FORWARD, "roll forward")
        return 200, {"success": True, **view}

    async def _control(self, req: Request, model_id: str, env: str, event: Event, what: str) -> dict[str, Any]:
        """Send an admin call's event to the running promotion; the environment as it is afterwards."""
        await read_json(req, set())
        async with self.writer.lock:
            model = find_model(self.state.table, model_id)
            find_environment(model, env)
            promotion = running_promotion(self.state.overlay, model_id, env)
            if promotion is None:
                raise Conflict(f"cannot {what} the promotion of environment '{env}': no promotion in progress")
            try:
                record = advance(promotion, event, self.clock())
            except InvalidTransition:
                raise Conflict(f"cannot {what} the promotion of environment '{env}': {promotion['status']}") from None
            if State(record["status"]) in TERMINAL:  # ended by this call: stop the task
                self._cancel_task((model_id, env))
            if record["status"] == State.SUCCEEDED.value:  # rolled forward: the candidate serves, as at 100 %
                await self._succeed((model_id, env), record)
            else:
                await self._write(model_id, env, record, what)
            table = self.state.table  # the snapshot this call swapped in
        self._kick((model_id, env))
        model = table.models[model_id]
        return environment_view(model, model.environments[env], self.state.overlay)

    # -- the running promotion ----------------------------------------------------------------

    def _launch(self, key: Key) -> None:
        task = asyncio.get_running_loop().create_task(self._run(key), name=f"promotion {key[0]}/{key[1]}")
        self.tasks[key] = task
        task.add_done_callback(lambda t: self._ended(key, t))

    def _ended(self, key: Key, task: asyncio.Task[None]) -> None:
        if self.tasks.get(key) is task:
            del self.tasks[key]
        if not task.cancelled() and task.exception() is not None:
            log.error("promotion %s/%s crashed", *key, exc_info=task.exception())

    def _kick_all(self, table: Table) -> None:
        """A swap in a fleet: wake the runners, and show the promotions another gateway advances."""
        for key in list(self.tasks):
            self._kick(key)
        for model_id, changes in self.state.overlay.get("models", {}).items():
            for env in changes.get("environments", {}):
                promotion = latest_promotion(self.state.overlay, model_id, env)
                if promotion is not None:
                    self._publish(model_id, env, promotion)

    def _kick(self, key: Key) -> None:
        event = self.kicks.get(key)
        if event is not None:
            event.set()

    def record(self, key: Key) -> dict[str, Any]:
        promotion = running_promotion(self.state.overlay, *key)
        if promotion is None:
            raise PromotionEnded
        return promotion

    async def _run(self, key: Key) -> None:
        self.kicks[key] = asyncio.Event()
        try:
            if State(self.record(key)["status"]) is State.RELEASING:
                await self._release(key)
                released = Event.RAMP if self.record(key).get("ramp_up_duration_seconds") else Event.SWITCH
                while (state := await self._step(key, State.RELEASING, released)) is State.RELEASING:
                    pass  # another gateway wrote meanwhile: send it again on the record as it is now
                if state in TERMINAL:
                    return
            record = self.record(key)
            window = RollbackWindow(record.get("rollback"))
            window.check(self._candidate_counts(key, record["deployment_id"]))  # the baseline
            while True:
                record = self.record(key)
                state = State(record["status"])
                if state is State.PAUSED:
                    await self._wait(key, None, window)
                    continue
                remaining = stage_seconds(record) - (self.clock() - record["stage_started_at"])
                if remaining > 0:
                    await self._wait(key, remaining, window)
                    continue
                if await self._step(key, state, Event.STAGE_ELAPSED) in TERMINAL:
                    return
        except (PromotionFailed, InvalidChange) as failure:  # InvalidChange: the table refused the switch
            log.warning("promotion of %s/%s failed: %s", *key, failure)
            try:
                await self._step(key, None, Event.FAIL, error_message=str(failure))
            except PromotionEnded:
                pass
        except PromotionEnded:
            pass
        finally:
            self.kicks.pop(key, None)

    async def _step(self, key: Key, expected: State | None, event: Event, **fields: Any) -> State:
        """Send `event` to the promotion as it is now and write the result; the state it is in afterwards.

        `expected`: the state the runner decided in; when an admin call changed it meanwhile (pause,
        cancel), nothing is sent and the runner decides again from the new state.
        """
        async with self.writer.lock:
            current = self.record(key)
            if expected is not None and current["status"] != expected.value:
                return State(current["status"])
            record = advance(current, event, self.clock())
            record.update(fields, updated_at=self.clock())
            try:
                if record["status"] == State.SUCCEEDED.value:
                    await self._succeed(key, record)
                else:
                    await self._write(key[0], key[1], record, describe(record))
            except Conflict:  # the store moved on (another gateway's change, now read): decide again
                return State(self.record(key)["status"])
        return State(record["status"])

    async def _wait(self, key: Key, seconds: float | None, window: RollbackWindow) -> None:
        """Sleep up to `seconds` (None: until kicked), checking the rollback rule while the candidate serves."""
        event = self.kicks[key]
        loop = asyncio.get_running_loop()
        end = None if seconds is None else loop.time() + seconds
        while not event.is_set():
            step = ROLLBACK_SAMPLE_SECONDS if window.enabled else None
            if end is not None:
                left = end - loop.time()
                if left <= 0:
                    break
                step = left if step is None else min(step, left)
            try:
                await asyncio.wait_for(event.wait(), step)
            except TimeoutError:
                pass
            record = self.record(key)
            if window.enabled and State(record["status"]) in WATCHED:
                reason = window.check(self._candidate_counts(key, record["deployment_id"]))
                if reason is not None:
                    raise PromotionFailed(reason)
        event.clear()

    def _candidate_counts(self, key: Key, dep_id: str) -> tuple[float, float]:
        """(calls answered, 5xx answers) of the candidate in this environment so far: fleet-wide in a fleet."""
        return self._local_counts(key, dep_id) if self.fleet is None else self.fleet.counts(key, dep_id)

    def _local_counts(self, key: Key, dep_id: str) -> tuple[float, float]:
        """(calls answered, 5xx answers) of the candidate in this environment by this gateway (every protocol)."""
        calls = errors = 0.0
        for labels, value in self.request_counts().items():
            if labels[0] == key[0] and labels[1] == key[1] and labels[2] == dep_id:
                calls += value
                if labels[-1].startswith("5"):
                    errors += value
        return calls, errors

    async def _release(self, key: Key) -> None:
        """Wake the candidate if it is scaled to zero and wait for it; then the smoke check."""
        record = self.record(key)
        loop = asyncio.get_running_loop()
        table = self.state.table
        deadline = loop.time() + table.gateway.hold_timeout_seconds
        woken_at: float | None = None
        while True:
            table = self.state.table
            model = table.models.get(key[0])
            dep = model.deployments.get(record["deployment_id"]) if model is not None else None
            if dep is None:
                raise PromotionFailed(f"candidate deployment '{record['deployment_id']}' no longer exists")
            if dep.status == "active":
                break
            if dep.status == "inactive":
                raise PromotionFailed(f"candidate deployment '{dep.id}' was deactivated")
            if loop.time() >= deadline:
                raise PromotionFailed(
                    f"candidate deployment '{dep.id}' did not become active within "
                    f"{table.gateway.hold_timeout_seconds:g}s of being woken"
                )
            if woken_at is None or loop.time() - woken_at >= WAKE_REPEAT_SECONDS:
                woken_at = loop.time()
                self._spawn_wake(table, dep, key[1])
            await self._wait_for_swap(min(1.0, max(0.0, deadline - loop.time())))
        smoke = record.get("smoke_check")
        if smoke:
            await self._smoke(table, dep, key[1], smoke)

    async def _wait_for_swap(self, seconds: float) -> None:
        swapped = asyncio.Event()
        callback = lambda table: swapped.set()  # noqa: E731
        self.state.on_swap.append(callback)
        try:
            await asyncio.wait_for(swapped.wait(), seconds)
        except TimeoutError:
            pass
        finally:
            self.state.on_swap.remove(callback)

    def _spawn_wake(self, table: Table, dep: Deployment, env: str) -> None:
        async def wake() -> None:
            try:
                answer = await self.caller.call(table, dep, env, "POST", "/wake", to_plane=True,
                                                timeout=dep.timeouts.connect_seconds + 10)  # fmt: skip
                log.info("wake of %s/%s for a promotion answered %d", dep.model_id, dep.id, answer.status)
            except GatewayError as error:
                log.warning("wake of %s/%s for a promotion failed: %s", dep.model_id, dep.id, error.message)

        asyncio.get_running_loop().create_task(wake())

    async def _smoke(self, table: Table, dep: Deployment, env: str, smoke: dict[str, Any]) -> None:
        body = smoke.get("body")
        data = b"" if body is None else body.encode() if isinstance(body, str) else json.dumps(body).encode()
        what = f"smoke check POST {smoke['path']}"
        try:
            answer = await self.caller.call(
                table, dep, env, "POST", smoke["path"], data,
                timeout=min(SMOKE_TIMEOUT_SECONDS, dep.timeouts.total_seconds),
            )  # fmt: skip
        except GatewayError as error:
            raise PromotionFailed(f"{what} to candidate '{dep.id}' failed: {error.message}") from None
        expected = smoke.get("expected_status", 200)
        if answer.status != expected:
            excerpt = answer.body[:200].decode("utf-8", "replace")
            raise PromotionFailed(
                f"{what} to candidate '{dep.id}' answered {answer.status}, expected {expected}: {excerpt}"
            )
        log.info("%s to candidate %s/%s passed (%d)", what, dep.model_id, dep.id, answer.status)

    async def _succeed(self, key: Key, record: dict[str, Any]) -> None:
        """The candidate becomes the environment's deployment; the previous one is demoted if unused.

        The caller holds the writer's lock; `record` is the SUCCEEDED record to write.
        """
        model_id, env = key
        candidate, previous = record["deployment_id"], record.get("previous_deployment_id")
        model = self.state.table.models.get(model_id)
        if model is None:
            raise PromotionFailed(f"model '{model_id}' is no longer in the routing table")
        demote: str | None = None
        demoted_status = CLEANUP_STATUS.get(record.get("cleanup", "SCALE_TO_ZERO"))  # None: KEEP
        if demoted_status is not None and previous is not None and previous != candidate:
            # Only when nothing else uses it: another environment, a canary, a shadow, a promotion;
            # and only an active one (an operator's deactivation is not undone by a scale to zero).
            users = deployment_users(model, previous, self.state.overlay, leaving=env)
            if users:
                log.info("previous deployment %s/%s still serves %s: not demoted", model_id, previous, users)
            elif previous in model.deployments and model.deployments[previous].status == "active":
                demote = previous

        def mutate(overlay: dict[str, Any]) -> None:
            keep_settings(overlay, model_id, env, record.get("on_success"))
            change = env_change(overlay, model_id, env)
            change["set"]["deployment"] = candidate
            change["promotion"] = record
            if demote is not None and demoted_status is not None:
                set_status(overlay, model_id, demote, demoted_status)

        await self.writer.change(f"promotion of {model_id}/{env} succeeded", mutate)
        self._publish(model_id, env, record)
        log.info("promotion of %s/%s succeeded: %s serves 100%%", model_id, env, candidate)

    async def _write(self, model_id: str, env: str, record: dict[str, Any], what: str) -> Table:
        """Persist and serve a promotion record (the caller holds the writer's lock)."""

        def mutate(overlay: dict[str, Any]) -> None:
            env_change(overlay, model_id, env)["promotion"] = record

        table = await self.writer.change(f"promotion of {model_id}/{env}: {what}", mutate)
        self._publish(model_id, env, record)
        return table

    def _publish(self, model_id: str, env: str, record: dict[str, Any]) -> None:
        self.metrics.promotion.set((model_id, env, record["deployment_id"]), record["percent"])
        for state in STATES:
            self.metrics.promotion_state.set((model_id, env, state), 1 if record["status"] == state else 0)


def keep_settings(overlay: dict[str, Any], model_id: str, env: str, on_success: dict[str, Any] | None) -> None:
    """The environment takes the settings its promotion's `environment_settings_update` gave (issue 12)."""
    if not on_success:
        return
    change = env_change(overlay, model_id, env)
    change["set"].update(on_success["set"])
    if on_success.get("promotion_settings") is not None:
        change["promotion_settings"] = on_success["promotion_settings"]


class RollbackWindow:
    """The candidate's 5xx share over a sliding window, from cumulative request counts."""

    def __init__(self, rule: dict[str, Any] | None) -> None:
        self.rule = rule
        self.enabled = rule is not None
        self.samples: collections.deque[tuple[float, float, float]] = collections.deque()

    def check(self, counts: tuple[float, float], now: float | None = None) -> str | None:
        """A failure message when the rule is broken, else None."""
        if self.rule is None:
            return None
        now = time.monotonic() if now is None else now
        calls, errors = counts
        self.samples.append((now, calls, errors))
        window = float(self.rule["window_seconds"])
        while len(self.samples) > 1 and self.samples[1][0] <= now - window:
            self.samples.popleft()  # keep one sample at or before the window's start as the baseline
        _, base_calls, base_errors = self.samples[0]
        delta_calls, delta_errors = calls - base_calls, errors - base_errors
        if delta_calls < self.rule.get("min_calls", 10) or delta_calls <= 0:
            return None
        share = 100.0 * delta_errors / delta_calls
        if share > float(self.rule["max_5xx_percent"]):
            return (
                f"automatic rollback: the candidate answered {share:.1f}% 5xx over the last {window:g}s "
                f"({int(delta_errors)} of {int(delta_calls)} calls), above the limit of {self.rule['max_5xx_percent']}%"
            )
        return None
