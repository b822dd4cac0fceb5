"""dedup/quality: step 2 of the loop. Only images worth a person's or a model's time go on.

Consumes `image ingested`; emits `image accepted` (with its hashes and quality) or `image
rejected` (`duplicate`, `near_duplicate`, `low_resolution`, `blurry`, `blob_missing`, `corrupt`).

Concurrency guarantee: decisions of one project are serialised across every replica by a
PostgreSQL advisory lock held for the decision's transaction, and each replica brings its
in-memory index up to date from the `hashes` table under that lock before it searches. So two
replicas never both accept the same image, nor two images within the near-duplicate radius of
each other: near-duplicate decisions are as if one consumer made them, in commit order. The
price is one decision at a time per project (about a millisecond each); projects proceed in
parallel.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

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
from visionloop.libs.blob import BlobMissing
from visionloop.libs.bus import Runtime, Unit
from visionloop.libs.service import Adapters, ServiceSpec
from visionloop.services.dedup.config import DedupSettings
from visionloop.services.dedup.decide import ACCEPT, Verdict, check_exact, check_near, check_quality
from visionloop.libs.perceptual import Hashes, blur_variance, hash_image
from visionloop.services.dedup.index import HashIndex


def _signed(value: int) -> int:
    """A 64-bit hash as PostgreSQL's signed bigint."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _lock_key(project: str) -> int:
    digest = hashlib.sha256(f"visionloop.dedup.{project}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class Indexes:
    """One in-memory index per project, kept in step with the `hashes` table."""

    def __init__(self) -> None:
        self._by_project: dict[str, HashIndex] = {}

    async def refreshed(self, unit: Unit[ImageIngested], project: str) -> HashIndex:
        """The project's index with every row committed so far (call under the project lock)."""
        index = self._by_project.setdefault(project, HashIndex())
        rows = await unit.conn.fetch(
            f"SELECT seq, image_id, phash, dhash FROM {unit.schema}.hashes "
            "WHERE project = $1 AND seq > $2 ORDER BY seq",
            project,
            index.last_seq,
        )
        if rows:
            index.add_many(
                [r["image_id"] for r in rows],
                np.array([r["phash"] for r in rows], dtype=np.int64).view(np.uint64),
                np.array([r["dhash"] for r in rows], dtype=np.int64).view(np.uint64),
            )
            index.last_seq = rows[-1]["seq"]
        return index


def wire(runtime: Runtime, adapters: Adapters, config: DedupSettings) -> None:
    """Register dedup/quality's handler on the runtime."""
    indexes = Indexes()

    async def on_ingested(event: Envelope[ImageIngested], unit: Unit[ImageIngested]) -> None:
        """Decide whether a stored image is new and good enough, and say why not."""
        ingested = event.payload
        image = ingested.image
        project = event.project
        policy = config.policy(project)
        # A cheap look first: a resubmission needs no reading or hashing.
        earlier = await _earlier(unit, project, image.image_id, across=policy.across_projects)
        if earlier is not None:
            _reject(unit, ingested, check_exact(image.image_id, earlier[0], elsewhere=earlier[1]))
            return

        # Reading and hashing happen before the project lock is taken, so the lock is held only
        # for the decision itself.
        hashes, grey, verdict = None, None, ACCEPT
        try:
            hashes, grey = hash_image(await adapters.blobs.get(image.blob_uri))
        except BlobMissing as exc:
            verdict = Verdict(False, ImageRejectReason.BLOB_MISSING, str(exc))
        except (OSError, ValueError, SyntaxError) as exc:
            verdict = Verdict(False, ImageRejectReason.CORRUPT, f"the stored image does not decode: {exc}")
        blur = blur_variance(grey) if grey is not None and policy.min_blur_variance is not None else None

        await unit.conn.execute("SELECT pg_advisory_xact_lock($1)", _lock_key(project))
        earlier = await _earlier(unit, project, image.image_id, across=policy.across_projects)  # decisive now: under the lock
        if earlier is not None:
            # The first decision stays the image's decision; this sighting is only reported.
            _reject(unit, ingested, check_exact(image.image_id, earlier[0], elsewhere=earlier[1]))
            return
        if verdict.accepted:
            verdict = check_quality(image.width, image.height, blur, policy)
        if verdict.accepted:
            assert hashes is not None
            index = await indexes.refreshed(unit, project)
            verdict = check_near(index.nearest(hashes.phash, hashes.dhash, policy.near_duplicate_radius), policy)
        await _decide(unit, project, image.image_id, verdict)
        if not verdict.accepted:
            _reject(unit, ingested, verdict)
            return
        assert hashes is not None
        await _store_hashes(unit, project, image.image_id, hashes)
        unit.emit(
            ImageAccepted(
                submission_id=ingested.submission_id,
                image=image,
                source=ingested.source,
                hashes=ImageHashes(phash=hashes.phash_hex, dhash=hashes.dhash_hex),
                quality=ImageQuality(blur_variance=blur),
            )
        )

    runtime.consume(ImageIngested, on_ingested)
    runtime.produces(ImageAccepted, ImageRejected)


async def _earlier(unit: Unit[ImageIngested], project: str, image_id: str, *, across: bool) -> tuple[str, bool] | None:
    """The first decision on these bytes in `project` (with `across`, in any project: its own
    first), and whether it was another project's; None when never seen."""
    row = await unit.conn.fetchrow(
        f"SELECT outcome, project <> $1 AS elsewhere FROM {unit.schema}.decisions "
        "WHERE image_id = $2 AND (project = $1 OR $3) ORDER BY project <> $1 LIMIT 1",
        project, image_id, across,
    )
    return None if row is None else (row["outcome"], row["elsewhere"])


async def _decide(unit: Unit[ImageIngested], project: str, image_id: str, verdict: Verdict) -> None:
    await unit.conn.execute(
        f"""INSERT INTO {unit.schema}.decisions (image_id, project, outcome, reason, duplicate_of, distance)
            VALUES ($1, $2, $3, $4, $5, $6)""",
        image_id,
        project,
        "accepted" if verdict.accepted else "rejected",
        verdict.reason.value if verdict.reason else None,
        verdict.duplicate_of,
        verdict.distance,
    )


async def _store_hashes(unit: Unit[ImageIngested], project: str, image_id: str, hashes: Hashes) -> None:
    await unit.conn.execute(
        f"INSERT INTO {unit.schema}.hashes (project, image_id, phash, dhash) VALUES ($1, $2, $3, $4)",
        project,
        image_id,
        _signed(hashes.phash),
        _signed(hashes.dhash),
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


SPEC = ServiceSpec(
    name="dedup",
    description="Drops exact and near duplicates and images below the project's quality floors.",
    wire=wire,
    settings=DedupSettings,
    migrations_dir=Path(__file__).parent / "migrations",
)
