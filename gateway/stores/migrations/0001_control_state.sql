-- Fleet mode (SPEC §13, issue 14): the control state every gateway of a fleet shares.

-- The admin API's changes (the overlay of gateway.environments.overlay) as one JSONB document.
-- A write is a compare-and-swap on `revision` (UPDATE ... WHERE revision = based_on), so two
-- gateways can never both win one revision: that is what makes one promotion per environment
-- hold fleet-wide.
CREATE TABLE admin_overlay (
    id smallint PRIMARY KEY CHECK (id = 1),
    revision bigint NOT NULL,
    models jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO admin_overlay (id, revision, models) VALUES (1, 0, '{}');

-- Who advances a running promotion (one gateway at a time); an expired lease is taken over.
CREATE TABLE promotion_leases (
    model_id text NOT NULL,
    environment text NOT NULL,
    holder text NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (model_id, environment)
);

-- Each gateway's cumulative answers of a promotion's candidate: the rollback rule sums them.
CREATE TABLE promotion_counts (
    gateway text NOT NULL,
    model_id text NOT NULL,
    environment text NOT NULL,
    deployment text NOT NULL,
    calls double precision NOT NULL,
    errors double precision NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (gateway, model_id, environment, deployment)
);
