-- Duplicates are decided within a project (issue 16): the same bytes in two projects are two images
-- to decide, so a decision and an index row are per (project, image id).
ALTER TABLE decisions DROP CONSTRAINT decisions_pkey;
ALTER TABLE decisions ADD PRIMARY KEY (project, image_id);
CREATE INDEX decisions_image_id ON decisions (image_id);
ALTER TABLE hashes DROP CONSTRAINT hashes_image_id_key;
ALTER TABLE hashes ADD CONSTRAINT hashes_project_image_id_key UNIQUE (project, image_id);
