"""The recognizer's handlers on the in-memory bus (libs/bus/fake.py: its own wiring, its SQL on
PostgreSQL, no Kafka) with a real (small, trained) detector: which model answers for which image,
and what an image no model knows becomes. Hot reload under a flowing stream and dead letters
are in test_recognizer.py, over the real broker."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from detector import onnx_bytes, trained, variant

from visionloop.contracts import (
    Alias,
    Envelope,
    ImageAccepted,
    ImageHashes,
    ImageRecognized,
    ImageRef,
    ImageSource,
    ImageUnrecognized,
)
from visionloop.libs.blob import LocalBlobStore
from visionloop.libs.bus.fake import FakeBus, FakeRuntime
from visionloop.libs.db import quote_ident
from visionloop.libs.library import LibraryWriter
from visionloop.libs.scenes import render_scene
from visionloop.libs.service import Adapters
from visionloop.services.recognizer.config import RecognizerSettings
from visionloop.services.recognizer.service import SPEC

SEEN = ("circle", "square", "triangle")


@pytest.fixture(scope="module", autouse=True)
def _detector() -> None:
    trained()  # train (or load from the cache) before any test's clock starts


async def recognizer(bus: FakeBus, blobs: LocalBlobStore) -> FakeRuntime:
    runtime = bus.runtime("recognizer", pool=bus.pool)  # type: ignore[attr-defined]
    SPEC.wire(runtime, Adapters(blobs=blobs), RecognizerSettings(batch_max=8, library_refresh_s=300))  # type: ignore[arg-type]
    await runtime.migrate(SPEC.migrations)
    return runtime


def library(bus: FakeBus, runtime: FakeRuntime, blobs: LocalBlobStore) -> LibraryWriter:
    """The library's writer on a fake `library` runtime whose schema is the one the recognizer reads."""
    writes = bus.runtime("library", pool=bus.pool, schema=runtime.settings.schema_for("library"))  # type: ignore[attr-defined]
    return LibraryWriter(runtime.settings, pool=bus.pool, blobs=blobs, runtime=writes)  # type: ignore[attr-defined]


async def accepted(blobs: LocalBlobStore, seed: int, project: str, *, domain: dict[str, str] | None = None,
                   classes: tuple[str, ...] = SEEN, background: str = "field") -> Envelope[ImageAccepted]:
    scene = render_scene(seed=seed, classes=classes, objects=(1, 3), size=(0.25, 0.5), background=background)
    data = scene.encode(quality=92)
    ref = await blobs.put(data)
    event = ImageAccepted(
        submission_id=f"s-{ref.sha256[:8]}",
        image=ImageRef(image_id=ref.sha256, blob_uri=ref.uri, width=320, height=240, format="JPEG", byte_size=len(data)),
        source=ImageSource(domain=domain or {}), hashes=ImageHashes(phash="0" * 16),
    )
    return Envelope.of(event, producer="dedup/test", project=project)


def decided(seen: list[Envelope[Any]]) -> dict[str, Envelope[Any]]:
    return {e.payload.image.image_id: e for e in seen if isinstance(e.payload, (ImageRecognized, ImageUnrecognized))}


