-- What the gate said of each model (issue 18, item 4): `visionloop trainer runs` shows the test
-- set's mAP50-95 and the verdict with its reasons, not only that the run produced weights.
-- A model judged again (`visionloop evaluator rejudge`) keeps the newest verdict.
ALTER TABLE models ADD COLUMN map50_95 double precision;
ALTER TABLE models ADD COLUMN map50 double precision;
ALTER TABLE models ADD COLUMN gate_failures jsonb;
ALTER TABLE models ADD COLUMN evaluated_at timestamptz;

-- What a dataset version left out and why (issue 18, item 3): one entry per training image left
-- out, e.g. {"image_id", "reason": "near_test_duplicate", "test_image_id", "distance"}.
ALTER TABLE dataset_versions ADD COLUMN excluded jsonb NOT NULL DEFAULT '[]';
