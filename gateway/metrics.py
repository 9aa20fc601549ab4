"""A small Prometheus registry for the hot path: dict-of-tuples counters, fixed buckets.

prometheus_client's label lookups and locks cost more per request than the proxying
itself at these rates; this keeps one dict update per observation and renders the
text exposition format (version 0.0.4) on scrape.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable, Iterable

from gateway import process

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple, extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class Counter:
    kind = "counter"

    def __init__(self, name: str, help: str, labels: tuple[str, ...]) -> None:
        self.name, self.help, self.label_names = name, help, labels
        self.values: dict[tuple, float] = {}

    def inc(self, labels: tuple, amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def get(self, labels: tuple) -> float:
        return self.values.get(labels, 0.0)

    def samples(self) -> Iterable[str]:
        for labels, value in self.values.items():
            yield f"{self.name}{_labels(self.label_names, labels)} {value:g}"


class Gauge(Counter):
    kind = "gauge"

    def set(self, labels: tuple, value: float) -> None:
        self.values[labels] = value

    def dec(self, labels: tuple, amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) - amount


class Histogram:
    kind = "histogram"

    def __init__(self, name: str, help: str, labels: tuple[str, ...], buckets=LATENCY_BUCKETS) -> None:
        self.name, self.help, self.label_names = name, help, labels
        self.buckets = tuple(buckets)
        self.values: dict[tuple, list] = {}  # labels -> [per-bucket counts..., +Inf count, sum]

    def observe(self, labels: tuple, value: float) -> None:
        row = self.values.get(labels)
        if row is None:
            row = self.values[labels] = [0] * (len(self.buckets) + 1) + [0.0]
        row[bisect.bisect_left(self.buckets, value)] += 1
        row[-1] += value

    def samples(self) -> Iterable[str]:
        for labels, row in self.values.items():
            cumulative = 0
            for bound, count in zip(self.buckets + (float("inf"),), row):
                cumulative += count
                le = 'le="+Inf"' if bound == float("inf") else f'le="{bound:g}"'
                yield f"{self.name}_bucket{_labels(self.label_names, labels, le)} {cumulative}"
            yield f"{self.name}_sum{_labels(self.label_names, labels)} {row[-1]:.6f}"
            yield f"{self.name}_count{_labels(self.label_names, labels)} {cumulative}"


ASYNC_BUCKETS = LATENCY_BUCKETS + (900.0, 1800.0, 3600.0, 21600.0, 86400.0)

ROUTE = ("model", "environment", "deployment", "region", "protocol")


class Metrics:
    """The gateway's metrics (SPEC §12 names)."""

    def __init__(self) -> None:
        self.requests = Counter(
            "gateway_requests_total", "Calls answered, by route and status code.", ROUTE + ("code",)
        )
        self.duration = Histogram(
            "gateway_request_duration_seconds", "Time from request head to end of response.", ROUTE
        )
        self.inflight = Gauge("gateway_inflight_requests", "Calls being answered now.", ROUTE)
        self.upstream_errors = Counter(
            "gateway_upstream_errors_total", "Failed calls to planes, by kind.", ROUTE + ("kind",)
        )
        self.shadow = Counter("gateway_shadow_requests_total", "Shadow copies by outcome.", ROUTE + ("outcome",))
        self.held = Gauge("gateway_held_requests", "Calls held for a scaled-to-zero deployment.", ROUTE)
        self.reloads = Counter("gateway_table_reloads_total", "Routing table loads by result.", ("result",))
        self.promotion = Gauge(
            "gateway_promotion_traffic_percent", "Traffic share of a promotion's candidate.", ROUTE[:3]
        )
        self.promotion_state = Gauge(
            "gateway_promotion_state",
            "A promotion's state: 1 for the state it is in, 0 for the others.",
            ("model", "environment", "state"),
        )
        self.table_info = Gauge("gateway_table_info", "The serving routing table.", ("digest", "generation"))
        self.all: tuple[Counter | Histogram, ...] = (
            self.requests, self.duration, self.inflight, self.upstream_errors, self.shadow, self.held,
            self.reloads, self.promotion, self.promotion_state, self.table_info,
        )  # fmt: skip
        # DNS of plane hosts (SPEC §8, issue 5)
        self.dns_lookups = Counter(
            "gateway_dns_lookups_total",
            "DNS lookups of plane hosts by result (ok, not_found, failed); stale_served: stale answers used.",
            ("result",),
        )
        self.dns_region_violations = Counter(
            "gateway_dns_region_violations_total",
            "Resolved plane addresses refused for lying outside their region's networks.",
            ("region", "host"),
        )
        self.all += (self.dns_lookups, self.dns_region_violations)
        # Which side of an environment's split took a call sent to a plane (SPEC §6 canary, promotion)
        self.split = Counter(
            "gateway_split_requests_total",
            "Calls of an environment sent to a plane, by the side of its split (primary, canary, candidate).",
            ("model", "environment", "deployment", "side"),
        )
        self.all += (self.split,)
        # Active health checks of replicas (issue 5, table key `health_check`)
        self.health_checks = Counter(
            "gateway_health_checks_total",
            "Active health checks of replicas by result (healthy, bad_status, timeout, connection_error, no_address).",
            ("model", "deployment", "result"),
        )
        self.all += (self.health_checks,)
        # Async inference (SPEC §10, §12)
        target = ("model", "environment", "deployment", "region")
        self.async_depth = Gauge(
            "gateway_async_queue_depth", "Async requests queued, by target and priority.", target + ("priority",)
        )
        self.async_wait = Histogram(
            "gateway_async_wait_seconds", "Time async requests waited in the queue before a run started.", target,
            buckets=ASYNC_BUCKETS,
        )  # fmt: skip
        self.async_run = Histogram(
            "gateway_async_run_seconds", "Time of async runs (one attempt) on the plane.", target, buckets=ASYNC_BUCKETS
        )
        self.async_requests = Counter(
            "gateway_async_requests_total", "Async requests by the status they ended in (or were accepted).",
            target + ("status",),
        )  # fmt: skip
        self.webhooks = Counter(
            "gateway_webhook_deliveries_total", "Webhook deliveries by outcome (delivered, retry, gone, refused).",
            ("model", "region", "outcome"),
        )  # fmt: skip
        self.all += (self.async_depth, self.async_wait, self.async_run, self.async_requests, self.webhooks)
        # Rate limits per API key and per team (SPEC §12 rate_limit): labelled by the key's name, never the key
        self.rate_limited = Counter(
            "gateway_rate_limited_total",
            "Calls refused by a rate_limit, by limit (key, team), the key's or team's name, and kind (rate, concurrency).",
            ("limit", "name", "kind"),
        )
        # Fleet mode: this process's part (0..1) of each fleet-wide rate_limit it counts (0: refusing, store stale)
        self.rate_limit_share = Gauge(
            "gateway_rate_limit_fleet_share",
            "This gateway's share of a fleet-wide rate_limit (with a database store), by limit and name.",
            ("limit", "name"),
        )
        self.all += (self.rate_limited, self.rate_limit_share)
        # process_* (read from /proc at scrape time): (worker label or "", pid) of each process shown
        self.processes: Callable[[], Iterable[tuple[str, int]]] = lambda: [("", os.getpid())]
        # The access log (issue 13): lines dropped because the writer fell behind (a call never waits for it)
        self.access_log_dropped = Counter(
            "gateway_access_log_dropped_total", "Access log lines dropped: the buffer was full or a write failed.", ()
        )
        self.all += (self.access_log_dropped,)
        # Fleet mode (SPEC §13, issue 14): the shared store in PostgreSQL
        self.store_up = Gauge(
            "gateway_store_up", "1 while the fleet store (PostgreSQL) answers, 0 while it does not.", ()
        )
        self.store_errors = Counter(
            "gateway_store_errors_total", "Failed reads and writes of the fleet store (PostgreSQL).", ()
        )
        self.all += (self.store_up, self.store_errors)

    def render(self) -> bytes:
        lines: list[str] = []
        for metric in self.all:
            lines.append(f"# HELP {metric.name} {metric.help}")
            lines.append(f"# TYPE {metric.name} {metric.kind}")
            lines.extend(metric.samples())
        lines.extend(process.render(self.processes()))
        return ("\n".join(lines) + "\n").encode()


def snapshot(metrics: Metrics) -> dict:
    """Every metric's values, as JSON-able data (a worker publishes this for its supervisor)."""
    return {m.name: [[list(labels), value] for labels, value in m.values.items()] for m in metrics.all}


def merge(into: Metrics, snapshots: list[dict], *, gauges: bool = True) -> None:
    """Add workers' snapshots into `into`: counters and histograms sum; gauges sum when `gauges`."""
    by_name = {m.name: m for m in into.all}
    for snap in snapshots:
        for name, rows in snap.items():
            metric = by_name.get(name)
            if metric is None or (isinstance(metric, Gauge) and not gauges):
                continue
            for labels, value in rows:
                key = tuple(labels)
                if isinstance(metric, Histogram):
                    row = metric.values.setdefault(key, [0] * (len(metric.buckets) + 1) + [0.0])
                    for i, v in enumerate(value):
                        row[i] += v
                else:
                    metric.values[key] = metric.values.get(key, 0.0) + value
