"""Recognising a batch of accepted images (the batch consumer's `prepare` step, outside any
transaction): the library's snapshot, the models loaded once and cached, every image decoded, each
model run over its images in batches, the production answer decided and the candidate's shadowed."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from visionloop.contracts import (
    Detection,
    Envelope,
    ImageAccepted,
)
from visionloop.libs.blob import BlobError, BlobStore
from visionloop.libs.bus import PermanentError
from visionloop.libs.inference import Detector, InferenceError, SessionCache, decode_image
from visionloop.libs.library import Entry, ModelLibrary, Snapshot
from visionloop.services.recognizer.config import RecognizerSettings, Thresholds
from visionloop.services.recognizer.decide import Found, Verdict, recognize

log = logging.getLogger("visionloop.services.recognizer.service")


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


def as_detections(found: tuple[Found, ...]) -> list[Detection]:
    return [
        Detection(x1=f.x1, y1=f.y1, x2=f.x2, y2=f.y2, class_name=f.class_name, score=min(max(f.score, 0.0), 1.0))
        for f in found
    ]
