"""The recognizer through the real broker and PostgreSQL, with a real (small, trained) detector:
hot reload while images flow, and bad inputs dead-lettered. Which model answers which image is
tested on the in-memory bus (test_recognizer_handlers.py)."""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from typing import Any

import pytest
from detector import not_a_detector, onnx_bytes, trained, variant
from helpers import Collector, Services, eventually, publish

from visionloop.contracts import (
    Alias,
    DeadLetter,
    Envelope,
    ImageAccepted,
    ImageHashes,
    ImageRecognized,
    ImageRef,
    ImageSource,
    ImageUnrecognized,
    topic_of,
)
from visionloop.libs.library import LibraryWriter, NewEntry, register
from visionloop.libs.scenes import render_scene
from visionloop.services.recognizer.config import RecognizerSettings

SEEN = ("circle", "square", "triangle")


@pytest.fixture(scope="module", autouse=True)
def _detector() -> None:
    trained()  # train (or load from the cache) before any test's clock starts


def _config(**overrides: Any) -> RecognizerSettings:
    return RecognizerSettings(batch_max=8, library_refresh_s=300, **overrides)


def _outcomes(settings) -> Collector:  # noqa: ANN001
    return Collector(settings, topic_of(ImageRecognized, settings.topic_prefix), topic_of(ImageUnrecognized, settings.topic_prefix))


async def _accepted(loop: Services, seed: int, *, domain: dict[str, str] | None = None, classes: tuple[str, ...] = SEEN,
                    background: str = "field") -> ImageAccepted:
    scene = render_scene(seed=seed, classes=classes, objects=(1, 3), size=(0.25, 0.5), background=background)
    data = scene.encode(quality=92)
    ref = await loop.adapters.blobs.put(data)
    return _event(ref.sha256, ref.uri, len(data), domain)


def _event(image_id: str, uri: str, size: int, domain: dict[str, str] | None = None) -> ImageAccepted:
    return ImageAccepted(
        submission_id=f"s-{image_id[:8]}",
        image=ImageRef(image_id=image_id, blob_uri=uri, width=320, height=240, format="JPEG", byte_size=size),
        source=ImageSource(domain=domain or {}),
        hashes=ImageHashes(phash="0" * 16),
    )


async def _send(settings, event: ImageAccepted, project: str) -> None:  # noqa: ANN001
    await publish(settings, event, project=project, key=event.image.image_id)


def _by_image(messages: list[dict]) -> dict[str, dict]:
    return {m["payload"]["image"]["image_id"]: m for m in messages}


async def test_hot_reload_while_images_flow(settings, pool) -> None:  # noqa: ANN001
    """A new production version registered mid-stream: no image lost or decided twice, and
    every image published after the recognizer heard of it is decided by the new version."""
    model = onnx_bytes()
    total, register_at, heard_by = 48, 16, 28
    async with Services(settings, pool, recognizer=_config(batch_wait_ms=5)) as loop, _outcomes(settings) as out:
        async with LibraryWriter(settings, pool=pool, blobs=loop.adapters.blobs) as library:
            await library.add(variant(model, "v1"), project="live", alias=Alias.PRODUCTION)
            runtime = await loop.start("recognizer")
            models = runtime.recognizer.models
            events = [await _accepted(loop, 9000 + n) for n in range(total)]
            for n, event in enumerate(events):
                if n == register_at:  # the stream keeps flowing while the version registers
                    registering = asyncio.create_task(library.add(variant(model, "v2"), project="live", alias=Alias.PRODUCTION))
                if n == heard_by:
                    await registering
                    await eventually(lambda: models.invalidations >= 1, timeout=15)
                await _send(settings, event, "live")
                await asyncio.sleep(0.02)
            messages = await out.wait(total, timeout=60)
            await asyncio.sleep(1.0)  # anything decided twice would show up now
            messages = list(out.messages)
    per_image = Counter(m["payload"]["image"]["image_id"] for m in messages)
    assert len(per_image) == total and set(per_image.values()) == {1}  # none lost, none twice
    assert set(per_image) == {e.image.image_id for e in events}
    version = {m["payload"]["image"]["image_id"]: m["payload"]["recognition"]["model"]["version"] for m in messages}
    assert version[events[0].image.image_id] == 1
    assert {version[e.image.image_id] for e in events[heard_by:]} == {2}
    assert runtime.counters.get("dead_lettered.handler_failed", 0) == 0
    assert models.reloads >= 2 and models.cache.loads == 2


