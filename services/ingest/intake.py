"""Taking one submission in: the work the submit topic and `POST /v1/images` share.

Two steps, so the HTTP API can keep its database transaction short:

1. `examine` (no database): read the bytes, judge them, store them content-addressed.
2. `record` (inside the caller's transaction): apply the resubmission rule, write ingest's
   tables and emit `image ingested` or `image rejected` through the outbox.

`ingest_one` is both, for the topic handler, whose transaction the bus already holds.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from typing import Any

from visionloop.contracts import (
    ImageIngested,
    ImageRef,
    ImageRejected,
    ImageRejectReason,
    ImageSubmitted,
    Stage,
)
from visionloop.libs.blob import BlobStore
from visionloop.libs.bus import Unit
from visionloop.services.ingest import store
from visionloop.services.ingest.config import IngestSettings
from visionloop.services.ingest.inspect import ImageFacts, Limits, Refusal, inspect_image
from visionloop.services.ingest.decide import Prior, Resubmission, project_problem, resubmission
from visionloop.services.ingest.sources import Sources

Answer = ImageIngested | ImageRejected
"""What a submission comes to: the payload emitted for it (or recorded, on a replay)."""


@dataclass(frozen=True)
class Examined:
    """A submission after its bytes were read, judged and (if good) stored."""

    content_sha256: str | None
    """SHA-256 of the bytes read; None when refused before any were."""
    facts: ImageFacts | None = None
    blob_uri: str | None = None
    refusal: Refusal | None = None


@dataclass(frozen=True)
class Outcome:
    """What `record` decided for one submission."""

    answer: Answer
    replayed: bool = False
    """True when the same bytes came under the same id before: `answer` is the recorded one."""


class Intake:
    """ingest's use case, built once per service from its settings and adapters."""

    def __init__(self, config: IngestSettings, blobs: BlobStore, sources: Sources | None = None) -> None:
        """`sources` defaults to one built from `config` (tests pass one with a fake resolver)."""
        self.config = config
        self.blobs = blobs
        self.sources = sources or Sources(config)
        self.limits = Limits(
            max_bytes=config.max_bytes,
            max_pixels=config.max_pixels,
            max_frames=config.max_frames,
            formats=frozenset(config.formats),
        )

    async def examine(self, submission: ImageSubmitted, *, inline_max: int) -> Examined:
        """Read, judge and store the submission's bytes; a refusal is a result, not an error.

        Blob store failures raise: they are the platform's, and the caller retries.
        """
        try:
            data = await self.sources.read(submission, inline_max=inline_max)
        except Refusal as refusal:
            return Examined(content_sha256=None, refusal=refusal)
        try:
            # Decoding is CPU work: keep the event loop (HTTP, heartbeats) responsive.
            facts = await asyncio.to_thread(inspect_image, data, self.limits)
        except Refusal as refusal:
            return Examined(content_sha256=hashlib.sha256(data).hexdigest(), refusal=refusal)
        blob = await self.blobs.put(data)
        return Examined(content_sha256=facts.sha256, facts=facts, blob_uri=blob.uri)

    async def record(
        self, unit: Unit[Any], *, project: str, submission: ImageSubmitted, examined: Examined, channel: str
    ) -> Outcome:
        """Decide and record the submission in `unit`'s transaction; emit its answer.

        Same id and same bytes: the recorded answer again, nothing emitted. An id that already
        brought in other bytes: `image rejected` (`invalid_submission`), the record unchanged.
        """
        conn, schema = unit.conn, unit.schema
        sid = submission.submission_id
        # Serialises attempts on one submission id (HTTP and topic alike) until commit.
        await store.lock_submission(conn, f"{unit.runtime.schema}/{project}/{sid}")
        row = await store.submission(conn, schema, project, sid)
        prior = Prior(row["outcome"], row["content_sha256"], row["answer"] is not None) if row else None
        decision = resubmission(prior, examined.content_sha256)
        if decision is Resubmission.REPLAY:
            assert row is not None
            model = ImageIngested if row["outcome"] == "ingested" else ImageRejected
            return Outcome(model.model_validate_json(row["answer"]), replayed=True)
        if decision is Resubmission.CONFLICT:
            assert prior is not None
            conflict = Refusal(
                ImageRejectReason.INVALID_SUBMISSION,
                f"submission id {sid} was already used for image {prior.content_sha256}; "
                "resend those same bytes to get that answer again, or use a new submission id",
                {"conflict": True, "ingested_image_id": prior.content_sha256},
            )
            answer: Answer = _rejected(submission, conflict, examined.content_sha256)
            unit.emit(answer, project=project)
            return Outcome(answer)

        if examined.refusal is not None:
            answer = _rejected(submission, examined.refusal, examined.content_sha256)
            image_id = None
        else:
            answer = await _ingested(unit, project, submission, examined)
            image_id = answer.image.image_id
        outcome = "ingested" if isinstance(answer, ImageIngested) else "rejected"
        await store.record_submission(
            conn, schema, submission_id=sid, project=project, image_id=image_id, outcome=outcome,
            reason=answer.reason.value if isinstance(answer, ImageRejected) else None,
            content_sha256=examined.content_sha256, answer=answer.model_dump_json(), channel=channel,
        )
        unit.emit(answer, project=project, correlation_id=image_id)
        return Outcome(answer)

    async def ingest_one(self, unit: Unit[Any], *, project: str, submission: ImageSubmitted, channel: str) -> Outcome:
        """`examine` then `record`, in the caller's transaction (the topic handler's way)."""
        refusal = project_problem(project)
        examined = (Examined(content_sha256=None, refusal=refusal) if refusal is not None
                    else await self.examine(submission, inline_max=self.config.inline_max_bytes))
        return await self.record(unit, project=project, submission=submission, examined=examined, channel=channel)


async def _ingested(unit: Unit[Any], project: str, submission: ImageSubmitted, examined: Examined) -> ImageIngested:
    """Store the image's record (once for ingest) and say whether this project had it already."""
    facts, blob_uri = examined.facts, examined.blob_uri
    assert facts is not None and blob_uri is not None
    first = await store.store_image(unit.conn, unit.schema, image_id=facts.sha256, blob_uri=blob_uri, width=facts.width,
                                    height=facts.height, format=facts.format, byte_size=facts.byte_size,
                                    submission_id=submission.submission_id)
    # Stored before *for this project*: whether another project has the bytes is not this one's business.
    seen_here = not first and await store.ingested_in(unit.conn, unit.schema, project, facts.sha256)
    return ImageIngested(
        submission_id=submission.submission_id,
        image=ImageRef(image_id=facts.sha256, blob_uri=blob_uri, width=facts.width, height=facts.height,
                       format=facts.format, byte_size=facts.byte_size),
        source=submission.source,
        already_stored=bool(seen_here),
    )


def _rejected(submission: ImageSubmitted, refusal: Refusal, content_sha256: str | None) -> ImageRejected:
    return ImageRejected(
        submission_id=submission.submission_id,
        stage=Stage.INGEST,
        reason=refusal.reason,
        message=refusal.message[:1024],
        image_id=content_sha256,
        source=submission.source,
        details=refusal.details,
    )
