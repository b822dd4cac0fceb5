-- distributor: packages it accepted, releases per fleet with their rollout stage, and every
-- device's reports.

CREATE TABLE packages (
    package_sha256 text        PRIMARY KEY,
    package_uri    text        NOT NULL,
    project        text        NOT NULL,
    model_id       text        NOT NULL,
    version        integer     NOT NULL,
    target         text        NOT NULL,
    precision      text        NOT NULL,
    size_bytes     bigint      NOT NULL,
    signature      text        NOT NULL,
    key_id         text        NOT NULL,
    manifest       jsonb       NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);

-- One row per (model version, fleet). `status`: rolling, paused, completed, rolled_back, superseded.
CREATE TABLE releases (
    release_id     text        PRIMARY KEY,
    project        text        NOT NULL,
    fleet          text        NOT NULL,
    target         text        NOT NULL,
    model_id       text        NOT NULL,
    version        integer     NOT NULL,
    package_sha256 text        NOT NULL REFERENCES packages (package_sha256),
    stages         jsonb       NOT NULL,
    canary_devices jsonb       NOT NULL DEFAULT '[]',
    stage_index    integer     NOT NULL DEFAULT 0,
    status         text        NOT NULL,
    previous_release text,
    reason         text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX releases_fleet ON releases (fleet, created_at);

CREATE TABLE devices (
    fleet        text        NOT NULL,
    device_id    text        NOT NULL,
    state        text        NOT NULL,
    release_id   text,
    active_model text,
    last_seen    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (fleet, device_id)
);

-- The latest state of each device for each release (what rollout decisions count).
CREATE TABLE release_devices (
    release_id text        NOT NULL,
    device_id  text        NOT NULL,
    state      text        NOT NULL,
    reason     text,
    message    text,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (release_id, device_id)
);

CREATE TABLE device_events (
    id         bigserial   PRIMARY KEY,
    fleet      text        NOT NULL,
    device_id  text        NOT NULL,
    release_id text,
    state      text        NOT NULL,
    reason     text,
    message    text,
    at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX device_events_release ON device_events (release_id, at);
