-- packager: one package per (model, version, target, precision). The primary key makes a
-- redelivered or replayed `model converted` harmless: the stored announcement is sent again.

CREATE TABLE packages (
    model_id        text        NOT NULL,
    version         integer     NOT NULL,
    target          text        NOT NULL,     -- server | edge
    precision       text        NOT NULL,     -- fp32 | fp16 | int8
    project         text        NOT NULL,
    artifact_sha256 text        NOT NULL,     -- the ONNX file packaged
    package_sha256  text        NOT NULL,
    package_uri     text        NOT NULL,
    size_bytes      bigint      NOT NULL,
    manifest_sha256 text        NOT NULL,
    key_id          text        NOT NULL,
    payload         jsonb       NOT NULL,     -- the `model packaged` event emitted
    created_at      timestamptz NOT NULL,     -- the manifest's created_at (the event's time)
    packaged_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_id, version, target, precision)
);
CREATE INDEX packages_project ON packages (project, packaged_at);
CREATE INDEX packages_sha ON packages (package_sha256);
