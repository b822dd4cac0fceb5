"""Every SQL statement of the recognizer (its schema: `recognitions`, `shadow`). The model
library is `libs/library.py`'s, read only."""

from __future__ import annotations

from typing import Any


async def record_recognition(conn: Any, s: str, *, event_id: Any, image_id: str, project: str, outcome: str, reason: str | None,
                             uncertainty: float | None, model_id: str | None, model_version: int | None, model_sha256: str | None,
                             detections: int, inference_ms: float | None, batch_size: int) -> None:
    """The image's decision."""
    await conn.execute(
        f"""INSERT INTO {s}.recognitions (event_id, image_id, project, outcome, reason, uncertainty,
                model_id, model_version, model_sha256, detections, inference_ms, batch_size)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)""",
        event_id, image_id, project, outcome, reason, uncertainty, model_id, model_version, model_sha256, detections,
        inference_ms, batch_size,
    )


async def record_shadow(conn: Any, s: str, *, event_id: Any, image_id: str, project: str, candidate: tuple[str, int, str],
                        outcome: str | None, reason: str | None, uncertainty: float | None, detections: str,
                        production_outcome: str, agreement: float | None, inference_ms: float | None, error: str | None) -> None:
    """What the candidate model would have decided for the same image."""
    await conn.execute(
        f"""INSERT INTO {s}.shadow (event_id, image_id, project, candidate_id, candidate_version,
                candidate_sha256, outcome, reason, uncertainty, detections, production_outcome, agreement,
                inference_ms, error)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::jsonb, $11, $12, $13, $14)""",
        event_id, image_id, project, *candidate, outcome, reason, uncertainty, detections, production_outcome, agreement,
        inference_ms, error,
    )
