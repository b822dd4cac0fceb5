"""dedup/quality's handler of `image ingested`: a resubmission is answered from the first
decision; otherwise the image is read and hashed (outside the project lock), then, under the
project's advisory lock, checked for exact and near duplicates and for quality, and the decision
recorded (`decide.py` decides, `store.py` holds the SQL). The context comes first; the wiring
binds it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from visionloop.contracts import (
    Envelope,
    ImageAccepted,
    ImageHashes,
    ImageIngested,
    ImageQuality,
    ImageRejected,
    ImageRejectReason,
    Stage,
)
from visionloop.libs.blob import BlobMissing, BlobStore
from visionloop.libs.bus import Unit
from visionloop.libs.perceptual import blur_variance, hash_image
from visionloop.services.dedup import store
from visionloop.services.dedup.config import DedupSettings
from visionloop.services.dedup.decide import ACCEPT, Verdict, check_exact, check_near, check_quality
from visionloop.services.dedup.index import HashIndex


class Indexes:
    """One in-memory index per project, kept in step with the `hashes` table."""

    def __init__(self) -> None:
        self._by_project: dict[str, HashIndex] = {}

    async def refreshed(self, unit: Unit[ImageIngested], project: str) -> HashIndex:
        """The project's index with every row committed so far (call under the project lock)."""
        index = self._by_project.setdefault(project, HashIndex())
        rows = await store.hashes_after(unit.conn, unit.schema, project, index.last_seq)
        if rows:
            index.add_many(
                [r["image_id"] for r in rows],
                np.array([r["phash"] for r in rows], dtype=np.int64).view(np.uint64),
                np.array([r["dhash"] for r in rows], dtype=np.int64).view(np.uint64),
            )
            index.last_seq = rows[-1]["seq"]
        return index


@dataclass
class Context:
    """The settings, the blob store and the per-project indexes of this process."""

    config: DedupSettings
    blobs: BlobStore
    indexes: Indexes = field(default_factory=Indexes)


async def on_ingested(ctx: Context, event: Envelope[ImageIngested], unit: Unit[ImageIngested]) -> None:
    """Decide whether a stored image is new and good enough, and say why not."""
    ingested = event.payload
    image = ingested.image
    project = event.project
    policy = ctx.config.policy(project)
    # A cheap look first: a resubmission needs no reading or hashing.
    earlier = await store.earlier(unit.conn, unit.schema, project, image.image_id, across=policy.across_projects)
    if earlier is not None:
        _reject(unit, ingested, check_exact(image.image_id, earlier[0], elsewhere=earlier[1]))
        return

    # Reading and hashing happen before the project lock is taken, so the lock is held only
    # for the decision itself.
    hashes, grey, verdict = None, None, ACCEPT
    try:
        hashes, grey = hash_image(await ctx.blobs.get(image.blob_uri))
    except BlobMissing as exc:
        verdict = Verdict(False, ImageRejectReason.BLOB_MISSING, str(exc))
    except (OSError, ValueError, SyntaxError) as exc:
        verdict = Verdict(False, ImageRejectReason.CORRUPT, f"the stored image does not decode: {exc}")
    blur = blur_variance(grey) if grey is not None and policy.min_blur_variance is not None else None

    await store.lock_project(unit.conn, project)
    earlier = await store.earlier(unit.conn, unit.schema, project, image.image_id, across=policy.across_projects)  # decisive now: under the lock
    if earlier is not None:
        # The first decision stays the image's decision; this sighting is only reported.
        _reject(unit, ingested, check_exact(image.image_id, earlier[0], elsewhere=earlier[1]))
        return
    if verdict.accepted:
        verdict = check_quality(image.width, image.height, blur, policy)
    if verdict.accepted:
        assert hashes is not None
        index = await ctx.indexes.refreshed(unit, project)
        verdict = check_near(index.nearest(hashes.phash, hashes.dhash, policy.near_duplicate_radius), policy)
    await store.record_decision(unit.conn, unit.schema, project, image.image_id, accepted=verdict.accepted,
                                reason=verdict.reason.value if verdict.reason else None,
                                duplicate_of=verdict.duplicate_of, distance=verdict.distance)
    if not verdict.accepted:
        _reject(unit, ingested, verdict)
        return
    assert hashes is not None
    await store.store_hashes(unit.conn, unit.schema, project, image.image_id, hashes)
    unit.emit(
        ImageAccepted(
            submission_id=ingested.submission_id,
            image=image,
            source=ingested.source,
            hashes=ImageHashes(phash=hashes.phash_hex, dhash=hashes.dhash_hex),
            quality=ImageQuality(blur_variance=blur),
        )
    )


def _reject(unit: Unit[ImageIngested], ingested: ImageIngested, verdict: Verdict) -> None:
    assert verdict.reason is not None
    unit.emit(
        ImageRejected(
            submission_id=ingested.submission_id,
            stage=Stage.DEDUP,
            reason=verdict.reason,
            message=verdict.message,
            image_id=ingested.image.image_id,
            source=ingested.source,
            duplicate_of=verdict.duplicate_of,
            hamming_distance=verdict.distance,
            details=verdict.details or {},
        )
    )
