"""Admission (SPEC §6 backpressure), pure: may a call go to its deployment now, wait, or be refused?

The same rule for every protocol: HTTP, WebSocket and gRPC calls all count towards a deployment's
in-flight calls, and all wait or are refused by the environment's `backpressure.policy`.
"""

from __future__ import annotations

from typing import Literal

from gateway.routing.model import Environment

Admission = Literal["go", "queue", "reject"]

RETRY_AFTER_NOT_READY = "30"  # a held call timed out waiting for a scaled-to-zero deployment
RETRY_AFTER_FULL = "5"  # a held call timed out waiting for a slot, or the hold bound was reached
RETRY_AFTER_REJECT = "1"  # REJECT_ON_FULL


def concurrency_limit(env: Environment | None, replicas: int) -> int | None:
    """Calls a deployment of `replicas` replicas may have in flight for `env` before backpressure
    applies (SPEC §6: `concurrency_target` x replicas); None = no limit.

    `replicas` is the live count, `EndpointSet.replica_count()`: listed endpoints, discovered SRV
    targets, else the deployment's `replicas` field (see `gateway.upstream.balance.replica_count`).
    """
    if env is None or env.autoscaling.concurrency_target is None:
        return None
    return env.autoscaling.concurrency_target * replicas


def admission(in_flight: int, limit: int | None, waiting: int, policy: str) -> Admission:
    """What to do with a call: go now, queue (hold) it, or reject it with 429.

    A call goes when the deployment has room and no earlier call is waiting for a slot (a new
    call never overtakes a queued one).
    """
    if limit is None or (in_flight < limit and waiting == 0):
        return "go"
    return "reject" if policy == "REJECT_ON_FULL" else "queue"
