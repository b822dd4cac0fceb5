-- labeling-gateway: the economy read model (dashboard plots, `visionloop report`), fed by
-- `model.evaluated` and `label.verified`. Human seconds and queue depth need no table of
-- their own: submissions keep each answer's lease-to-submit time, tasks their timestamps.

-- The latest test-set evaluation of every model version (re-evaluations replace it).
CREATE TABLE econ_evaluations (
    project           text             NOT NULL,
    model_id          text             NOT NULL,
    version           integer          NOT NULL,
    map50_95          double precision NOT NULL,
    map50             double precision NOT NULL,
    passed            boolean          NOT NULL,
    test_set_version  text             NOT NULL,
    test_images       integer,
    occurred_at       timestamptz      NOT NULL,
    PRIMARY KEY (project, model_id, version)
);

-- Every verified label set: how it was verified and which model pre-labelled it (if one did).
CREATE TABLE econ_verified (
    label_id          text        PRIMARY KEY,
    project           text        NOT NULL,
    image_id          text        NOT NULL,
    method            text        NOT NULL,
    prelabel_model_id text,
    prelabel_version  integer,
    spot_check        boolean     NOT NULL DEFAULT false,
    for_test_set      boolean     NOT NULL DEFAULT false,
    occurred_at       timestamptz NOT NULL
);
CREATE INDEX econ_verified_project ON econ_verified (project, occurred_at);

-- Label sets verified before this migration: the gateway kept the latest per image only, so
-- that is what the economy starts from; the model is that of the image's newest pre-labelled task.
INSERT INTO econ_verified (label_id, project, image_id, method, prelabel_model_id, prelabel_version, for_test_set, occurred_at)
SELECT l.label_id, l.project, l.image_id, l.method, m.prelabel_model->>'model_id', (m.prelabel_model->>'version')::integer,
       l.for_test_set, l.verified_at
FROM labels l
LEFT JOIN LATERAL (SELECT t.prelabel_model FROM tasks t
                   WHERE t.project = l.project AND t.image_id = l.image_id AND t.prelabel_model IS NOT NULL
                   ORDER BY t.created_at DESC LIMIT 1) m ON true
ON CONFLICT (label_id) DO NOTHING;
