-- A region's async queue in PostgreSQL (SPEC §10, §13; issue 14): one database per region, so that a
-- regional request's body and result sit only in its region's database. Not the control database's
-- schema: its versions are recorded in queue_schema_version (gateway/stores/migrate.py QUEUE).

-- The region this database holds the queue of, written by the first
-- `gateway store migrate --queue-store REGION=URL`: a gateway refuses to keep another region's queue here.
CREATE TABLE queue_region (
    id smallint PRIMARY KEY CHECK (id = 1),
    region text NOT NULL,
    tagged_at timestamptz NOT NULL DEFAULT now()
);

-- The same columns as the embedded SQLite store (gateway/asyncq/store.py), times in epoch seconds
-- of the gateways' clocks (leases last 30 s: keep the fleet's clocks in sync, NTP).
CREATE TABLE async_requests (
    seq bigserial PRIMARY KEY,
    request_id text NOT NULL UNIQUE,
    team text NOT NULL,
    region text NOT NULL,
    model_id text NOT NULL,
    kind text NOT NULL,
    environment text NOT NULL,
    deployment_id text NOT NULL,
    caller text NOT NULL,
    priority integer NOT NULL,
    max_time_in_queue_seconds integer NOT NULL,
    retry text NOT NULL,
    webhook_endpoint text,
    body bytea NOT NULL,
    created_at double precision NOT NULL,
    status text NOT NULL,
    webhook_status text NOT NULL,
    status_at double precision NOT NULL,
    attempts integer NOT NULL,
    next_at double precision NOT NULL,
    errors text NOT NULL,
    result bytea,
    webhook_attempts integer NOT NULL,
    completed_at double precision,
    owner text,
    lease_until double precision
);
CREATE INDEX async_requests_queue ON async_requests (status, model_id, environment, priority, seq);
CREATE INDEX async_requests_team ON async_requests (team, status);
CREATE INDEX async_requests_due ON async_requests (webhook_status, next_at);
CREATE INDEX async_requests_done ON async_requests (completed_at) WHERE completed_at IS NOT NULL;
