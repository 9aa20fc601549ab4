"""An async request (SPEC §10): the submit body's rules, the stored record, and its pure rules.

Nothing here does I/O: `parse_submit` turns a body into a `Submit` or raises a `ClientError`
naming the field; `AsyncRequest` is what the store keeps; `backoff_seconds`, `retryable_status`
and `view` are the decisions and shapes the service and the API share.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from gateway.errors import ClientError, PayloadTooLarge

MAX_SUBMIT_BYTES = 256 * 1024
MAX_RESULT_BYTES = 10 * 1024 * 1024
MAX_RUN_SECONDS = 3600.0

STATUSES = ("QUEUED", "IN_PROGRESS", "SUCCEEDED", "FAILED", "EXPIRED", "CANCELED", "WEBHOOK_FAILED")
FINAL = frozenset({"SUCCEEDED", "FAILED", "EXPIRED", "CANCELED", "WEBHOOK_FAILED"})
WEBHOOK_STATUSES = ("PENDING", "SUCCEEDED", "FAILED", "CANCELED", "NO_WEBHOOK_PROVIDED")

FIELDS = frozenset(
    {"model_input", "webhook_endpoint", "priority", "max_time_in_queue_seconds", "inference_retry_config"}
)
RETRY_FIELDS = {"max_attempts": (1, 10, 3), "initial_delay_ms": (0, 10_000, 1000), "max_delay_ms": (0, 60_000, 5000)}
RETRY_STATUSES = frozenset({500, 502, 503, 504})


class Retry(NamedTuple):
    max_attempts: int = 3
    initial_delay_ms: int = 1000
    max_delay_ms: int = 5000


class Submit(NamedTuple):
    """A valid submit body."""

    model_input: bytes  # the JSON of `model_input`: the plane's predict body
    webhook_endpoint: str | None
    priority: int
    max_time_in_queue_seconds: int
    retry: Retry


def parse_submit(body: bytes, webhook_problem: Any) -> Submit:
    """The submit body's fields (SPEC §10), or 400 `client_error` naming the field (413 past 256 KiB).
    `webhook_problem(url) -> str | None` judges the webhook URL (`webhook.url_problem`)."""
    if len(body) > MAX_SUBMIT_BYTES:
        raise PayloadTooLarge(f"an async request body may be at most 256 KiB ({MAX_SUBMIT_BYTES} bytes)")
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ClientError("the async request body must be a JSON object") from None
    if not isinstance(doc, dict):
        raise ClientError("the async request body must be a JSON object")
    unknown = sorted(set(doc) - FIELDS)
    if unknown:
        raise ClientError(f"unknown field '{unknown[0][:64]}' in the async request body")
    if "model_input" not in doc:
        raise ClientError("field 'model_input' is required")
    webhook = doc.get("webhook_endpoint")
    if webhook is not None:
        if not isinstance(webhook, str):
            raise ClientError("field 'webhook_endpoint' must be a string URL")
        problem = webhook_problem(webhook)
        if problem:
            raise ClientError(f"field 'webhook_endpoint': {problem}")
    priority = _integer(doc, "priority", 0, 2, 0)
    max_queue = _integer(doc, "max_time_in_queue_seconds", 10, 259_200, 600)
    config = doc.get("inference_retry_config")
    if config is None:
        retry = Retry()
    else:
        if not isinstance(config, dict):
            raise ClientError("field 'inference_retry_config' must be an object")
        unknown = sorted(set(config) - set(RETRY_FIELDS))
        if unknown:
            raise ClientError(f"unknown field 'inference_retry_config.{unknown[0][:64]}'")
        retry = Retry(*(
            _integer(config, name, low, high, default, prefix="inference_retry_config.")
            for name, (low, high, default) in RETRY_FIELDS.items()
        ))  # fmt: skip
    model_input = json.dumps(doc["model_input"], separators=(",", ":"), ensure_ascii=False).encode()
    return Submit(model_input, webhook, priority, max_queue, retry)


def _integer(doc: dict, name: str, low: int, high: int, default: int, prefix: str = "") -> int:
    value = doc.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ClientError(f"field '{prefix}{name}' must be an integer from {low} to {high}")
    if not low <= value <= high:
        raise ClientError(f"field '{prefix}{name}' must be an integer from {low} to {high}")
    return value


@dataclass(slots=True)
class AsyncRequest:
    """One stored request: everything needed to run it again after a restart (SPEC §10)."""

    request_id: str
    team: str
    region: str  # whose store keeps it (residency at rest)
    model_id: str
    kind: str  # "model" | "chain"
    environment: str  # "" for a deployment target
    deployment_id: str  # chosen at submit; the environment's deployment at run time runs it
    caller: str  # routing key or API key name: the same canary side at run time
    priority: int
    max_time_in_queue_seconds: int
    retry: Retry
    webhook_endpoint: str | None
    body: bytes  # model_input as JSON
    created_at: float  # unix seconds
    status: str = "QUEUED"
    webhook_status: str = "PENDING"
    status_at: float = 0.0
    attempts: int = 0  # runs started
    next_at: float = 0.0  # unix seconds: the next run (retry back-off) or webhook delivery
    errors: list[dict] = field(default_factory=list)
    result: bytes | None = None
    webhook_attempts: int = 0
    completed_at: float | None = None  # when the run ended (results are kept result_ttl after it)
    seq: int = 0  # FIFO order within a priority (the store's insertion order)

    def __post_init__(self) -> None:
        if not self.status_at:
            self.status_at = self.created_at
        if self.webhook_endpoint is None and self.webhook_status == "PENDING":
            self.webhook_status = "NO_WEBHOOK_PROVIDED"

    @property
    def deadline(self) -> float:
        """Past this (unix seconds) a request still queued ends EXPIRED."""
        return self.created_at + self.max_time_in_queue_seconds

    def set_status(self, status: str, now: float) -> None:
        self.status = status
        self.status_at = now


def backoff_seconds(attempt: int, initial_ms: int, max_ms: int) -> float:
    """The wait after failed attempt number `attempt` (1-based): `initial` doubling, capped at `max`
    (runs' `inference_retry_config` and webhook deliveries' `webhook_retry` alike)."""
    if attempt < 1:
        raise ValueError(f"attempt is 1-based, got {attempt}")
    return min(initial_ms * 2 ** min(attempt - 1, 64), max_ms) / 1000


def retryable_status(status: int) -> bool:
    """A plane answer that is retried (SPEC §10); 429 backs the queue off and is retried too."""
    return status in RETRY_STATUSES or status == 429


def error_code_of(status: int) -> str:
    """The §10 error code of a failed run's last plane answer (0: no answer)."""
    if status == 0:
        return "MODEL_UNAVAILABLE"
    if status == 504:
        return "MODEL_PREDICT_TIMEOUT"
    if status in (400, 413, 415, 422):
        return "MODEL_INVALID_INPUT"
    if status == 404:
        return "MODEL_DOES_NOT_EXIST"
    if status in (502, 503):
        return "MODEL_UNAVAILABLE"
    return "MODEL_PREDICT_ERROR"


def iso(when: float | None) -> str | None:
    if when is None:
        return None
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def view(req: AsyncRequest) -> dict:
    """`GET /async_request/<id>` (SPEC §10, Baseten's field names)."""
    id_field = "chain_id" if req.kind == "chain" else "model_id"
    return {
        "request_id": req.request_id,
        id_field: req.model_id,
        "deployment_id": req.deployment_id,
        "status": req.status,
        "webhook_status": req.webhook_status,
        "created_at": iso(req.created_at),
        "status_at": iso(req.status_at),
        "errors": req.errors,
    }
