-- verifier: every verdict once per submission, pre-label offers, taxonomies, consensus groups,
-- and the calibration of auto-accept.

CREATE TABLE verdicts (
    submission_id text        PRIMARY KEY,
    project       text        NOT NULL,
    task_id       text        NOT NULL,
    image_id      text        NOT NULL,
    source        text        NOT NULL,
    outcome       text        NOT NULL,     -- verified | rejected | pending (consensus)
    reason        text,
    label_id      text,
    decided_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX verdicts_project ON verdicts (project, decided_at);

-- How each pre-label set offered for auto-accept was decided; a later human verdict on the
-- same task knows from here whether it was a spot check.
CREATE TABLE prelabel_offers (
    task_id    text        PRIMARY KEY,
    project    text        NOT NULL,
    image_id   text        NOT NULL,
    model_id   text,
    outcome    text        NOT NULL,        -- auto_accepted | needs_review | spot_check | rejected
    decided_at timestamptz NOT NULL DEFAULT now()
);

-- The last taxonomy seen per project (submissions that carry none are checked against it).
CREATE TABLE taxonomies (
    project     text        PRIMARY KEY,
    class_names jsonb       NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE consensus_submissions (
    group_id      text        NOT NULL,
    submission_id text        NOT NULL,
    labeller      text        NOT NULL,
    payload       jsonb       NOT NULL,
    received_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, submission_id)
);

CREATE TABLE consensus_groups (
    group_id   text        PRIMARY KEY,
    project    text        NOT NULL,
    outcome    text        NOT NULL,
    decided_at timestamptz NOT NULL DEFAULT now()
);

-- Human-verified pre-label boxes: the evidence behind each class's threshold.
CREATE TABLE calibration_samples (
    id            bigserial        PRIMARY KEY,
    project       text             NOT NULL,
    model_id      text             NOT NULL,
    class_name    text             NOT NULL,
    score         double precision NOT NULL,
    correct       boolean          NOT NULL,
    submission_id text             NOT NULL,
    created_at    timestamptz      NOT NULL DEFAULT now()
);
CREATE INDEX calibration_samples_class ON calibration_samples (project, model_id, class_name, id DESC);

-- The thresholds in force, recomputed whenever a class gets new samples.
CREATE TABLE calibration (
    project    text             NOT NULL,
    model_id   text             NOT NULL,
    class_name text             NOT NULL,
    threshold  double precision,
    precision  double precision,
    samples    integer          NOT NULL,
    support    integer          NOT NULL,
    status     text             NOT NULL,
    target     double precision NOT NULL,
    updated_at timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (project, model_id, class_name)
);
