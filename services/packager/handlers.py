"""The packager's handler of `model converted`: package, sign and store each artifact once, and
announce it (again, for a redelivered event). The context comes first; the wiring binds it."""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from visionloop.contracts import Artifact, Envelope, ModelConverted, ModelPackaged
from visionloop.libs.blob import BlobCorrupt, BlobError, BlobMissing, BlobStore
from visionloop.libs.bus import PermanentError, Unit
from visionloop.services.packager import store
from visionloop.services.packager.config import PackagerSettings
from visionloop.services.packager.decide import announcement, package_artifact


@dataclass
class Context:
    """The settings, the signing key (None: not configured), the blob store, the counters."""

    config: PackagerSettings
    key: Ed25519PrivateKey | None
    blobs: BlobStore
    counters: Counter[str]


async def on_converted(ctx: Context, event: Envelope[ModelConverted], unit: Unit[ModelConverted]) -> None:
    """Package, sign and store every artifact of a converted model; announce each package."""
    converted = event.payload
    if not converted.artifacts:
        ctx.counters["nothing_to_package"] += 1
        return
    if ctx.key is None:
        raise PermanentError(
            "signing_key_missing: the packager has no signing key; set VL_PACKAGER_SIGNING_KEY_FILE "
            "(an Ed25519 PEM, `openssl genpkey -algorithm ed25519`) and replay this event"
        )
    for artifact in converted.artifacts:
        await _package(ctx, event, unit, artifact, ctx.key)


async def _package(ctx: Context, event: Envelope[ModelConverted], unit: Unit[ModelConverted], artifact: Artifact,
                   key: Ed25519PrivateKey) -> None:
    converted, s = event.payload, unit.schema
    model = converted.lineage.model
    found = await store.stored(unit.conn, s, model, artifact)
    if found is None:
        data = await _artifact_bytes(ctx, artifact)
        built = await asyncio.to_thread(
            package_artifact, converted, artifact, data, key,
            project=event.project, created_at=event.occurred_at, policy=ctx.config.policy(event.project),
        )
        ref = await ctx.blobs.put(built.archive, content_type="application/x-tar")
        packaged = announcement(converted, artifact, built, ref.uri)
        if await store.record(unit.conn, s, model, artifact, project=event.project, built=built, uri=ref.uri, packaged=packaged,
                              created_at=event.occurred_at):
            unit.emit(packaged)
            ctx.counters[f"packaged_{artifact.target.value}_{artifact.precision.value}"] += 1
            return
        # A replica packaged it concurrently: fall through to its stored answer.
        found = await store.stored(unit.conn, s, model, artifact)
    if found["artifact_sha256"] != artifact.sha256:
        raise PermanentError(
            f"package_conflict: {model.model_id} v{model.version} {artifact.target.value}/{artifact.precision.value} "
            f"was packaged from artifact {found['artifact_sha256']}, this event names {artifact.sha256}; "
            "a model version is immutable: train or convert a new version"
        )
    unit.emit(ModelPackaged.model_validate_json(found["payload"]))
    ctx.counters["reannounced"] += 1


async def _artifact_bytes(ctx: Context, artifact: Artifact) -> bytes:
    try:
        data = await ctx.blobs.get(artifact.uri)
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
