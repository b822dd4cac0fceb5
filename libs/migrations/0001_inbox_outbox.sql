-- The bus's own tables, created in every service's schema (search_path is set to it).

-- Inbox: ids of events this service's consumer groups have handled. The row is written in the
-- same transaction as the handler's effect, so a redelivered event is recognised and skipped.
CREATE TABLE inbox (
    consumer_group text        NOT NULL,
    event_id       uuid        NOT NULL,
    outcome        text        NOT NULL DEFAULT 'handled',  -- handled | dead_lettered
    handled_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, event_id)
);
CREATE INDEX inbox_handled_at ON inbox (handled_at);

-- Outbox: every event the service emits, written in the same transaction as the effect that
-- caused it; published right after commit, swept by a relay when that publish did not happen,
-- and kept for a while after publishing so a fresh (memory-only) broker can be re-fed.
CREATE TABLE outbox (
    id           bigserial   PRIMARY KEY,
    event_id     uuid        NOT NULL UNIQUE,
    topic        text        NOT NULL,
    key          bytea,
    value        bytea       NOT NULL,
    headers      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;
CREATE INDEX outbox_created_at ON outbox (created_at);

-- Bus state: the broker epoch last seen, to notice a broker that lost its topics.
CREATE TABLE bus_state (
    name  text PRIMARY KEY,
    value text NOT NULL
);
