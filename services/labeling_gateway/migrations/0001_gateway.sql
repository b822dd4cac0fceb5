-- labeling-gateway: projects and their taxonomy, API tokens, images, the task queue with
-- leases, submissions, verified labels (for export), Label Studio bindings and webhooks.

CREATE TABLE projects (
    project    text        PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now(),
    created_by text        NOT NULL
);

-- The taxonomy: an ordered class list. Positions never change (YOLO class indices follow
-- them); classes are only appended. Renaming a class is a migration, not an API call.
CREATE TABLE classes (
    project  text        NOT NULL REFERENCES projects ON DELETE CASCADE,
    position integer     NOT NULL,
    name     text        NOT NULL,
    added_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project, position),
    UNIQUE (project, name)
);

-- API tokens, stored as the SHA-256 of the secret (tokens are 256-bit random strings, so a
-- plain hash is enough). project NULL: a token for every project (admins who create projects).
CREATE TABLE tokens (
    token_id      text        PRIMARY KEY,
    secret_sha256 bytea       NOT NULL UNIQUE,
    project       text,
    role          text        NOT NULL CHECK (role IN ('annotator', 'reviewer', 'admin')),
    user_id       text        NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    created_by    text        NOT NULL,
    revoked_at    timestamptz
);

-- Images the gateway was told about (by the recognizer, imports or verified labels).
CREATE TABLE images (
    project    text        NOT NULL,
    image_id   text        NOT NULL,
    blob_uri   text        NOT NULL,
    width      integer     NOT NULL,
    height     integer     NOT NULL,
    format     text        NOT NULL,
    byte_size  bigint      NOT NULL,
    first_seen timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project, image_id)
);

-- Model versions whose pre-labels the gateway has seen (Label Studio's /versions).
CREATE TABLE model_versions (
    project    text        NOT NULL,
    model_id   text        NOT NULL,
    version    integer     NOT NULL,
    first_seen timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project, model_id, version)
);

-- The queue. state: verifying (pre-labels with the verifier, not handed out) | queued (handed
-- out when not held) | submitted (answered, with the verifier) | done | rejected | superseded.
-- A task is held while held_until is in the future; an expired hold is simply ignored, so an
-- expired lease returns the task to the queue without a sweeper.
CREATE TABLE tasks (
    task_id        text             PRIMARY KEY,
    project        text             NOT NULL,
    image_id       text             NOT NULL,
    kind           text             NOT NULL CHECK (kind IN ('annotate', 'review', 'reannotate')),
    state          text             NOT NULL,
    priority       double precision NOT NULL,
    uncertainty    double precision,
    created_at     timestamptz      NOT NULL DEFAULT now(),
    updated_at     timestamptz      NOT NULL DEFAULT now(),
    start_boxes    jsonb            NOT NULL DEFAULT '[]'::jsonb,
    prelabel_model jsonb,
    issues         jsonb            NOT NULL DEFAULT '[]'::jsonb,
    spot_check     boolean          NOT NULL DEFAULT false,
    group_id       text             NOT NULL,
    group_size     integer          NOT NULL DEFAULT 1,
    parent_task    text,
    lease_id       uuid,
    leased_by      text,
    leased_at      timestamptz,
    held_until     timestamptz,
    submitted_by   text
);
CREATE INDEX tasks_queue ON tasks (project, priority DESC, created_at, task_id) WHERE state = 'queued';
CREATE INDEX tasks_holder ON tasks (project, leased_by) WHERE state = 'queued';
CREATE INDEX tasks_image ON tasks (project, image_id);
CREATE INDEX tasks_group ON tasks (group_id);

-- A labeller who skipped a task is not handed it again.
CREATE TABLE skips (
    task_id    text        NOT NULL,
    user_id    text        NOT NULL,
    skipped_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, user_id)
);

CREATE TABLE submissions (
    submission_id  text        PRIMARY KEY,
    task_id        text,
    project        text        NOT NULL,
    image_id       text        NOT NULL,
    lease_id       uuid,
    user_id        text        NOT NULL,
    role           text        NOT NULL,
    source         text        NOT NULL,
    kind           text        NOT NULL,
    decision       text,
    boxes          jsonb       NOT NULL,
    actions        jsonb       NOT NULL,
    opened_at      timestamptz,
    submitted_at   timestamptz NOT NULL DEFAULT now(),
    duration_s     double precision,
    for_test_set   boolean     NOT NULL DEFAULT false,
    outcome        text,
    outcome_reason text,
    outcome_at     timestamptz
);
CREATE UNIQUE INDEX submissions_lease ON submissions (task_id, lease_id) WHERE lease_id IS NOT NULL;
CREATE INDEX submissions_project ON submissions (project, submitted_at);

-- Verified label sets, the latest per image (and per test set / training use): what exports read.
CREATE TABLE labels (
    project      text        NOT NULL,
    image_id     text        NOT NULL,
    for_test_set boolean     NOT NULL,
    label_id     text        NOT NULL,
    boxes        jsonb       NOT NULL,
    method       text        NOT NULL,
    verified_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project, image_id, for_test_set)
);

-- Label Studio projects bound to visionloop projects by /setup (or their first call).
CREATE TABLE ls_projects (
    ls_project   text        PRIMARY KEY,
    project      text        NOT NULL,
    hostname     text,
    access_token text,
    from_name    text,
    to_name      text,
    bound_at     timestamptz NOT NULL DEFAULT now()
);

-- Webhooks as they arrived: stored in the request (Label Studio waits 1 s and never retries),
-- processed afterwards by a worker that claims rows with FOR UPDATE SKIP LOCKED.
CREATE TABLE webhooks (
    id            bigserial   PRIMARY KEY,
    project       text        NOT NULL,
    action        text        NOT NULL,
    body          jsonb       NOT NULL,
    received_at   timestamptz NOT NULL DEFAULT now(),
    state         text        NOT NULL DEFAULT 'pending',
    attempts      integer     NOT NULL DEFAULT 0,
    claimed_until timestamptz,
    error         text,
    processed_at  timestamptz
);
CREATE INDEX webhooks_pending ON webhooks (id) WHERE state IN ('pending', 'processing');

CREATE TABLE imports (
    import_id  text        PRIMARY KEY,
    project    text        NOT NULL,
    format     text        NOT NULL,
    images     integer     NOT NULL,
    boxes      integer     NOT NULL,
    test_set   integer     NOT NULL,
    created_by text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The key that signs image URLs handed to Label Studio (made once, at first start).
CREATE TABLE secrets (
    name  text  PRIMARY KEY,
    value bytea NOT NULL
);
