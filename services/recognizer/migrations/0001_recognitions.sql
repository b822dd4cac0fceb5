-- recognizer: one decision per accepted image, and what the candidate model said in shadow.

-- The production decision for every `image accepted` event handled (the event id is the key:
-- the inbox makes it once; the row is the audit trail behind the emitted event).
CREATE TABLE recognitions (
    event_id       uuid        PRIMARY KEY,
    image_id       text        NOT NULL,
    project        text        NOT NULL,
    outcome        text        NOT NULL,        -- recognized | unrecognized
    reason         text,                        -- UnrecognizedReason for unrecognized images
    uncertainty    real        NOT NULL,
    model_id       text,                        -- null for no_model
    model_version  integer,
    model_sha256   text,
    detections     integer     NOT NULL,
    inference_ms   real,                        -- model time per image (its share of its batch's run)
    batch_size     integer     NOT NULL,        -- images prepared together with this one
    decided_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX recognitions_image ON recognitions (image_id);
CREATE INDEX recognitions_model ON recognitions (model_id, model_version);

-- The candidate's answer on the same images, recorded and never used: what a promotion would
-- change. `agreement` compares its boxes with production's (1.0 = the same boxes and classes).
CREATE TABLE shadow (
    event_id           uuid        PRIMARY KEY,
    image_id           text        NOT NULL,
    project            text        NOT NULL,
    candidate_id       text        NOT NULL,
    candidate_version  integer     NOT NULL,
    candidate_sha256   text        NOT NULL,
    outcome            text,                    -- null when the candidate failed to run
    reason             text,
    uncertainty        real,
    detections         jsonb       NOT NULL DEFAULT '[]'::jsonb,
    production_outcome text        NOT NULL,
    agreement          real,
    inference_ms       real,
    error              text,
    recorded_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX shadow_candidate ON shadow (candidate_id, candidate_version);
