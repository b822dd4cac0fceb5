-- evaluator: every candidate it gated, every measurement on a test set version (a champion is
-- measured again when the test set changes), and which model is in production.

CREATE TABLE models (
    model_id       text        NOT NULL,
    version        integer     NOT NULL,
    project        text        NOT NULL,
    weights_uri    text        NOT NULL,
    weights_sha256 text        NOT NULL,
    class_names    jsonb       NOT NULL,
    imgsz          integer     NOT NULL,
    passed         boolean     NOT NULL,
    production_at  timestamptz,
    evaluated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_id, version)
);
CREATE INDEX models_project ON models (project, evaluated_at);

CREATE TABLE evaluations (
    model_id         text        NOT NULL,
    version          integer     NOT NULL,
    test_set_version text        NOT NULL,
    project          text        NOT NULL,
    metrics          jsonb       NOT NULL,     -- Metrics
    report_uri       text,
    measured_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_id, version, test_set_version)
);
