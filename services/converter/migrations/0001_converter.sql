-- converter: every gated model it saw (converted or skipped), and per target what was built,
-- what parity measured and whether it ships. Keys are the model version (and target), so a
-- redelivered or retried event overwrites its own rows instead of adding more.

CREATE TABLE models (
    model_id        text             NOT NULL,
    version         integer          NOT NULL,
    project         text             NOT NULL,
    weights_sha256  text             NOT NULL,
    passed_gate     boolean          NOT NULL,
    outcome         text             NOT NULL,  -- converted | partial | refused | skipped_failed_gate
    reference_map50_95 double precision,         -- the PyTorch model's test-set mAP50-95 (evaluator)
    test_set_version text,
    seconds         double precision,
    handled_at      timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (model_id, version)
);
CREATE INDEX models_project ON models (project, handled_at);

CREATE TABLE conversions (
    model_id        text             NOT NULL,
    version         integer          NOT NULL,
    target          text             NOT NULL,  -- server | edge
    project         text             NOT NULL,
    precision       text             NOT NULL,  -- fp32 | fp16 | int8
    outcome         text             NOT NULL,  -- shipped | refused
    reason          text,                       -- ConversionFailureReason when refused
    message         text,
    input_shape     jsonb,
    max_abs_diff_px double precision,           -- raw box outputs vs PyTorch, input pixels
    map50_95        double precision,           -- the artifact on the test set (null: no test set)
    map50_95_delta  double precision,           -- artifact minus PyTorch
    tolerance       double precision,
    artifact_uri    text,
    artifact_sha256 text,
    size_bytes      bigint,
    seconds         jsonb,                      -- export, quantize, raw_parity, map
    converted_at    timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (model_id, version, target)
);
CREATE INDEX conversions_project ON conversions (project, converted_at);
