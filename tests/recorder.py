"""A tiny test service: records every `image ingested` it handles in its own table.

Used by the bus tests (in-process and as a separate OS process) to observe effects.
"""

from __future__ import annotations

from pathlib import Path

import asyncpg

from visionloop.contracts import Envelope, ImageAccepted, ImageHashes, ImageIngested
from visionloop.libs.bus import Runtime, Unit
from visionloop.libs.db import Migration
from visionloop.libs.settings import Settings

MIGRATIONS = Path(__file__).parent / "recorder_migrations"


def recorder(settings: Settings, pool: asyncpg.Pool, *, fail_for: set[str] | None = None, attempts: list[str] | None = None) -> Runtime:
    """A runtime named `recorder` that stores each ingested image id and emits `image accepted`.

    `fail_for`: image ids whose handling always raises (to exercise retries and dead letters).
    `attempts`: appended with the image id on every handler attempt.
    """
    runtime = Runtime(
        "recorder",
        settings,
        pool=pool,
        migrations=[Migration("recorder", p) for p in sorted(MIGRATIONS.glob("*.sql"))],
    )

    async def on_ingested(event: Envelope[ImageIngested], unit: Unit[ImageIngested]) -> None:
        image_id = event.payload.image.image_id
        if attempts is not None:
            attempts.append(image_id)
        await unit.conn.execute(
            f"INSERT INTO {unit.schema}.effects (image_id, event_id) VALUES ($1, $2)",
            image_id,
            event.event_id,
        )
        if fail_for and image_id in fail_for:
            raise RuntimeError(f"refusing {image_id[:8]} on purpose")
        unit.emit(
            ImageAccepted(
                submission_id=event.payload.submission_id,
                image=event.payload.image,
                source=event.payload.source,
                hashes=ImageHashes(phash="0" * 16),
            )
        )

    runtime.consume(ImageIngested, on_ingested)
    runtime.produces(ImageAccepted)
    return runtime


async def effects(pool: asyncpg.Pool, settings: Settings) -> list[str]:
    """Image ids recorded, in order (a duplicate effect shows up twice)."""
    schema = settings.schema_for("recorder")
    try:
        rows = await pool.fetch(f'SELECT image_id FROM "{schema}".effects ORDER BY id')
    except asyncpg.UndefinedTableError:
        return []
    return [r["image_id"] for r in rows]