async def test_bad_inputs_are_dead_lettered_with_a_reason_and_the_service_goes_on(settings, pool) -> None:  # noqa: ANN001
    model = onnx_bytes()
    async with Services(settings, pool, recognizer=_config()) as loop, _outcomes(settings) as out, \
            Collector(settings, topic_of(DeadLetter, settings.topic_prefix)) as dead:
        blobs = loop.adapters.blobs
        async with LibraryWriter(settings, pool=pool, blobs=blobs) as library:
            await library.add(model, project="good", alias=Alias.PRODUCTION)
            # an entry whose artifact does not hash to what was registered
            real = await blobs.put(variant(model, "tampered"))
            fake_sha = hashlib.sha256(b"what was signed").hexdigest()
            # an ONNX file that is not a detector, registered without validation
            classifier = await blobs.put(not_a_detector())
            async with library.runtime.transaction() as unit:
                await register(unit, NewEntry(model_id="tampered", project="tampered", class_names=list(SEEN), input_size=128,
                                              artifact_uri=real.uri, artifact_sha256=fake_sha), alias=Alias.PRODUCTION)
                await register(unit, NewEntry(model_id="classifier", project="classifier", class_names=["a", "b", "c"], input_size=64,
                                              artifact_uri=classifier.uri, artifact_sha256=classifier.sha256), alias=Alias.PRODUCTION)
        await loop.start("recognizer")

        missing_sha = hashlib.sha256(b"never stored").hexdigest()
        missing = _event(missing_sha, blobs.uri_for(missing_sha), 12)
        corrupt = await _accepted(loop, 42)
        blobs.path_for(corrupt.image.image_id).write_bytes(b"bit rot")  # the stored bytes changed
        garbage_ref = await blobs.put(b"this is not an image at all")
        garbage = _event(garbage_ref.sha256, garbage_ref.uri, garbage_ref.size)
        bad = {"blob_missing": (missing, "good"), "blob_corrupt": (corrupt, "good"), "image_undecodable": (garbage, "good"),
               "artifact_sha256_mismatch": (await _accepted(loop, 43), "tampered"),
               "not_a_detector": (await _accepted(loop, 44), "classifier")}
        for event, project in bad.values():
            await _send(settings, event, project)
        fine = await _accepted(loop, 45)
        await _send(settings, fine, "good")
        letters = await dead.wait(len(bad), timeout=30)
        outcome = _by_image(await out.wait(1))
        # the next image after the bad ones is decided as usual
        assert list(outcome) == [fine.image.image_id]
        assert outcome[fine.image.image_id]["payload"]["recognition"]["model"]["model_id"] == "good-detector"
        # once more: a broken model is remembered, not reloaded for every image
        await _send(settings, await _accepted(loop, 46), "tampered")
        letters = await dead.wait(len(bad) + 1, timeout=30)
    parsed = [Envelope[DeadLetter].model_validate(m).payload for m in letters]
    by_image: dict[str, Any] = {}
    for letter in parsed:
        original = Envelope[ImageAccepted].model_validate_json(letter.original.value_text)
        by_image[original.payload.image.image_id] = letter
    for reason, (event, _) in bad.items():
        letter = by_image[event.image.image_id]
        assert letter.message.split(": ", 2)[1] == reason, letter.message
        assert letter.attempts == 1 and letter.reason.value == "handler_failed"
        assert letter.error_type == ("ModelUnusable" if reason in ("artifact_sha256_mismatch", "not_a_detector") else "ImageUnreadable")
    assert all(len(letter.message) > 40 for letter in parsed)  # a sentence, not only a code
