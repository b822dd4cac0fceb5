-- Why a task is for people (issue 18, item 6): an annotate task carries the recognizer's reason
-- (`no_model`, `no_confident_detection`, `uncertain`, `out_of_distribution`); a review task
-- `prelabels` until the verifier says why it did not auto-accept them (`needs_review`,
-- `spot_check`, or a check that failed); a re-annotate task the rejection's reason.
ALTER TABLE tasks ADD COLUMN reason text;
CREATE INDEX tasks_project_reason ON tasks (project, state, reason);
