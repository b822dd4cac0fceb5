-- ingest: a submission id belongs to its project and remembers the bytes it brought and the
-- answer it got, so the same id with the same bytes gets the same answer (HTTP retries, a
-- producer that re-sends under a new event id) and an ingested id never changes its image.
ALTER TABLE submissions DROP CONSTRAINT submissions_pkey;
ALTER TABLE submissions ADD PRIMARY KEY (project, submission_id);
ALTER TABLE submissions ADD COLUMN content_sha256 text;   -- SHA-256 of the bytes read; null when refused before reading
ALTER TABLE submissions ADD COLUMN answer jsonb;           -- the payload emitted (image ingested | image rejected)
ALTER TABLE submissions ADD COLUMN channel text NOT NULL DEFAULT 'topic';  -- topic | http
UPDATE submissions SET content_sha256 = image_id WHERE outcome = 'ingested';