async def test_empty_library_every_image_is_unrecognized_no_model(fake_bus: FakeBus, tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs")
    runtime = await recognizer(fake_bus, blobs)
    events = [await accepted(blobs, 10 + n, "fresh") for n in range(6)]
    got = decided(await fake_bus.deliver(*events))
    assert set(got) == {e.payload.image.image_id for e in events}
    for envelope in got.values():
        assert isinstance(envelope.payload, ImageUnrecognized) and envelope.payload.reason.value == "no_model"
        assert envelope.payload.uncertainty == 1.0 and envelope.payload.recognition is None
        assert envelope.producer.startswith("recognizer/") and envelope.project == "fresh"
    rows = await fake_bus.pool.fetch(f"SELECT outcome, reason FROM {quote_ident(runtime.schema)}.recognitions")  # type: ignore[attr-defined]
    assert Counter((r["outcome"], r["reason"]) for r in rows) == {("unrecognized", "no_model"): 6}


async def test_each_image_reaches_the_model_of_its_project_and_domain(fake_bus: FakeBus, tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs")
    runtime = await recognizer(fake_bus, blobs)
    model = onnx_bytes()
    async with library(fake_bus, runtime, blobs) as writer:
        await writer.add(variant(model, "farm"), project="farm", alias=Alias.PRODUCTION)
        await writer.add(variant(model, "farm-north"), project="farm", model_id="farm-north", domain={"site": "north"}, alias=Alias.PRODUCTION)
        await writer.add(variant(model, "farm-north-2"), project="farm", model_id="farm-north", domain={"site": "north"}, alias=Alias.CANDIDATE)
        await writer.add(variant(model, "city-night"), project="city", model_id="city-night", domain={"scene": "night"}, alias=Alias.PRODUCTION)
        await writer.add(variant(model, "unused"), project="city", model_id="city-edge", target="edge", alias=Alias.PRODUCTION)
    await fake_bus.flush()  # `model registered`: the recognizer hears of every entry
    cases = {
        ("farm", "north"): ("farm", {"site": "north", "camera": "gate"}, "farm-north"),
        ("farm", "south"): ("farm", {"site": "south"}, "farm-detector"),  # unknown domain: project-wide
        ("farm", "none"): ("farm", {}, "farm-detector"),
        ("city", "night"): ("city", {"scene": "night"}, "city-night"),
        ("city", "day"): ("city", {"scene": "day"}, None),  # no project-wide model, edge only: no model
        ("elsewhere", ""): ("elsewhere", {"site": "north"}, None),
    }
    sent: dict[str, tuple[str, str]] = {}
    events = []
    for n, (key, (project, domain, _)) in enumerate(cases.items()):
        for k in range(2):
            event = await accepted(blobs, 1000 + 10 * n + k, project, domain=domain)
            sent[event.payload.image.image_id] = key
            events.append(event)
    got = decided(await fake_bus.deliver(*events))
    assert set(got) == set(sent)
    for image_id, envelope in got.items():
        expected = cases[sent[image_id]][2]
        if expected is None:
            assert envelope.payload.reason.value == "no_model", sent[image_id]
        else:
            assert envelope.payload.recognition.model.model_id == expected, sent[image_id]
            assert envelope.payload.recognition.model.version == 1  # the candidate (v2) never answers
            assert envelope.payload.class_names == list(SEEN)
    # the candidate ran in shadow on the images its scope serves, and was recorded
    rows = await fake_bus.pool.fetch(  # type: ignore[attr-defined]
        f"SELECT image_id, candidate_id, candidate_version, agreement, error FROM {quote_ident(runtime.schema)}.shadow")
    assert sorted(r["image_id"] for r in rows) == sorted(i for i, k in sent.items() if k == ("farm", "north"))
    assert all(r["candidate_id"] == "farm-north" and r["candidate_version"] == 2 and r["error"] is None for r in rows)
    assert all(r["agreement"] == 1.0 for r in rows)  # the same weights: the same boxes


async def test_images_of_a_class_the_model_never_saw_are_unrecognized(fake_bus: FakeBus, tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs")
    runtime = await recognizer(fake_bus, blobs)
    async with library(fake_bus, runtime, blobs) as writer:
        await writer.add(onnx_bytes(), project="shapes", alias=Alias.PRODUCTION)
    await fake_bus.flush()
    known = [await accepted(blobs, 5000 + n, "shapes", background="gradient") for n in range(8)]
    unseen = [await accepted(blobs, 6000 + n, "shapes", classes=(shape,), background="gradient")
              for n, shape in enumerate(("cross", "diamond") * 4)]
    got = decided(await fake_bus.deliver(*known, *unseen))
    for event in unseen:
        answer = got[event.payload.image.image_id].payload
        assert isinstance(answer, ImageUnrecognized) and answer.reason.value in ("no_confident_detection", "uncertain")
        assert answer.uncertainty > 0.5 and answer.recognition.model.model_id == "shapes-detector"
    recognized = [got[e.payload.image.image_id].payload for e in known]
    recognized = [p for p in recognized if isinstance(p, ImageRecognized)]
    assert len(recognized) >= 6, recognized  # the model does know its classes
    for payload in recognized:
        assert {b.class_name for b in payload.prelabels} <= set(SEEN)
        assert payload.recognition.uncertainty <= 0.5
