-- ingest: every image stored once, every submission answered once.
CREATE TABLE images (
    image_id          text        PRIMARY KEY,          -- SHA-256 of the original bytes
    blob_uri          text        NOT NULL,
    width             integer     NOT NULL,
    height            integer     NOT NULL,
    format            text        NOT NULL,
    byte_size         bigint      NOT NULL,
    first_submission  text        NOT NULL,
    stored_at         timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE submissions (
    submission_id text        PRIMARY KEY,
    project       text        NOT NULL,
    image_id      text,                                 -- null when refused before reading bytes
    outcome       text        NOT NULL,                 -- ingested | rejected
    reason        text,
    decided_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX submissions_decided_at ON submissions (decided_at);
