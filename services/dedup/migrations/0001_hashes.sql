-- dedup/quality: every decision once per image, and the hash index of accepted images.

-- One row per image id ever seen, whatever was decided: a second sighting is an exact duplicate.
CREATE TABLE decisions (
    image_id     text        PRIMARY KEY,
    project      text        NOT NULL,
    outcome      text        NOT NULL,     -- accepted | rejected
    reason       text,
    duplicate_of text,
    distance     integer,
    decided_at   timestamptz NOT NULL DEFAULT now()
);

-- The durable copy of the near-duplicate index: accepted images only. `seq` orders rows so a
-- replica can load what it has not seen yet; per project it grows in commit order, because
-- accepts of one project are serialised by an advisory lock.
CREATE TABLE hashes (
    seq        bigserial   PRIMARY KEY,
    project    text        NOT NULL,
    image_id   text        NOT NULL UNIQUE,
    phash      bigint      NOT NULL,       -- the 64 bits, stored as a signed bigint
    dhash      bigint      NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX hashes_project_seq ON hashes (project, seq);
