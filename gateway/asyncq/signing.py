"""Webhook bodies and signatures (SPEC §10 "Results and webhooks", §12 `async.webhook_secrets`): pure.

Two schemes sign every delivery, one entry per active secret so a receiver keeps verifying while
an operator rotates secrets (both old and new are listed in the table for a while):

- Baseten: `x-baseten-signature: v1=<hex>,v1=<hex>`, hex HMAC-SHA256 of the raw body, keyed by the
  secret's bytes as given.
- Standard Webhooks (https://www.standardwebhooks.com/, "Signature scheme"): `webhook-id`,
  `webhook-timestamp` (unix seconds) and `webhook-signature: v1,<b64> v1,<b64>`, base64 HMAC-SHA256
  of `<id>.<timestamp>.<body>`. A secret written `whsec_<base64>` is keyed by the decoded bytes after
  the prefix (that scheme's convention); any other secret by its bytes.

The verifiers are for tests and the demo receiver; they compare in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from gateway.asyncq.request import iso

STANDARD_PREFIX = b"whsec_"
EVENT_TYPE = "async_request_completed"


# -- secrets ----------------------------------------------------------------------------------------


def load_secrets(specs: Iterable[Mapping[str, object]], environ: Mapping[str, str] | None = None) -> tuple[bytes, ...]:
    """The raw bytes of every listed secret, in order (§12: `{name, secret_env}` or `{name, secret_file}`).

    A file's content loses its trailing newline (`echo s > file` is how secrets get written). A missing
    variable or file, an empty secret, or a `whsec_` secret that is not base64 after the prefix raises
    ValueError naming the secret, so a table that cannot sign is refused at load, not at delivery.
    """
    env = os.environ if environ is None else environ
    return tuple(_load_one(spec, env) for spec in specs)


def _load_one(spec: Mapping[str, object], env: Mapping[str, str]) -> bytes:
    name, var, path = spec.get("name"), spec.get("secret_env"), spec.get("secret_file")
    if not isinstance(name, str) or not name:
        raise ValueError(f"a webhook secret needs a name: {sorted(spec)}")
    if (var is None) == (path is None):
        raise ValueError(f"webhook secret {name!r}: give exactly one of secret_env and secret_file")
    if var is not None:
        value = env.get(str(var))
        if value is None:
            raise ValueError(f"webhook secret {name!r}: environment variable {var!r} is not set")
        secret = value.encode()
    else:
        try:
            secret = Path(str(path)).read_bytes().rstrip(b"\r\n")
        except OSError as error:
            raise ValueError(f"webhook secret {name!r}: cannot read {path!r}: {error.strerror or error}") from None
    if not secret:
        raise ValueError(f"webhook secret {name!r} is empty")
    try:
        standard_key(secret)
    except ValueError:
        raise ValueError(f"webhook secret {name!r} starts with 'whsec_' but is not base64 after it") from None
    return secret


def standard_key(secret: bytes) -> bytes:
    """The Standard Webhooks HMAC key of `secret`: base64-decoded after `whsec_`, else the bytes as given."""
    if not secret.startswith(STANDARD_PREFIX):
        return secret
    rest = secret[len(STANDARD_PREFIX) :]
    try:
        key = base64.b64decode(rest + b"=" * (-len(rest) % 4), validate=True)  # unpadded secrets exist
    except binascii.Error as error:
        raise ValueError(f"not base64: {error}") from None
    if not key:
        raise ValueError("no key after 'whsec_'")
    return key


# -- the body ----------------------------------------------------------------------------------------


def payload(request_id: str, model_id: str, deployment_id: str, data: object, errors: list[dict], when: float) -> bytes:
    """The webhook body (SPEC §10); `when` in unix seconds, written as ISO-8601 UTC with microseconds."""
    stamp = iso(when)
    doc = {
        "request_id": request_id,
        "model_id": model_id,
        "deployment_id": deployment_id,
        "type": EVENT_TYPE,
        "time": stamp,
        "data": data,
        "errors": errors,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


# -- signing -----------------------------------------------------------------------------------------


def signature_headers(body: bytes, request_id: str, timestamp: int, secrets: Sequence[bytes]) -> list[tuple[str, str]]:
    """The identity and signature headers of one delivery; no signature headers when there is no secret."""
    if not secrets:
        return [("x-baseten-request-id", request_id), ("webhook-id", request_id), ("webhook-timestamp", str(timestamp))]
    baseten = ",".join(f"v1={baseten_signature(body, secret)}" for secret in secrets)
    standard = " ".join(f"v1,{standard_signature(body, request_id, timestamp, secret)}" for secret in secrets)
    return [
        ("x-baseten-request-id", request_id),
        ("x-baseten-signature", baseten),
        ("webhook-id", request_id),
        ("webhook-timestamp", str(timestamp)),
        ("webhook-signature", standard),
    ]


def baseten_signature(body: bytes, secret: bytes) -> str:
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def standard_signature(body: bytes, message_id: str, timestamp: int | str, secret: bytes) -> str:
    signed = f"{message_id}.{timestamp}.".encode() + body
    return base64.b64encode(hmac.new(standard_key(secret), signed, hashlib.sha256).digest()).decode()


# -- verifying ---------------------------------------------------------------------------------------


def verify_baseten(body: bytes, header: str, secret: bytes) -> bool:
    """True when one `v1=` entry of an `x-baseten-signature` value is `body` signed with `secret`."""
    expected = baseten_signature(body, secret)
    entries = [entry.strip() for entry in header.split(",")]
    return _any_equal(expected, [e[3:] for e in entries if e.startswith("v1=")])


def verify_standard(
    body: bytes, headers: Mapping[str, str], secret: bytes, *, tolerance_seconds: float | None = None,
    now: float | None = None,
) -> bool:  # fmt: skip
    """True when one `v1,` entry of `webhook-signature` signs `<webhook-id>.<webhook-timestamp>.<body>`.

    Header names are matched without case. With `tolerance_seconds`, a timestamp further than that from
    `now` (default: the clock) fails too, as the scheme's receivers do against replays.
    """
    lower = {name.lower(): value for name, value in headers.items()}
    message_id, stamp, header = lower.get("webhook-id"), lower.get("webhook-timestamp"), lower.get("webhook-signature")
    if not (message_id and stamp and header) or not (stamp.isascii() and stamp.isdigit()):
        return False
    if tolerance_seconds is not None and abs((time.time() if now is None else now) - int(stamp)) > tolerance_seconds:
        return False
    try:
        expected = standard_signature(body, message_id, stamp, secret)
    except ValueError:  # a whsec_ secret that is not base64
        return False
    entries = header.split()
    return _any_equal(expected, [e[3:] for e in entries if e.startswith("v1,")])


def _any_equal(expected: str, candidates: list[str]) -> bool:
    """Constant-time per candidate; every candidate is compared (no early exit on a match)."""
    found = False
    for candidate in candidates:
        found |= hmac.compare_digest(expected.encode(), candidate.encode("latin-1", "replace"))
    return found
