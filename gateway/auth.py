"""API key authentication (SPEC §5): keys are known only by their SHA-256 digest."""

from __future__ import annotations

import hashlib
import hmac

from gateway.errors import Unauthorized
from gateway.routing.model import ApiKey, Table

SCHEMES = ("api-key", "bearer")


def presented_key(authorization: str | None) -> str:
    """The key in `Authorization: Api-Key <key>` / `Bearer <key>`; 401 otherwise."""
    if not authorization:
        raise Unauthorized("missing API key: send 'Authorization: Api-Key <key>'")
    scheme, _, key = authorization.strip().partition(" ")
    key = key.strip()
    if scheme.lower() not in SCHEMES or not key:
        # Never echo the header back: it may be a key sent with a typo in the scheme.
        raise Unauthorized("malformed Authorization header: expected 'Api-Key <key>' or 'Bearer <key>'")
    return key


def authenticate(table: Table, authorization: str | None) -> ApiKey:
    """The table's key for this header, or 401.

    The lookup is by the digest of the presented key, which a caller cannot steer
    byte by byte, and the final comparison is constant-time (hmac.compare_digest).
    """
    digest = hashlib.sha256(presented_key(authorization).encode("utf-8", "surrogateescape")).digest()
    key = table.api_keys.get(digest)
    if key is None or not hmac.compare_digest(key.sha256, digest):
        raise Unauthorized("invalid API key")
    return key
