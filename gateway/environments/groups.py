"""Environment groups (issue 12): a team's environment names, in the SDK's `EnvironmentGroup(s)` shapes.

On the platform a group governs every environment of one name across a team's models; here it is
the same: the names the team's models use, and the team's regional environments (SPEC §3
`regional_environments`, which hang on these names), each with its region as an extra key.
A team is named by its name, which is also its id (the table has no other team id). Restricting
who may manage a group has no meaning behind one admin token: `manage_access` is always unrestricted.

`GET /v1/environment_groups` lists every team's groups (the admin token sees every team);
`/v1/environment_groups/{name}` is the one team's group of that name (409 when several teams have it:
name the team through `/v1/teams/{team}/environment_groups/{name}`).
"""

from __future__ import annotations

from typing import Any

from gateway.errors import Conflict, ModelNotFound
from gateway.routing.model import Table, Team

UNRESTRICTED = {"is_restricted": False, "users": []}

_cache: list[tuple[Table, dict[str, dict[str, str | None]]]] = []  # the last table's groups


def team_groups(table: Table) -> dict[str, dict[str, str | None]]:
    """Each team's environment names -> region (None: not regional); computed once per table snapshot."""
    if _cache and _cache[0][0] is table:
        return _cache[0][1]
    groups: dict[str, dict[str, str | None]] = {name: {} for name in table.teams}
    for model in table.models.values():
        names = groups.setdefault(model.team, {})
        for env in model.environments:
            names.setdefault(env, None)
    for name, team in table.teams.items():
        groups[name].update(team.regional_environments)
    _cache[:] = [(table, groups)]
    return groups


def group_view(table: Table, team: str, name: str) -> dict[str, Any]:
    region = team_groups(table)[team][name]
    return {"name": name, "team_id": team, "team_name": team, "manage_access": dict(UNRESTRICTED), "region": region}


def groups_view(table: Table, team: str | None) -> dict[str, Any]:
    """`EnvironmentGroups`: one page holding every group, by team then name."""
    groups = team_groups(table)
    teams = sorted(groups) if team is None else [known_team(table, team).name]
    items = [group_view(table, t, name) for t in teams for name in sorted(groups.get(t, {}))]
    return {"items": items, "pagination": {"has_more": False}}


def team_group(table: Table, team: str | None, name: str) -> tuple[str, str]:
    """(team, name) of the group asked for; 404 when none, 409 when the team is needed to tell."""
    groups = team_groups(table)
    if team is not None:
        known_team(table, team)
        owners = [team] if name in groups.get(team, {}) else []
    else:
        owners = sorted(t for t, names in groups.items() if name in names)
    if not owners:
        raise ModelNotFound(f"no environment group '{name[:64]}'" + (f" in team '{team}'" if team else ""))
    if len(owners) > 1:
        raise Conflict(f"teams {', '.join(owners[:5])} all have an environment group '{name}': "
                       f"ask /v1/teams/{{team}}/environment_groups/{name}")  # fmt: skip
    return owners[0], name


def known_team(table: Table, team: str) -> Team:
    found = table.teams.get(team)
    if found is None:
        raise ModelNotFound(f"team '{team[:64]}' not found")
    return found
