-- An import is one batch (issue 18, item 2): the run it asks for waits until the trainer holds
-- the import's labels (`samples.provenance->>'batch_id'`), or until `waits_until`, whichever
-- comes first. Null for every other run.
ALTER TABLE runs ADD COLUMN waits_for jsonb;
ALTER TABLE runs ADD COLUMN waits_until timestamptz;
CREATE INDEX samples_batch ON samples (project, (provenance->>'batch_id')) WHERE provenance->>'batch_id' IS NOT NULL;
