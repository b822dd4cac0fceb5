"""dedup/quality's handler on the in-memory bus (libs/bus/fake.py): its own wiring, its SQL on
PostgreSQL, images in a local blob store, no Kafka. Two replicas over the real broker are in
test_dedup.py."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ImageFilter

from visionloop.contracts import (
    Envelope,
    ImageAccepted,
    ImageIngested,
    ImageRef,
    ImageRejected,
    ImageSource,
)
from visionloop.libs.blob import LocalBlobStore
from visionloop.libs.bus.fake import FakeBus, FakeRuntime, of_type
from visionloop.libs.scenes import render_scene
from visionloop.libs.service import Adapters
from visionloop.libs.variants import variant
from visionloop.services.dedup.config import DedupSettings
from visionloop.services.dedup.service import SPEC


async def dedup(bus: FakeBus, tmp_path: Path, config: DedupSettings | None = None) -> FakeRuntime:
    runtime = bus.runtime("dedup", pool=bus.pool)  # type: ignore[attr-defined]
    SPEC.wire(runtime, Adapters(blobs=LocalBlobStore(tmp_path / "blobs")), config or DedupSettings())  # type: ignore[arg-type]
    await runtime.migrate(SPEC.migrations)
    return runtime


async def ingested(runtime: FakeRuntime, submission: str, data: bytes, project: str = "p") -> Envelope[ImageIngested]:
    """What ingest emits for `data`: the bytes stored, the image described."""
    ctx = runtime.consumers[0].handler.args[0]
    ref = await ctx.blobs.put(data)
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        width, height, fmt = image.width, image.height, image.format
    image_ref = ImageRef(image_id=ref.sha256, blob_uri=ref.uri, width=width, height=height, format=fmt, byte_size=len(data))
    return Envelope.of(ImageIngested(submission_id=submission, image=image_ref, source=ImageSource()), producer="ingest/test", project=project)


async def decide_each(bus: FakeBus, runtime: FakeRuntime, submissions: dict[str, bytes], projects: dict[str, str] | None = None) -> dict[str, Any]:
    """Deliver the submissions one by one; each one's decision (accepted or rejected payload)."""
    outcome: dict[str, Any] = {}
    for name, data in submissions.items():
        seen = await bus.deliver(await ingested(runtime, name, data, (projects or {}).get(name, "p")))
        (decision,) = of_type(seen, ImageAccepted) + of_type(seen, ImageRejected)
        outcome[name] = decision
    return outcome


async def test_duplicates_near_duplicates_and_low_resolution_are_dropped(fake_bus: FakeBus, tmp_path: Path) -> None:
    runtime = await dedup(fake_bus, tmp_path)
    rng = np.random.default_rng(3)
    original = render_scene(seed=101, width=640, height=480)
    submissions = {
        "original": original.encode(quality=85),
        "again": original.encode(quality=85),  # the same bytes: an exact duplicate
        "resized": variant(original.image, "resize", rng),
        "cropped": variant(original.image, "crop", rng),
        "tiny": render_scene(seed=303, width=24, height=24).encode(),
        "distinct": render_scene(seed=202, width=640, height=480).encode(quality=85),
    }
    outcome = await decide_each(fake_bus, runtime, submissions)
    kinds = {name: (type(p).__name__, getattr(p, "reason", None)) for name, p in outcome.items()}
    assert kinds == {
        "original": ("ImageAccepted", None),
        "again": ("ImageRejected", "duplicate"),
        "resized": ("ImageRejected", "near_duplicate"),
        "cropped": ("ImageRejected", "near_duplicate"),
        "tiny": ("ImageRejected", "low_resolution"),
        "distinct": ("ImageAccepted", None),
    }
    original_id = hashlib.sha256(submissions["original"]).hexdigest()
    for name in ("again", "resized", "cropped"):
        assert outcome[name].duplicate_of == original_id and outcome[name].stage == "dedup" and outcome[name].message
    assert outcome["again"].hamming_distance == 0
    assert 0 < outcome["resized"].hamming_distance <= 16
    assert len(outcome["original"].hashes.phash) == 16 and outcome["original"].hashes.dhash
    assert "32x32" in outcome["tiny"].message or "24x24" in outcome["tiny"].message


async def test_blur_floor_per_project(fake_bus: FakeBus, tmp_path: Path) -> None:
    runtime = await dedup(fake_bus, tmp_path, DedupSettings(projects={"strict": {"min_blur_variance": 20.0}}))
    out = io.BytesIO()
    render_scene(seed=6, width=640, height=480).image.filter(ImageFilter.GaussianBlur(6)).save(out, format="JPEG", quality=85)
    sharp = render_scene(seed=5, width=640, height=480).encode(quality=85)
    outcome = await decide_each(fake_bus, runtime, {"sharp": sharp, "blurred": out.getvalue()}, {"sharp": "strict", "blurred": "strict"})
    assert isinstance(outcome["sharp"], ImageAccepted) and outcome["sharp"].quality.blur_variance > 20
    assert outcome["blurred"].reason == "blurry"


async def test_duplicates_are_decided_within_a_project(fake_bus: FakeBus, tmp_path: Path) -> None:
    """Issue 16, item 2: the same bytes in another project are that project's own image; a project
    that asks for a corpus-wide check drops the copy without learning whose it was or its fate."""
    runtime = await dedup(fake_bus, tmp_path, DedupSettings(projects={"corpus": {"across_projects": True}}))
    data = render_scene(seed=404, width=640, height=480).encode(quality=85)
    projects = {"a-first": "alpha", "b-same": "beta", "a-again": "alpha", "c-corpus": "corpus"}
    outcome = await decide_each(fake_bus, runtime, dict.fromkeys(projects, data), projects)
    assert isinstance(outcome["a-first"], ImageAccepted)
    assert isinstance(outcome["b-same"], ImageAccepted)  # another project: its own image
    assert outcome["a-again"].reason == "duplicate"
    corpus = outcome["c-corpus"]
    assert corpus.reason == "duplicate" and corpus.details == {"across_projects": True}
    assert not any(word in corpus.message for word in ("alpha", "beta", "first decision", "accepted"))
