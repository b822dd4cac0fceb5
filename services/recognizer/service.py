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

import asyncio
import hashlib
import json
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visionloop.contracts import (
    Detection,
    Envelope,
    ImageAccepted,
    ImageRecognized,
    ImageUnrecognized,
    ModelRegistered,
    RecognitionMeta,
)
from visionloop.libs.blob import BlobError, BlobStore
from visionloop.libs.bus import PermanentError, Runtime, Unit
from visionloop.libs.inference import Detector, InferenceError, SessionCache, decode_image
from visionloop.libs.library import SERVICE as LIBRARY, Entry, ModelLibrary, Snapshot
from visionloop.libs.service import Adapters, ServiceSpec
from visionloop.services.recognizer.config import RecognizerSettings, Thresholds
from visionloop.services.recognizer.decide import Found, Verdict, agreement, recognize

log = logging.getLogger(__name__)


class ImageUnreadable(PermanentError):
    """The image's blob is missing, damaged or not an image: dead-lettered, with `reason`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class ModelUnusable(PermanentError):
    """The selected model cannot run (artifact missing, hash mismatch, not a detector): dead-lettered."""

    def __init__(self, reason: str, entry: Entry, message: str) -> None:
        super().__init__(f"{reason}: {entry.label} ({entry.target.value}): {message}")
        self.reason = reason


class Models:
    """The library as this process sees it, and the detectors it has loaded."""

    def __init__(self, library: ModelLibrary | None, blobs: BlobStore, config: RecognizerSettings) -> None:
        self.library = library
        self.blobs = blobs
        self.config = config
        self.cache = SessionCache(config.max_models)
        self._snapshot = Snapshot()
        self._stale = True
        self._broken: dict[str, ModelUnusable] = {}
        self._lock = asyncio.Lock()
        self.reloads = 0
        self.invalidations = 0

    def invalidate(self) -> None:
        """The library changed: read it again before the next batch."""
        self._stale = True
        self.invalidations += 1

    async def snapshot(self) -> Snapshot:
        """The library's aliased entries, read again when stale or older than `library_refresh_s`."""
        async with self._lock:
            age = time.monotonic() - self._snapshot.taken_at
            if self._stale or age > self.config.library_refresh_s:
                assert self.library is not None
                self._stale = False
                self._snapshot = await self.library.snapshot()
                self._broken.clear()  # a re-registered artifact gets another chance
                self.reloads += 1
            return self._snapshot

    async def detector(self, entry: Entry) -> Detector:
        """The loaded detector of `entry`: its artifact read, its SHA-256 checked, validated."""
        sha = entry.artifact_sha256
        # One session per artifact; the key also holds what the entry says about it, so two
        # entries that disagree on an artifact's classes or input size never share a detector.
        key = f"{sha}:{entry.input_size}:{hashlib.sha256(json.dumps(entry.class_names).encode()).hexdigest()[:12]}"
        loaded = self.cache.peek(key)
        if loaded is not None:
            return loaded
        if key in self._broken:
            raise self._broken[key]
        try:
            data = await self.blobs.get(entry.artifact_uri)
        except BlobError as exc:
            if exc.reason == "blob_store_error":
                raise  # the store is unwell, not the model: retried, not remembered
            raise self._remember(key, ModelUnusable(f"artifact_{exc.reason.removeprefix('blob_')}", entry, str(exc))) from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha:
            raise self._remember(key, ModelUnusable(
                "artifact_sha256_mismatch",
                entry,
                f"the artifact at {entry.artifact_uri} hashes to {actual}, but the library registered "
                f"{sha}; register the model again from its original file",
            ))

        config = self.config
        on_gpu = config.providers[0] != "CPUExecutionProvider"
        by_image = not on_gpu and config.cpu_parallelism == "images"
        total = config.threads or os.cpu_count() or 1

        def load() -> Detector:
            return Detector(
                data, class_names=entry.class_names, imgsz=entry.input_size,
                threads=1 if by_image else config.threads, workers=total if by_image else 1,
                providers=config.providers, spinning=config.spinning,
            )

        try:
            return await asyncio.to_thread(self.cache.get, key, load)
        except InferenceError as exc:
            raise self._remember(key, ModelUnusable(exc.reason, entry, exc.args[0])) from None

    def _remember(self, key: str, error: ModelUnusable) -> ModelUnusable:
        self._broken[key] = error
        return error


@dataclass(frozen=True)
class Answer:
    """One model's answer on one image."""

    entry: Entry
    found: tuple[Found, ...]
    inference_ms: float


@dataclass(frozen=True)
class Shadow:
    """The candidate's answer (or why it has none), recorded next to production's decision."""

    entry: Entry
    answer: Answer | None
    error: str | None = None


