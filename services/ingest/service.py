"""ingest: step 1 of the loop. Every image that enters is stored once, or refused with a reason.

Consumes `image submitted` (the submit topic) and serves `POST /v1/images` (its HTTP API);
both go through one `Intake` (intake.py) and emit `image ingested` (bytes stored
content-addressed, image facts measured) or `image rejected` (reason code and sentence).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from visionloop.contracts import ImageIngested, ImageRejected, ImageSubmitted
from visionloop.libs.bus import Runtime
from visionloop.libs.service import Adapters, ServiceSpec, bound
from visionloop.services.ingest import handlers
from visionloop.services.ingest.api import http_app
from visionloop.services.ingest.config import IngestSettings
from visionloop.services.ingest.intake import Intake


def wire(runtime: Runtime, adapters: Adapters, config: IngestSettings, *, intake: Intake | None = None) -> FastAPI:
    """Register ingest's handler on the runtime; return its HTTP app.

    `intake` replaces the one built from `config` (tests pin host names with a fake resolver).
    """
    intake = intake or Intake(config, adapters.blobs)
    runtime.consume(ImageSubmitted, bound(handlers.on_submitted, intake))
    runtime.produces(ImageIngested, ImageRejected)
    return http_app(runtime, intake)


SPEC = ServiceSpec(
    name="ingest",
    description="Stores every submitted image once (content-addressed) or refuses it with a reason.",
    wire=wire,
    settings=IngestSettings,
    migrations_dir=Path(__file__).parent / "migrations",
)
