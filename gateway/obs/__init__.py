"""Sinks of the call pipeline's records (issue 13): the access log and OpenTelemetry tracing."""
