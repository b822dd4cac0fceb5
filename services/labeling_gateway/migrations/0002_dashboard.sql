-- labeling-gateway: the dashboard's read model, fed by topics only (pipeline.status,
-- release.edge, release.server, device.status). Tables, not memory: gateway replicas share
-- one consumer group per topic, so each replica sees only its share of the partitions.

-- The latest status of every service instance, with the throughput between its last two
-- heartbeats (counters are monotonic per instance; uptime is the clock).
CREATE TABLE dash_instances (
    service       text             NOT NULL,
    instance      text             NOT NULL,
    kind          text             NOT NULL,
    uptime_s      double precision NOT NULL,
    counters      jsonb            NOT NULL DEFAULT '{}'::jsonb,
    gauges        jsonb            NOT NULL DEFAULT '{}'::jsonb,
    handled_per_s double precision,
    occurred_at   timestamptz      NOT NULL,
    PRIMARY KEY (service, instance)
);

-- Releases as their events describe them: the latest stage of each release id.
CREATE TABLE dash_releases (
    release_id    text             PRIMARY KEY,
    kind          text             NOT NULL CHECK (kind IN ('edge', 'server')),
    fleet         text             NOT NULL,
    target        text             NOT NULL,
    action        text             NOT NULL,
    model_id      text             NOT NULL,
    model_version integer          NOT NULL,
    rollback_to   text,
    stage_index   integer          NOT NULL,
    stage_percent double precision NOT NULL,
    first_at      timestamptz      NOT NULL,
    occurred_at   timestamptz      NOT NULL
);
CREATE INDEX dash_releases_recent ON dash_releases (occurred_at DESC);

-- The latest state of each device per release ('' for reports about no release). A heartbeat
-- only moves last_seen: it does not hide the state the device reached.
CREATE TABLE dash_devices (
    release_id   text        NOT NULL,
    device_id    text        NOT NULL,
    fleet        text        NOT NULL,
    state        text        NOT NULL,
    reason       text,
    active_model text,
    occurred_at  timestamptz NOT NULL,
    last_seen    timestamptz NOT NULL,
    PRIMARY KEY (release_id, device_id)
);
