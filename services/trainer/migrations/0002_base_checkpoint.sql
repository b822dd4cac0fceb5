-- A project's first model may start from the operator's own checkpoint (`base_checkpoint`):
-- the run keeps which checkpoint it was (path, sha256) and how its classes were mapped by name
-- onto the project's (`mapped`: project class -> checkpoint class, `fresh`, `unused`). Null for
-- runs that started from the model yaml or from the champion.
ALTER TABLE runs ADD COLUMN base_checkpoint jsonb;
