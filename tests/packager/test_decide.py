"""The packager's decisions alone (services/packager/decide.py and its per-project policy): the
manifest of an artifact, the signed package built the same way every time, the event that
announces it; no broker, no database."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from visionloop.contracts import (
    Artifact,
    Lineage,
    Metrics,
    ModelConverted,
    ModelRef,
    Parity,
    Precision,
    Target,
)
from visionloop.libs import package, signing
from visionloop.services.packager.config import PackagerSettings
from visionloop.services.packager.decide import announcement, manifest_for, package_artifact

MODEL = b"not an ONNX file: the packager never reads it"


def _converted() -> ModelConverted:
    artifact = Artifact(target=Target.EDGE, precision=Precision.INT8, input_shape=[1, 3, 128, 128], uri="file:///a/edge",
                        sha256=hashlib.sha256(MODEL).hexdigest(), size_bytes=len(MODEL), parity=Parity(max_abs_diff_px=0.0, passed=True))
    return ModelConverted(
        lineage=Lineage(model=ModelRef(model_id="yard-detector", version=3), parent=ModelRef(model_id="yard-detector", version=2),
                        dataset_version="ds-abc", class_names=["car", "person"], imgsz=128),
        metrics=Metrics(map50_95=0.61, map50=0.9, per_class_ap={"car": 0.7}), artifacts=[artifact],
    )


def test_a_package_is_its_manifest_and_model_signed_and_the_same_every_time() -> None:
    converted, moment = _converted(), datetime(2026, 12, 5, 9, 30, 12, 345678, tzinfo=UTC)
    (artifact,) = converted.artifacts
    policy = PackagerSettings(fleets={"edge": ["lab"]}, conf=0.3).policy("yard")
    manifest = manifest_for(converted, artifact, project="yard", created_at=moment, policy=policy)
    assert (manifest["model"], manifest["parent"]) == ({"model_id": "yard-detector", "version": 3}, {"model_id": "yard-detector", "version": 2})
    assert manifest["fleets"] == ["lab"] and manifest["classes"] == ["car", "person"] and manifest["created_at"] == "2026-12-05T09:30:12Z"
    assert manifest["decoding"]["conf"] == 0.3 and manifest["metrics"]["map50_95"] == 0.61 and "files" not in manifest
    key = signing.load_private(signing.generate()[0])
    built = package_artifact(converted, artifact, MODEL, key, project="yard", created_at=moment, policy=policy)
    assert package_artifact(converted, artifact, MODEL, key, project="yard", created_at=moment, policy=policy).archive == built.archive
    opened = package.open_package(built.archive, signing.TrustStore([key.public_key()]))
    assert opened.model == MODEL and opened.spec.precision is Precision.INT8 and opened.spec.input.shape == [1, 3, 128, 128]
    event = announcement(converted, artifact, built, "file:///p/pkg")
    assert (event.package_sha256, event.size_bytes, event.key_id, event.signature) == (built.sha256, built.size, built.key_id, built.signature)
    assert event.lineage == converted.lineage and event.target is Target.EDGE and event.package_uri == "file:///p/pkg"


def test_project_policy_overrides_fleets_per_target() -> None:
    config = PackagerSettings(fleets={"edge": ["all-edge"], "server": ["dc"]}, projects={"p": {"fleets": {"edge": ["lab"]}, "max_det": 10}})
    policy = config.policy("p")
    assert policy.fleets == {Target.EDGE: ["lab"], Target.SERVER: ["dc"]} and policy.max_det == 10
    assert config.policy("other").fleets[Target.EDGE] == ["all-edge"]
