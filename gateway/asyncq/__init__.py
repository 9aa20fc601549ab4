"""Async inference (SPEC §10): the durable queue, its worker, and webhooks."""
