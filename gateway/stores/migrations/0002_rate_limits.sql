-- Fleet-wide rate limits (SPEC §13, issue 14; gateway.stores.ratelimits).

-- One row per live gateway process (each worker under --workers N): its heartbeat, and its usage
-- of each limit it counts as a JSON list of [limit, team, name, demand, open] (demand: calls a
-- second arriving lately; open: calls open now). Every member rewrites its own row every ~0.2 s
-- and reads the others' rows seen within a few seconds; a member that stops deletes its row, the
-- row of one that died is ignored once stale and deleted later by any member.
CREATE TABLE rate_limit_members (
    member text PRIMARY KEY,
    seen_at timestamptz NOT NULL DEFAULT now(),
    usage jsonb NOT NULL DEFAULT '[]'
);
CREATE INDEX rate_limit_members_seen_at ON rate_limit_members (seen_at);
