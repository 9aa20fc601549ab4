"""Who may call which admin operation (issue 12): a pure decision over the caller and the operation.

Callers: the operator (`--admin-token`, or anyone on a loopback listener without a token) may do
everything; a table `admin_keys` entry of scope `team` manages every model of its team and the
inference keys of its team; one of scope `model` manages only its models, and only inference keys
narrowed to some of them. Neither may touch gateway-wide operations (reload, the routing table's
digest, the async queues). Each route names its `Access` (`gateway.admin.routes`).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass

from gateway.auth import presented_key
from gateway.errors import Forbidden, Unauthorized
from gateway.routing.model import Table


class Access(enum.Enum):
    OPEN = "open"  # no credentials (health, readiness, metrics)
    GATEWAY = "gateway"  # the operator only: gateway-wide state
    ANY = "any"  # every admin caller; the handler narrows what it shows to the caller's reach
    MODEL = "model"  # the model named by the path must be within the caller's reach


@dataclass(frozen=True, slots=True)
class Caller:
    """`team` None: the operator. `models` None: every model of `team`."""

    name: str
    team: str | None = None
    models: frozenset[str] | None = None

    @property
    def is_operator(self) -> bool:
        return self.team is None

    def reaches(self, team: str, model_id: str) -> bool:
        """May manage this model (of `team`)."""
        if self.team is None:
            return True
        return team == self.team and (self.models is None or model_id in self.models)

    def team_in_reach(self, team: str | None) -> str | None:
        """The team a team-wide call is about: as named for the operator (None: every team); for an
        admin key its own team when none is named, and 403 for another."""
        if self.team is None:
            return team
        if team is not None and team != self.team:
            raise Forbidden(f"admin key '{self.name}' manages team '{self.team}' only")
        return self.team

    def reaches_key(self, team: str, models: Iterable[str] | None) -> bool:
        """May create, see or revoke an inference key of `team` narrowed to `models` (None: all its models)."""
        if self.team is None:
            return True
        if team != self.team:
            return False
        if self.models is None:
            return True
        return models is not None and set(models) <= self.models and bool(set(models))


OPERATOR = Caller("operator")
# Who makes the admin call being handled (set by the admin app before a handler runs; per task).
NOBODY = Caller("nobody", "", frozenset())  # reaches nothing: what a handler sees if no caller was set
CALLER: ContextVar[Caller] = ContextVar("admin_caller", default=NOBODY)  # noqa: B039 (frozen)


def decide(caller: Caller, access: Access, model: tuple[str, str] | None = None) -> str | None:
    """Why `caller` may not make this call (403), or None when it may. `model`: (team, id) of the
    path's model when the route names one that exists (an unknown one is left to the handler: 404)."""
    if caller.is_operator or access in (Access.OPEN, Access.ANY):
        return None
    if access is Access.GATEWAY:
        return f"admin key '{caller.name}' may not make gateway-wide calls (the admin token may)"
    if model is not None and not caller.reaches(*model):
        return f"admin key '{caller.name}' does not manage model '{model[1]}'"
    return None


def admin_caller(table: Table, token: str | None, authorization: str | None) -> Caller:
    """The caller behind `Authorization: Bearer <token or admin key>`, or 401.

    A table admin key is honoured with its scope even without a token (loopback only); without a
    token anything else is the operator (SPEC §11: the listener is then open on loopback).
    """
    given = authorization or ""
    if token is not None and _is_token(given, token):
        return OPERATOR
    if given and table.admin_keys:
        try:
            digest = hashlib.sha256(presented_key(given).encode("utf-8", "surrogateescape")).digest()
        except Unauthorized:
            digest = b""
        key = table.admin_keys.get(digest)
        if key is not None and hmac.compare_digest(key.sha256, digest):
            return Caller(key.name, key.team, key.models)
    if token is None:
        return OPERATOR
    raise Unauthorized("admin calls need 'Authorization: Bearer <admin token or admin key>'")


def _is_token(authorization: str, token: str) -> bool:
    scheme, _, value = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


def refuse(reason: str | None) -> None:
    if reason is not None:
        raise Forbidden(reason)