@dataclass(frozen=True)
class Recognition:
    """What `prepare` found for one image; the handler records it and emits the event."""

    thresholds: Thresholds
    verdict: Verdict
    answer: Answer | None
    shadow: Shadow | None
    batch_size: int = 1


class Recognizer:
    """The batch work: select, read, infer, decide. No transaction, no durable effect."""

    def __init__(self, models: Models, blobs: BlobStore, config: RecognizerSettings) -> None:
        self.models = models
        self.blobs = blobs
        self.config = config

    async def prepare(self, events: list[Envelope[ImageAccepted]]) -> list[Recognition | BaseException]:
        """One result per event, in order: a `Recognition` or the exception that event met."""
        snapshot = await self.models.snapshot()
        selections = [
            snapshot.select(e.project, e.payload.source.domain, self.config.target) for e in events
        ]
        thresholds = [self.config.thresholds(e.project) for e in events]
        results: list[Recognition | BaseException | None] = [None] * len(events)
        wanted = [
            i for i, s in enumerate(selections)
            if s.production is not None or (self.config.shadow and s.candidate is not None)
        ]
        images = await self._images([events[i] for i in wanted])
        pixels: dict[int, np.ndarray] = {}
        for i, image in zip(wanted, images, strict=True):
            if isinstance(image, BaseException):
                results[i] = image
            else:
                pixels[i] = image
        production = await self._run(
            {i: s.production for i, s in enumerate(selections) if s.production is not None and i in pixels},
            pixels, thresholds,
        )
        shadows: dict[int, Answer | BaseException] = {}
        if self.config.shadow:
            shadows = await self._run(
                {i: s.candidate for i, s in enumerate(selections) if s.candidate is not None and i in pixels},
                pixels, thresholds,
            )
        for i, event in enumerate(events):
            if results[i] is not None:
                continue
            selection = selections[i]
            answer = production.get(i)
            if isinstance(answer, BaseException):
                results[i] = answer
                continue
            verdict = recognize(answer.found if answer else None, thresholds[i])
            shadow = None
            if selection.candidate is not None and self.config.shadow:
                got = shadows.get(i)
                shadow = (
                    Shadow(selection.candidate, None, str(got)) if isinstance(got, BaseException)
                    else Shadow(selection.candidate, got)
                )
            results[i] = Recognition(thresholds[i], verdict, answer, shadow, len(events))
        return results  # type: ignore[return-value]

    async def _images(self, events: list[Envelope[ImageAccepted]]) -> list[np.ndarray | BaseException]:
        """Read every image's blob (concurrently) and decode them all in one worker thread."""
        fetched = await asyncio.gather(
            *(self.blobs.get(e.payload.image.blob_uri) for e in events), return_exceptions=True
        )
        raw: list[bytes | BaseException] = []
        for event, data in zip(events, fetched, strict=True):
            if isinstance(data, BlobError) and data.reason != "blob_store_error":  # that one is retried
                raw.append(ImageUnreadable(data.reason, str(data)))
            elif isinstance(data, BaseException):
                raw.append(data)
            elif self.blobs.resolve(event.payload.image.blob_uri) != event.payload.image.image_id:
                raw.append(ImageUnreadable(
                    "image_id_mismatch",
                    f"the blob {event.payload.image.blob_uri} does not hold image {event.payload.image.image_id}",
                ))
            else:
                raw.append(data)

        def decode_all() -> list[np.ndarray | BaseException]:
            out: list[np.ndarray | BaseException] = []
            for data in raw:
                if isinstance(data, BaseException):
                    out.append(data)
                    continue
                try:
                    out.append(decode_image(data))
                except InferenceError as exc:
                    out.append(ImageUnreadable(exc.reason, exc.args[0]))
            return out

        return await asyncio.to_thread(decode_all)

    async def _run(
        self, routed: dict[int, Entry], pixels: dict[int, np.ndarray], thresholds: list[Thresholds]
    ) -> dict[int, Answer | BaseException]:
        """Each model once on all the images routed to it (grouped by artifact and NMS settings)."""
        groups: dict[tuple[str, float, int], list[int]] = defaultdict(list)
        for i, entry in routed.items():
            groups[(entry.artifact_sha256, thresholds[i].iou_threshold, thresholds[i].max_detections)].append(i)
        answers: dict[int, Answer | BaseException] = {}
        for (_, iou, max_det), members in groups.items():
            entry = routed[members[0]]
            try:
                detector = await self.models.detector(entry)
            except ModelUnusable as exc:
                answers.update({i: exc for i in members})
                continue
            images = [pixels[i] for i in members]
            confs = [thresholds[i].uncertain_low for i in members]
            start = time.perf_counter()
            chunk = self.config.inference_batch or (len(images) if detector.on_gpu else 1)
            detections = await asyncio.to_thread(
                detector.predict, images, conf=confs, iou=iou, max_det=max_det, chunk=chunk
            )
            per_image = (time.perf_counter() - start) * 1000 / len(members)
            for i, found in zip(members, detections, strict=True):
                names = detector.class_names
                boxes = tuple(
                    Found(float(b[0]), float(b[1]), float(b[2]), float(b[3]), names[int(c)], float(s))
                    for b, s, c in zip(found.boxes, found.scores, found.classes, strict=True)
                )
                answers[i] = Answer(routed[i], boxes, round(per_image, 3))
        return answers


