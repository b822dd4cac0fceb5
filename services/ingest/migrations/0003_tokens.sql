-- Who may submit over HTTP (issue 16): one token per upstream system, bound to projects, stored as
-- the SHA-256 of the token (libs/tokens.py), revocable. projects '{*}': every project.
CREATE TABLE tokens (
    token_id      text        PRIMARY KEY,
    secret_sha256 bytea       NOT NULL,
    name          text        NOT NULL,
    projects      text[]      NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz
);
