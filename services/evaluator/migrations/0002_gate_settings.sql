-- Gate settings changed at run time (issue 18, item 5): `visionloop evaluator set P
-- map50_95_floor=0.05` writes a project's overrides here; they win over the environment's and
-- the config file's and count from the next evaluation. And every candidate's `model trained`
-- payload, so `visionloop evaluator rejudge` can judge it again without retraining.
CREATE TABLE gate_settings (
    project    text        PRIMARY KEY,
    overrides  jsonb       NOT NULL,
    updated_by text        NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE models ADD COLUMN trained jsonb;
ALTER TABLE models ADD COLUMN failures jsonb;
