CREATE TABLE effects (
    id       bigserial PRIMARY KEY,
    image_id text      NOT NULL,
    event_id uuid      NOT NULL
);
