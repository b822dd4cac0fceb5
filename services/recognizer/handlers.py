"""The recognizer's handlers, one per consumed topic: `image accepted` (record the decision and
emit `image recognized` or `image unrecognized`; recognising happened in `recognize.Recognizer.prepare`)
and `model registered` (reload the library)."""

from __future__ import annotations

import json
import logging

from visionloop.contracts import (
    Envelope,
    ImageAccepted,
    ImageRecognized,
    ImageUnrecognized,
    ModelRegistered,
    RecognitionMeta,
)
from visionloop.libs.bus import Unit
from visionloop.services.recognizer import store
from visionloop.services.recognizer.decide import agreement, recognize
from visionloop.services.recognizer.recognize import Models, Recognition, as_detections

log = logging.getLogger("visionloop.services.recognizer.service")


async def record(event: Envelope[ImageAccepted], unit: Unit[ImageAccepted], result: Recognition) -> None:
    """Write the decision (and the shadow answer) and emit `image recognized` or `image unrecognized`."""
    accepted = event.payload
    verdict, answer = result.verdict, result.answer
    meta = None
    if answer is not None:
        meta = RecognitionMeta(
            model=answer.entry.ref,
            model_sha256=answer.entry.artifact_sha256,
            conf_threshold=result.thresholds.conf_threshold,
            uncertainty=verdict.uncertainty,
            inference_ms=answer.inference_ms,
        )
    await store.record_recognition(
        unit.conn, unit.schema, event_id=event.event_id, image_id=accepted.image.image_id, project=event.project,
        outcome="recognized" if verdict.recognized else "unrecognized", reason=verdict.reason.value if verdict.reason else None,
        uncertainty=verdict.uncertainty, model_id=answer.entry.model_id if answer else None,
        model_version=answer.entry.version if answer else None, model_sha256=answer.entry.artifact_sha256 if answer else None,
        detections=len(verdict.found), inference_ms=answer.inference_ms if answer else None, batch_size=result.batch_size,
    )
    if result.shadow is not None:
        await _record_shadow(event, unit, result)
    class_names = answer.entry.class_names if answer else []
    if verdict.recognized:
        assert meta is not None
        unit.emit(ImageRecognized(
            image=accepted.image, source=accepted.source, prelabels=as_detections(verdict.prelabels),
            recognition=meta, class_names=class_names,
        ))
    else:
        assert verdict.reason is not None
        unit.emit(ImageUnrecognized(
            image=accepted.image, source=accepted.source, reason=verdict.reason, message=verdict.message,
            uncertainty=verdict.uncertainty, recognition=meta, detections=as_detections(verdict.found),
            class_names=class_names,
        ))


async def _record_shadow(event: Envelope[ImageAccepted], unit: Unit[ImageAccepted], result: Recognition) -> None:
    shadow = result.shadow
    assert shadow is not None
    candidate = recognize(shadow.answer.found, result.thresholds) if shadow.answer else None
    production_boxes = result.verdict.found if result.answer else ()
    await store.record_shadow(
        unit.conn, unit.schema, event_id=event.event_id, image_id=event.payload.image.image_id, project=event.project,
        candidate=(shadow.entry.model_id, shadow.entry.version, shadow.entry.artifact_sha256),
        outcome=None if candidate is None else ("recognized" if candidate.recognized else "unrecognized"),
        reason=candidate.reason.value if candidate and candidate.reason else None,
        uncertainty=candidate.uncertainty if candidate else None,
        detections=json.dumps([d.model_dump() for d in as_detections(candidate.found)] if candidate else []),
        production_outcome=("recognized" if result.verdict.recognized else f"unrecognized/{result.verdict.reason.value}"),  # type: ignore[union-attr]
        agreement=agreement(production_boxes, candidate.found) if candidate and result.answer else None,
        inference_ms=shadow.answer.inference_ms if shadow.answer else None,
        error=shadow.error,
    )


async def on_registered(models: Models, event: Envelope[ModelRegistered], unit: Unit[ModelRegistered]) -> None:
    """Reload the library when a model is registered or its aliases move (every instance)."""
    models.invalidate()
    log.info(
        "recognizer: %s v%s registered (%s); reloading the library",
        event.payload.lineage.model.model_id, event.payload.lineage.model.version,
        ", ".join(event.payload.aliases) or "no alias",
    )
