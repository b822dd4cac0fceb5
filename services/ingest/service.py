"""ingest: step 1 of the loop. Every image that enters is stored once, or refused with a reason.

Consumes `image submitted`; emits `image ingested` (bytes stored content-addressed, image facts
measured) or `image rejected` (reason code and sentence).
"""

from __future__ import annotations

from pathlib import Path

from visionloop.contracts import (
    Envelope,
    ImageIngested,
    ImageRef,
    ImageRejected,
    ImageSubmitted,
    Stage,
)
from visionloop.libs.bus import Runtime, Unit
from visionloop.libs.service import Adapters, ServiceSpec
from visionloop.services.ingest.config import IngestSettings
from visionloop.services.ingest.inspect import Limits, Refusal, inspect_image
from visionloop.services.ingest.sources import read_source


def wire(runtime: Runtime, adapters: Adapters, config: IngestSettings) -> None:
    """Register ingest's handler on the runtime."""
    limits = Limits(
        max_bytes=config.max_bytes,
        max_pixels=config.max_pixels,
        max_frames=config.max_frames,
        formats=frozenset(f.upper() for f in config.formats),
    )

    async def on_submitted(event: Envelope[ImageSubmitted], unit: Unit[ImageSubmitted]) -> None:
        """Store the submitted image once and describe it, or refuse it with a reason."""
        submission = event.payload
        try:
            data = await read_source(
                submission,
                file_root=config.file_root,
                inline_max=config.inline_max_bytes,
                max_bytes=config.max_bytes,
            )
            facts = inspect_image(data, limits)
        except Refusal as refusal:
            await _record(unit, event, image_id=None, outcome="rejected", reason=refusal.reason.value)
            unit.emit(
                ImageRejected(
                    submission_id=submission.submission_id,
                    stage=Stage.INGEST,
                    reason=refusal.reason,
                    message=refusal.message,
                    source=submission.source,
                    details=refusal.details,
                )
            )
            return
        blob = await adapters.blobs.put(data)
        first = await unit.conn.fetchval(
            f"""INSERT INTO {unit.schema}.images
                    (image_id, blob_uri, width, height, format, byte_size, first_submission)
                VALUES ($1, $2, $3, $4, $5, $6, $7)
                ON CONFLICT (image_id) DO NOTHING RETURNING true""",
            facts.sha256, blob.uri, facts.width, facts.height, facts.format, facts.byte_size,
            submission.submission_id,
        )
        await _record(unit, event, image_id=facts.sha256, outcome="ingested", reason=None)
        unit.emit(
            ImageIngested(
                submission_id=submission.submission_id,
                image=ImageRef(
                    image_id=facts.sha256,
                    blob_uri=blob.uri,
                    width=facts.width,
                    height=facts.height,
                    format=facts.format,
                    byte_size=facts.byte_size,
                ),
                source=submission.source,
                already_stored=not first,
            ),
            correlation_id=facts.sha256,
        )

    runtime.consume(ImageSubmitted, on_submitted)
    runtime.produces(ImageIngested, ImageRejected)


async def _record(unit: Unit[ImageSubmitted], event: Envelope[ImageSubmitted], *, image_id: str | None, outcome: str, reason: str | None) -> None:
    await unit.conn.execute(
        f"""INSERT INTO {unit.schema}.submissions (submission_id, project, image_id, outcome, reason)
            VALUES ($1, $2, $3, $4, $5)
            ON CONFLICT (submission_id) DO UPDATE
            SET image_id = EXCLUDED.image_id, outcome = EXCLUDED.outcome, reason = EXCLUDED.reason,
                decided_at = now()""",
        event.payload.submission_id, event.project, image_id, outcome, reason,
    )


SPEC = ServiceSpec(
    name="ingest",
    description="Stores every submitted image once (content-addressed) or refuses it with a reason.",
    wire=wire,
    settings=IngestSettings,
    migrations_dir=Path(__file__).parent / "migrations",
)
