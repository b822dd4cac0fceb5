"""packager: step 9 of the loop. Nothing reaches a device unsigned.

Consumes `model converted`; for each artifact it builds one package (libs/package.py: the ONNX
file, a manifest with classes, input, decoding, metrics and lineage, and an Ed25519 signature
of the manifest), stores the archive in the blob store and emits one `model packaged`.

- A package is a pure function of the event: `created_at` is the event's `occurred_at` and the
  archive is deterministic, so packaging the same event twice gives the same bytes.
- One package per (model, version, target, precision), recorded in `packages`: an event for a
  model already packaged re-announces the stored `model packaged` (redelivery is harmless); an
  artifact whose bytes differ from the packaged one is a conflict and is dead-lettered.
- The artifact's bytes are checked against its SHA-256 and size before they are signed.
- Without a signing key (see config.py) every event is dead-lettered with `signing_key_missing`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from visionloop.contracts import Artifact, Envelope, ModelConverted, ModelPackaged
from visionloop.libs import package, signing
from visionloop.libs.blob import BlobCorrupt, BlobError, BlobMissing
from visionloop.libs.bus import PermanentError, Runtime, Unit
from visionloop.libs.service import Adapters, ServiceSpec
from visionloop.services.packager.config import PackagePolicy, PackagerSettings

log = logging.getLogger(__name__)


# -- the decision: what a package holds --------------------------------------------------------------
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


# -- the service -----------------------------------------------------------------------------------------
def wire(runtime: Runtime, adapters: Adapters, config: PackagerSettings) -> None:
    """Register the packager's handler; load (or, on the embedded stack, create) the signing key."""
    settings = runtime.settings
    key, source = config.load_key(Path(settings.state_dir), embedded=settings.kafka_embedded or settings.embedded_kafka)
    if key is None:
        log.warning(
            "packager: no signing key configured (VL_PACKAGER_SIGNING_KEY_FILE): every model converted "
            "event will be dead-lettered with signing_key_missing"
        )
    else:
        log.info("packager: signing with key %s (from %s)", signing.key_id(key), source)
    blobs = adapters.blobs

    async def artifact_bytes(artifact: Artifact) -> bytes:
        try:
            data = await blobs.get(artifact.uri)
        except BlobMissing:
            raise  # maybe not there yet (another store's lag): retried, then dead-lettered
        except (BlobCorrupt, BlobError) as exc:
            raise PermanentError(f"artifact_unreadable: {exc}") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != artifact.sha256 or len(data) != artifact.size_bytes:
            raise PermanentError(
                f"artifact_checksum_mismatch: {artifact.uri} holds {len(data)} bytes with SHA-256 {actual}, "
                f"the event says {artifact.size_bytes} bytes with {artifact.sha256}: convert the model again"
            )
        return data

    async def on_converted(event: Envelope[ModelConverted], unit: Unit[ModelConverted]) -> None:
        """Package, sign and store every artifact of a converted model; announce each package."""
        converted, s = event.payload, unit.schema
        model = converted.lineage.model
        if not converted.artifacts:
            runtime.counters["nothing_to_package"] += 1
            return
        if key is None:
            raise PermanentError(
                "signing_key_missing: the packager has no signing key; set VL_PACKAGER_SIGNING_KEY_FILE "
                "(an Ed25519 PEM, `openssl genpkey -algorithm ed25519`) and replay this event"
            )
        policy = config.policy(event.project)
        for artifact in converted.artifacts:
            where = (model.model_id, model.version, artifact.target.value, artifact.precision.value)
            stored = await unit.conn.fetchrow(
                f"SELECT artifact_sha256, payload FROM {s}.packages WHERE model_id = $1 AND version = $2 AND target = $3 AND precision = $4",
                *where,
            )
            if stored is None:
                data = await artifact_bytes(artifact)
                built = await asyncio.to_thread(
                    package_artifact, converted, artifact, data, key,
                    project=event.project, created_at=event.occurred_at, policy=policy,
                )
                ref = await blobs.put(built.archive, content_type="application/x-tar")
                packaged = announcement(converted, artifact, built, ref.uri)
                inserted = await unit.conn.fetchval(
                    f"""INSERT INTO {s}.packages (model_id, version, target, precision, project, artifact_sha256,
                            package_sha256, package_uri, size_bytes, manifest_sha256, key_id, payload, created_at)
                        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12::jsonb, $13)
                        ON CONFLICT DO NOTHING RETURNING true""",
                    *where, event.project, artifact.sha256, built.sha256, ref.uri, built.size,
                    built.manifest_sha256, built.key_id, packaged.model_dump_json(), event.occurred_at,
                )
                if inserted:
                    unit.emit(packaged)
                    runtime.counters[f"packaged_{artifact.target.value}_{artifact.precision.value}"] += 1
                    continue
                # A replica packaged it concurrently: fall through to its stored answer.
                stored = await unit.conn.fetchrow(
                    f"SELECT artifact_sha256, payload FROM {s}.packages WHERE model_id = $1 AND version = $2 AND target = $3 AND precision = $4",
                    *where,
                )
            if stored["artifact_sha256"] != artifact.sha256:
                raise PermanentError(
                    f"package_conflict: {model.model_id} v{model.version} {artifact.target.value}/{artifact.precision.value} "
                    f"was packaged from artifact {stored['artifact_sha256']}, this event names {artifact.sha256}; "
                    "a model version is immutable: train or convert a new version"
                )
            unit.emit(ModelPackaged.model_validate_json(stored["payload"]))
            runtime.counters["reannounced"] += 1

    runtime.consume(ModelConverted, on_converted)
    runtime.produces(ModelPackaged)


SPEC = ServiceSpec(
    name="packager",
    description="Bundles each converted artifact with its manifest into a deterministic archive and signs it (Ed25519).",
    wire=wire,
    settings=PackagerSettings,
    migrations_dir=Path(__file__).parent / "migrations",
)
