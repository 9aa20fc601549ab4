"""The one boundary to psycopg: connections, and its exceptions translated (STYLE: one per dependency)."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import psycopg

from gateway.environments.store import StoreError

CONNECT_TIMEOUT = 2  # seconds: a gateway that lost the database learns it quickly and keeps serving
CHANNEL = "gateway_admin"  # NOTIFY channel of overlay writes (payload: the new revision)


class StoreUnavailable(StoreError):
    """The database could not be reached (the gateway keeps serving what it has)."""


def connect(url: str, *, autocommit: bool = False) -> psycopg.Connection:
    try:
        return psycopg.connect(url, autocommit=autocommit, connect_timeout=CONNECT_TIMEOUT)
    except psycopg.Error as exc:
        raise StoreUnavailable(f"cannot reach the store {redact(url)}: {one_line(exc)}") from None


def redact(url: str) -> str:
    """The URL without its password, for logs and `/v1/routing`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
