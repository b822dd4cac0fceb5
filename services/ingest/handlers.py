"""ingest's handler of `image submitted` (the submit topic): store the submitted image once and
describe it, or refuse it with a reason. The work is the intake's (`intake.py`), shared with the
HTTP API; the wiring binds it."""

from __future__ import annotations

from typing import Any

from visionloop.contracts import Envelope, ImageSubmitted
from visionloop.libs.bus import Unit
from visionloop.services.ingest.intake import Intake


async def on_submitted(intake: Intake, event: Envelope[ImageSubmitted], unit: Unit[Any]) -> None:
    """Store the submitted image once and describe it, or refuse it with a reason."""
    await intake.ingest_one(unit, project=event.project, submission=event.payload, channel="topic")
