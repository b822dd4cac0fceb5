"""The packager's decisions, pure: what a package holds (its manifest), the package itself
(hashing, signing, tar: CPU only, deterministic for one event), and the `model packaged` event."""

from __future__ import annotations

from datetime import datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from visionloop.contracts import Artifact, ModelConverted, ModelPackaged
from visionloop.libs import package
from visionloop.services.packager.config import PackagePolicy


def manifest_for(
    converted: ModelConverted, artifact: Artifact, *, project: str, created_at: datetime, policy: PackagePolicy
) -> dict:
    """The manifest of `artifact`'s package (without `files`, which `package.build` adds)."""
    lineage = converted.lineage
    return package.make_manifest(
        model=lineage.model,
        project=project,
        target=artifact.target,
        precision=artifact.precision,
        classes=lineage.class_names,
        input_shape=artifact.input_shape,
        imgsz=lineage.imgsz,
        created_at=created_at,
        dataset_version=lineage.dataset_version,
        metrics=converted.metrics.model_dump(mode="json"),
        parent=lineage.parent,
        fleets=policy.fleets.get(artifact.target, []),
        conf=policy.conf,
        iou=policy.iou,
        max_det=policy.max_det,
    )


def package_artifact(
    converted: ModelConverted,
    artifact: Artifact,
    model: bytes,
    key: Ed25519PrivateKey,
    *,
    project: str,
    created_at: datetime,
    policy: PackagePolicy,
) -> package.Built:
    """Build and sign the package of one artifact (CPU only: hashing, signing, tar)."""
    manifest = manifest_for(converted, artifact, project=project, created_at=created_at, policy=policy)
    return package.build(manifest, {package.MODEL_FILE: model}, key)


def announcement(converted: ModelConverted, artifact: Artifact, built: package.Built, uri: str) -> ModelPackaged:
    """The `model packaged` event of a stored package."""
    return ModelPackaged(
        lineage=converted.lineage,
        target=artifact.target,
        precision=artifact.precision,
        package_uri=uri,
        package_sha256=built.sha256,
        size_bytes=built.size,
        manifest_sha256=built.manifest_sha256,
        signature=built.signature,
        key_id=built.key_id,
        metrics=converted.metrics,
    )
