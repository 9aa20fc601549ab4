"""The observer a data plane runs with, from its serve options (issue 13)."""

from __future__ import annotations

import asyncio
import importlib.util
import os
from typing import Any

from gateway.metrics import Metrics
from gateway.obs.accesslog import FORMATS, AccessLog
from gateway.obs.observer import Observer


def check_observing(opts: Any) -> None:
    """The flags' errors (ValueError), before anything binds (`runner.check_options`)."""
    if opts.access_log_format not in FORMATS:
        raise ValueError(f"--access-log-format must be one of {', '.join(FORMATS)}, not {opts.access_log_format!r}")
    if not 0.0 <= opts.otel_sample_ratio <= 1.0:
        raise ValueError(f"--otel-sample-ratio must be between 0 and 1, not {opts.otel_sample_ratio:g}")
    path = opts.access_log
    if path is not None and path != "-":
        try:  # created now (it would be at start): a path that cannot be written is a usage error
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
        except OSError as error:
            raise ValueError(f"--access-log {path}: {error.strerror}") from None
    if opts.otel and importlib.util.find_spec("opentelemetry.sdk") is None:
        raise ValueError("--otel needs the otel extra: pip install 'regional-inference-gateway[otel]'")


def observer(opts: Any, metrics: Metrics, span_exporter: Any = None) -> Observer | None:
    """None when neither the access log nor tracing is on: adapters then build no `CallInfo`."""
    if opts.access_log is None and not opts.otel:
        return None
    log = None
    if opts.access_log is not None:
        log = AccessLog(
            opts.access_log, opts.access_log_format, metrics.access_log_dropped, loop=asyncio.get_running_loop()
        )
    tracing = None
    if opts.otel:
        from gateway.obs.tracing import Tracing  # the SDK is imported only when tracing is on

        tracing = Tracing(opts.otel_sample_ratio, span_exporter)
    return Observer(log, tracing)
