"""Inference keys created through the admin API (issue 12): their records and how they join the table.

A record lives in the admin store's `api_keys` list: the table's key fields (`name`, `team`,
`sha256`, optional `environments`, `models`, `rate_limit` and whatever a key of the table may carry)
plus this API's own `prefix`, `created_at` and `type`. Only the digest of the key is stored.
The serving table's keys are the file's and these, composed and validated like every admin change:
the key fields go through the table's own validator (schema and semantics), so a rule added to
`api_keys` in the table holds for admin-created keys too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import secrets
import string
import time
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from gateway.routing.loader import TableInvalid, compile_table
from gateway.routing.model import Table
from gateway.routing.source import model_document

META = ("prefix", "created_at", "type")  # this API's fields of a record; the rest is the table's key
INVOKE = "WORKSPACE_INVOKE"  # the platform's type of a key that calls models
PREFIX_ALPHABET = string.ascii_letters + string.digits
PREFIX_LENGTH = 8


def new_key() -> tuple[str, str]:
    """(prefix, whole key) in the platform's form `<prefix>.<secret>`: 8 letters or digits, then 256
    random bits (43 URL-safe characters). The prefix names the key; only the whole key's digest is kept."""
    prefix = "".join(secrets.choice(PREFIX_ALPHABET) for _ in range(PREFIX_LENGTH))
    return prefix, f"{prefix}.{secrets.token_urlsafe(32)}"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def key_document(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record as a table `api_keys` entry."""
    return {field: value for field, value in record.items() if field not in META}


def with_admin_keys(sections: Mapping[str, Any], table: Table, records: Sequence[Mapping[str, Any]]) -> Table:
    """`table` with the admin-created keys added; raises TableInvalid (every problem, by record) when
    one breaks a table rule or repeats a name or digest of the file's keys."""
    docs = [key_document(record) for record in records]
    wanted = {model_id for doc in docs for model_id in doc.get("models") or () if isinstance(model_id, str)}
    sub = {
        **sections,
        "models": {m: model_document(table.models[m], table) for m in sorted(wanted) if m in table.models},
        "api_keys": docs,
    }
    where = [f"admin store: api_keys[{record.get('prefix')}]" for record in records]
    try:
        keys = compile_table(sub, source=table.source).api_keys
    except TableInvalid as exc:
        raise TableInvalid([_renamed(problem, where) for problem in exc.problems]) from None
    names = {key.name for key in table.api_keys.values()}
    problems = [
        f"{where[i]}: the table file also has a key named {doc['name']!r}"
        for i, doc in enumerate(docs)
        if doc["name"] in names
    ]
    problems += [
        f"admin store: a key's digest is also in the table file ({key.name!r})"
        for d, key in keys.items()
        if d in table.api_keys
    ]
    if problems:
        raise TableInvalid(problems)
    canonical = json.dumps(list(records), sort_keys=True, separators=(",", ":")).encode()
    return dataclasses.replace(
        table,
        api_keys=MappingProxyType({**table.api_keys, **keys}),
        digest=hashlib.sha256(table.digest.encode() + b"\0keys\0" + canonical).hexdigest(),
    )


def _renamed(problem: str, where: list[str]) -> str:
    """`api_keys[3].team: ...` -> `admin store: api_keys[<prefix>].team: ...`; the models copied in
    for the check are the table's own, so their problems are the table's (shown as they are)."""
    if problem.startswith("api_keys["):
        index, _, rest = problem[len("api_keys[") :].partition("]")
        if index.isdigit() and int(index) < len(where):
            return where[int(index)] + rest
    return f"with the admin API's keys: {problem}"
