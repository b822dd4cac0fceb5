"""recognizer: step 3 of the loop. The library's model for each image says whether it recognises it.

Consumes `image accepted` (in micro-batches) and `model registered` (to reload); emits `image
recognized` (pre-labels, model, uncertainty) or `image unrecognized` (reason, score, whatever the
model found).

For each batch of accepted images (`Runtime.consume_batch`: up to `batch_max` images, or what
arrives within `batch_wait_ms`):

1. the library snapshot picks each image's production and candidate model by project, domain
   tags and target (`libs/library.py`);
2. the images' blobs are read and decoded, and each model runs once on all the images routed to
   it (`libs/inference.py`, sessions cached per artifact SHA-256), outside any transaction;
3. `decide.recognize` makes each image's decision; then every image's decision row, shadow row
   and emitted event commit together with the batch's inbox rows, and only then are the offsets
   committed. An image whose blob is missing or unreadable, or whose model cannot run (artifact
   missing, SHA-256 mismatch, not a detector), is dead-lettered with a reason code; the others
   of its batch go on.

Hot reload: `model registered` (read by every instance, in a consumer group of its own) marks
the library snapshot stale; the next batch reads it again and loads new artifacts. A batch in
flight finishes with the models it started with, so no image is dropped or decided twice.
"""

from __future__ import annotations

from pathlib import Path

from visionloop.contracts import ImageAccepted, ImageRecognized, ImageUnrecognized, ModelRegistered
from visionloop.libs.bus import Runtime
from visionloop.libs.library import SERVICE as LIBRARY
from visionloop.libs.library import ModelLibrary
from visionloop.libs.service import Adapters, ServiceSpec, bound
from visionloop.services.recognizer import handlers
from visionloop.services.recognizer.config import RecognizerSettings
from visionloop.services.recognizer.recognize import Models, Recognizer


def wire(runtime: Runtime, adapters: Adapters, config: RecognizerSettings) -> None:
    """Register the recognizer's handlers on the runtime."""
    library = ModelLibrary(runtime.pool, runtime.settings.schema_for(LIBRARY)) if runtime.pool else None
    models = Models(library, adapters.blobs, config)
    recognizer = Recognizer(models, adapters.blobs, config)
    runtime.recognizer = recognizer  # type: ignore[attr-defined]  # for tests and the benchmark
    runtime.consume_batch(
        ImageAccepted,
        handlers.record,
        prepare=recognizer.prepare,
        max_records=config.batch_max,
        max_wait_ms=config.batch_wait_ms,
        description="Decide whether the library's model recognises each accepted image (micro-batched).",
    )
    # Every instance must hear of every registration: a consumer group per instance.
    runtime.consume(
        ModelRegistered,
        bound(handlers.on_registered, models),
        group=f"{runtime.settings.topic_prefix}recognizer.model.registered.{runtime.settings.instance}",
    )
    runtime.produces(ImageRecognized, ImageUnrecognized)


SPEC = ServiceSpec(
    name="recognizer",
    description="Picks the library's model for each accepted image and decides whether it recognises it.",
    wire=wire,
    settings=RecognizerSettings,
    migrations_dir=Path(__file__).parent / "migrations",
)
