-- trainer: the per-project dataset (latest verified label set per image), its immutable
-- versions, the frozen test sets, training runs and the models they produced.

-- One row per (project, image): the newest verified label set. `role` is `train` or `test`;
-- a test image never enters training (nor does a near duplicate of one, by the hashes).
CREATE SEQUENCE sample_seq;
CREATE TABLE samples (
    project     text        NOT NULL,
    image_id    text        NOT NULL,
    label_id    text        NOT NULL,
    image       jsonb       NOT NULL,      -- ImageRef
    boxes       jsonb       NOT NULL,      -- [Box]
    label_hash  text        NOT NULL,
    provenance  jsonb       NOT NULL,
    role        text        NOT NULL CHECK (role IN ('train', 'test')),
    phash       text,
    dhash       text,
    seq         bigint      NOT NULL DEFAULT nextval('sample_seq'),
    verified_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project, image_id)
);
CREATE INDEX samples_seq ON samples (project, role, seq);

-- The project's class list in head order; only ever appended to.
CREATE TABLE taxonomies (
    project     text        PRIMARY KEY,
    class_names jsonb       NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE test_sets (
    version     text        PRIMARY KEY,
    project     text        NOT NULL,
    images      integer     NOT NULL,
    uri         text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE dataset_versions (
    version          text        PRIMARY KEY,
    project          text        NOT NULL,
    class_names      jsonb       NOT NULL,
    train_images     integer     NOT NULL,
    val_images       integer     NOT NULL,
    excluded_near_test integer   NOT NULL,
    test_set_version text,
    uri              text        NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now()
);

-- Training runs. At most one queued run per project (later requests are coalesced into it) and,
-- by the claim query, at most one running.
CREATE TABLE runs (
    run_id          text        PRIMARY KEY,
    project         text        NOT NULL,
    status          text        NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed')),
    triggers        jsonb       NOT NULL DEFAULT '[]',
    hyperparameters jsonb       NOT NULL DEFAULT '{}',
    attempts        integer     NOT NULL DEFAULT 0,
    owner           text,
    pid             integer,
    lease_until     timestamptz,
    snapshot_seq    bigint,
    dataset_version text,
    test_set_version text,
    model_id        text,
    version         integer,
    epoch           integer,
    reason          text,
    error           text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz
);
CREATE UNIQUE INDEX runs_one_queued ON runs (project) WHERE status = 'queued';
CREATE INDEX runs_project ON runs (project, created_at);

-- Models this trainer produced, and what the loop later said of them (gate, production).
CREATE TABLE models (
    model_id       text        NOT NULL,
    version        integer     NOT NULL,
    project        text        NOT NULL,
    run_id         text        NOT NULL,
    weights_uri    text        NOT NULL,
    weights_sha256 text        NOT NULL,
    class_names    jsonb       NOT NULL,
    imgsz          integer     NOT NULL,
    passed         boolean,
    production_at  timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_id, version)
);
CREATE INDEX models_project ON models (project, version);
