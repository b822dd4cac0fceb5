-- The model library: every registered model artifact, and the aliases that say which one serves.
-- Owned by the distributor (until it exists, `visionloop library add` writes it); everyone else
-- reads it through visionloop.libs.library.ModelLibrary.

-- One row per (model line, version, target): the artifact that runs there and what it knows.
CREATE TABLE entries (
    id               bigserial   PRIMARY KEY,
    model_id         text        NOT NULL,            -- the model line, e.g. `parking-detector`
    version          integer     NOT NULL CHECK (version >= 1),
    target           text        NOT NULL CHECK (target IN ('server', 'edge')),
    project          text        NOT NULL,
    domain           jsonb       NOT NULL DEFAULT '{}'::jsonb,  -- tags it serves; {} = whole project
    domain_key       text        NOT NULL,            -- canonical JSON of `domain`: the alias scope
    class_names      jsonb       NOT NULL,            -- head order, never reordered within a line
    input_size       integer     NOT NULL CHECK (input_size > 0),
    precision        text        NOT NULL CHECK (precision IN ('fp32', 'fp16', 'int8')),
    artifact_uri     text        NOT NULL,
    artifact_sha256  text        NOT NULL CHECK (artifact_sha256 ~ '^[0-9a-f]{64}$'),
    artifact_bytes   bigint,
    package_uri      text,
    package_sha256   text,
    metrics          jsonb,                            -- null: registered without measurements
    parent_model_id  text,
    parent_version   integer,
    dataset_version  text        NOT NULL,
    registered_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (model_id, version, target)
);
CREATE INDEX entries_project ON entries (project, target);

-- Which version an alias names, per (project, model line, target, domain scope). The primary key
-- makes "one alias, one version per scope" a constraint; moving `production` rewrites two rows
-- (the new production, the old one as `previous`) in one transaction.
CREATE TABLE aliases (
    project     text        NOT NULL,
    model_id    text        NOT NULL,
    target      text        NOT NULL,
    domain_key  text        NOT NULL,
    alias       text        NOT NULL CHECK (alias IN ('production', 'candidate', 'previous')),
    entry_id    bigint      NOT NULL REFERENCES entries (id),
    set_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project, model_id, target, domain_key, alias)
);
CREATE INDEX aliases_entry ON aliases (entry_id);

-- Every alias move, for audit and rollback: `entry_id` null means the alias was removed.
CREATE TABLE alias_moves (
    id          bigserial   PRIMARY KEY,
    project     text        NOT NULL,
    model_id    text        NOT NULL,
    target      text        NOT NULL,
    domain_key  text        NOT NULL,
    alias       text        NOT NULL,
    entry_id    bigint      REFERENCES entries (id),
    from_entry  bigint      REFERENCES entries (id),
    moved_at    timestamptz NOT NULL DEFAULT now()
);
