-- verifier: auto-accept with a guarantee, per model version. The evidence (human-verified
-- pre-label boxes) and the thresholds are keyed by the model version that drew the pre-labels,
-- so a new version starts uncalibrated; a threshold stands only where the one-sided
-- Clopper-Pearson lower bound of its box precision reaches the target.
--
-- Rows from before name their model line but not its version: they keep it, under version 0
-- (unknown), which no pre-label of a named model version matches — history, not evidence for
-- a version. Pre-labels that name no model ('-') are version 0 too, so theirs stay in use.

ALTER TABLE calibration_samples ADD COLUMN model_version integer NOT NULL DEFAULT 0;
ALTER TABLE calibration_samples ALTER COLUMN model_version DROP DEFAULT;
DROP INDEX calibration_samples_class;
CREATE INDEX calibration_samples_version ON calibration_samples (project, model_id, model_version, class_name, id DESC);

ALTER TABLE calibration ADD COLUMN model_version integer NOT NULL DEFAULT 0;
ALTER TABLE calibration ALTER COLUMN model_version DROP DEFAULT;
ALTER TABLE calibration DROP CONSTRAINT calibration_pkey;
ALTER TABLE calibration ADD PRIMARY KEY (project, model_id, model_version, class_name);
ALTER TABLE calibration ADD COLUMN correct integer NOT NULL DEFAULT 0;          -- right boxes among the samples
ALTER TABLE calibration ADD COLUMN support_correct integer NOT NULL DEFAULT 0;  -- right boxes among the support
ALTER TABLE calibration ADD COLUMN lower_bound double precision;                -- of the precision at the threshold (best cut if none)
ALTER TABLE calibration ADD COLUMN confidence double precision;                 -- of the bound; null: computed by the old rule
-- A threshold of the old rule (raw precision) vouches for nothing: none stands until recomputed
-- (the verifier recomputes a row whose target or confidence is not the policy's when it is used).
-- Their counts are filled in from the samples they were computed on (the newest `samples`).
UPDATE calibration SET threshold = NULL, status = 'stale', support_correct = round(coalesce(precision, 0) * support)::integer;
UPDATE calibration c SET correct = (
    SELECT count(*) FILTER (WHERE w.correct) FROM (
        SELECT s.correct, row_number() OVER (ORDER BY s.id DESC) AS n FROM calibration_samples s
        WHERE s.project = c.project AND s.model_id = c.model_id AND s.class_name = c.class_name
    ) w WHERE w.n <= c.samples
);

ALTER TABLE prelabel_offers ADD COLUMN model_version integer;                   -- null: offered before versions were kept