def _detections(found: tuple[Found, ...]) -> list[Detection]:
    return [
        Detection(x1=f.x1, y1=f.y1, x2=f.x2, y2=f.y2, class_name=f.class_name, score=min(max(f.score, 0.0), 1.0))
        for f in found
    ]


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
    await unit.conn.execute(
        f"""INSERT INTO {unit.schema}.recognitions (event_id, image_id, project, outcome, reason, uncertainty,
                model_id, model_version, model_sha256, detections, inference_ms, batch_size)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)""",
        event.event_id, accepted.image.image_id, event.project,
        "recognized" if verdict.recognized else "unrecognized",
        verdict.reason.value if verdict.reason else None, verdict.uncertainty,
        answer.entry.model_id if answer else None, answer.entry.version if answer else None,
        answer.entry.artifact_sha256 if answer else None, len(verdict.found),
        answer.inference_ms if answer else None, result.batch_size,
    )
    if result.shadow is not None:
        await _record_shadow(event, unit, result)
    class_names = answer.entry.class_names if answer else []
    if verdict.recognized:
        assert meta is not None
        unit.emit(ImageRecognized(
            image=accepted.image, source=accepted.source, prelabels=_detections(verdict.prelabels),
            recognition=meta, class_names=class_names,
        ))
    else:
        assert verdict.reason is not None
        unit.emit(ImageUnrecognized(
            image=accepted.image, source=accepted.source, reason=verdict.reason, message=verdict.message,
            uncertainty=verdict.uncertainty, recognition=meta, detections=_detections(verdict.found),
            class_names=class_names,
        ))


async def _record_shadow(event: Envelope[ImageAccepted], unit: Unit[ImageAccepted], result: Recognition) -> None:
    shadow = result.shadow
    assert shadow is not None
    candidate = recognize(shadow.answer.found, result.thresholds) if shadow.answer else None
    production_boxes = result.verdict.found if result.answer else ()
    await unit.conn.execute(
        f"""INSERT INTO {unit.schema}.shadow (event_id, image_id, project, candidate_id, candidate_version,
                candidate_sha256, outcome, reason, uncertainty, detections, production_outcome, agreement,
                inference_ms, error)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::jsonb, $11, $12, $13, $14)""",
        event.event_id, event.payload.image.image_id, event.project,
        shadow.entry.model_id, shadow.entry.version, shadow.entry.artifact_sha256,
        None if candidate is None else ("recognized" if candidate.recognized else "unrecognized"),
        candidate.reason.value if candidate and candidate.reason else None,
        candidate.uncertainty if candidate else None,
        json.dumps([d.model_dump() for d in _detections(candidate.found)] if candidate else []),
        ("recognized" if result.verdict.recognized else f"unrecognized/{result.verdict.reason.value}"),  # type: ignore[union-attr]
        agreement(production_boxes, candidate.found) if candidate and result.answer else None,
        shadow.answer.inference_ms if shadow.answer else None,
        shadow.error,
    )


def wire(runtime: Runtime, adapters: Adapters, config: RecognizerSettings) -> None:
    """Register the recognizer's handlers on the runtime."""
    library = ModelLibrary(runtime.pool, runtime.settings.schema_for(LIBRARY)) if runtime.pool else None
    models = Models(library, adapters.blobs, config)
    recognizer = Recognizer(models, adapters.blobs, config)
    runtime.recognizer = recognizer  # type: ignore[attr-defined]  # for tests and the benchmark

    async def on_registered(event: Envelope[ModelRegistered], unit: Unit[ModelRegistered]) -> None:
        """Reload the library when a model is registered or its aliases move (every instance)."""
        models.invalidate()
        log.info(
            "recognizer: %s v%s registered (%s); reloading the library",
            event.payload.lineage.model.model_id, event.payload.lineage.model.version,
            ", ".join(event.payload.aliases) or "no alias",
        )

    runtime.consume_batch(
        ImageAccepted,
        record,
        prepare=recognizer.prepare,
        max_records=config.batch_max,
        max_wait_ms=config.batch_wait_ms,
        description="Decide whether the library's model recognises each accepted image (micro-batched).",
    )
    # Every instance must hear of every registration: a consumer group per instance.
    runtime.consume(
        ModelRegistered,
        on_registered,
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
