"""The inference-key calls of the admin API (issue 12), in the platform SDK's shapes.

`POST /v1/api_keys` (or `/v1/teams/{team}/api_keys`) creates a key and answers it once; the admin
store keeps only its sha256 digest (`keyset`). `GET /v1/api_keys` lists the admin-created keys
within the caller's reach without any secret; `DELETE /v1/api_keys/{prefix}` revokes one (by
prefix, or by name). Changes go through the one admin writer, so they reach live traffic with the
usual swap.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

from gateway.admin.access import CALLER, Caller
from gateway.admin.routes import Handler
from gateway.environments.changes import read_json
from gateway.environments.keyset import INVOKE, digest, new_key, utc_now
from gateway.environments.writer import AdminWriter
from gateway.errors import ClientError, Conflict, EndpointNotFound, Forbidden
from gateway.http.server import Request

FIELDS = {"name", "type", "model_ids", "team_id", "environments", "rate_limit"}


class KeysApi:
    def __init__(self, writer: AdminWriter) -> None:
        self.writer = writer
        self.state = writer.state

    def handlers(self) -> dict[str, Handler]:
        return {
            "list_api_keys": self.list_keys,
            "create_api_key": self.create,
            "create_team_api_key": self.create_for_team,
            "revoke_api_key": self.revoke,
        }

    def records(self) -> list[dict[str, Any]]:
        return list(self.state.overlay.get("api_keys") or ())

    async def list_keys(self, req: Request) -> tuple[int, object]:
        caller = CALLER.get()
        kinds = parse_qs(req.target.partition("?")[2]).get("type")
        keys = [key_info(r) for r in self.records() if reaches(caller, r) and (not kinds or r.get("type") in kinds)]
        return 200, {"keys": keys}

    async def create(self, req: Request) -> tuple[int, object]:
        return await self._create(req, None)

    async def create_for_team(self, req: Request, team_id: str) -> tuple[int, object]:
        return await self._create(req, team_id)

    async def _create(self, req: Request, url_team: str | None) -> tuple[int, object]:
        body = await read_json(req, FIELDS)
        caller = CALLER.get()
        if body.get("type") != INVOKE:
            raise ClientError(f"'type' must be {INVOKE!r}: admin keys are listed in the table's admin_keys")
        team = self.team_of(caller, body.get("team_id"), url_team)
        async with self.writer.lock:
            records = self.records()
            prefix, key = new_key()
            while any(r.get("prefix") == prefix for r in records):
                prefix, key = new_key()
            name = body.get("name") or f"key-{prefix}"
            if not isinstance(name, str):
                raise ClientError("'name' must be a string")
            if any(r.get("name") == name for r in records):
                raise Conflict(f"an inference key named {name[:200]!r} exists already")
            record: dict[str, Any] = {"name": name, "team": team, "sha256": digest(key), "prefix": prefix,
                                      "created_at": utc_now(), "type": INVOKE}  # fmt: skip
            models = body.get("model_ids")
            if models is not None:
                if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
                    raise ClientError("'model_ids' must be a list of model ids")
                record["models"] = models
            for field in ("environments", "rate_limit"):
                if field in body:
                    record[field] = body[field]
            if not reaches(caller, record):
                raise Forbidden(f"admin key '{caller.name}' may only create keys for the models it manages")
            await self.writer.change(f"create api key {prefix} ({team})", lambda o: _append(o, record))
        return 200, {"api_key": key, **key_info(record)}  # 200: the SDK accepts no other (issue 12)

    def team_of(self, caller: Caller, body_team: object, url_team: str | None) -> str:
        """The key's team: the URL's, else the body's `team_id`, else the caller's, else the table's only team."""
        if body_team is not None and not isinstance(body_team, str):
            raise ClientError("'team_id' must be a string")
        if url_team is not None and body_team is not None and body_team != url_team:
            raise ClientError(f"'team_id' {body_team[:64]!r} does not match the URL's team {url_team[:64]!r}")
        team = caller.team_in_reach(url_team or body_team)
        if team is None:
            teams = list(self.state.table.teams)
            if len(teams) != 1:
                raise ClientError("'team_id' is required: the table has several teams")
            team = teams[0]
        if team not in self.state.table.teams:
            raise EndpointNotFound(f"unknown team '{team[:64]}'")
        return team

    async def revoke(self, req: Request, name: str) -> tuple[int, object]:
        caller = CALLER.get()
        async with self.writer.lock:
            records = self.records()
            found = [r for r in records if r.get("prefix") == name] or [r for r in records if r.get("name") == name]
            if not found:
                if any(key.name == name for key in self.state.table.api_keys.values()):
                    raise Conflict(f"key {name[:200]!r} is in the table file: remove it there")
                raise EndpointNotFound(f"no inference key with prefix or name {name[:200]!r}")
            record = found[0]
            if not reaches(caller, record):
                raise Forbidden(f"admin key '{caller.name}' does not manage key {name[:200]!r}")
            await self.writer.change(f"revoke api key {record['prefix']}", lambda o: _remove(o, record["prefix"]))
        return 200, {"prefix": record["prefix"], "name": record["name"], "revoked": True}


def reaches(caller: Caller, record: dict[str, Any]) -> bool:
    return caller.reaches_key(str(record.get("team")), record.get("models"))


def key_info(record: dict[str, Any]) -> dict[str, Any]:
    """The SDK's `APIKeyInfo` (never the secret or the digest), with the gateway's own scope fields."""
    info = {"prefix": record["prefix"], "name": record["name"], "type": record.get("type", INVOKE),
            "model_ids": record.get("models"), "team_name": record["team"], "created_at": record["created_at"],
            "last_used_at": None, "owner": None, "environments": record.get("environments")}  # fmt: skip
    if "rate_limit" in record:
        info["rate_limit"] = record["rate_limit"]
    return info


def _append(overlay: dict[str, Any], record: dict[str, Any]) -> None:
    overlay["api_keys"] = [*(overlay.get("api_keys") or ()), record]


def _remove(overlay: dict[str, Any], prefix: str) -> None:
    overlay["api_keys"] = [r for r in overlay.get("api_keys") or () if r.get("prefix") != prefix]
