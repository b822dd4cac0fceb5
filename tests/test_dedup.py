"""dedup/quality through the real broker and PostgreSQL: every distinct image accepted once."""

from __future__ import annotations

import asyncio
import hashlib
import random

import numpy as np
from helpers import Collector, Services, publish

from visionloop.contracts import (
    Envelope,
    ImageAccepted,
    ImageIngested,
    ImageRef,
    ImageRejected,
    ImageSource,
    ImageSubmitted,
    topic_of,
)
from visionloop.libs.scenes import render_scene
from visionloop.libs.variants import variant
from visionloop.services.dedup.config import DedupSettings


def _outcomes(settings) -> Collector:  # noqa: ANN001
    """Collects what dedup (or ingest) decided: accepts and rejects."""
    return Collector(settings, topic_of(ImageAccepted, settings.topic_prefix), topic_of(ImageRejected, settings.topic_prefix))


def _by_submission(messages: list[dict]) -> dict[str, dict]:
    return {m["payload"]["submission_id"]: m for m in messages}


async def test_duplicates_near_duplicates_and_low_resolution_are_dropped(settings, pool) -> None:  # noqa: ANN001
    rng = np.random.default_rng(3)
    original = render_scene(seed=101, width=640, height=480)
    distinct = render_scene(seed=202, width=640, height=480)
    tiny = render_scene(seed=303, width=24, height=24)
    submissions = {
        "original": original.encode(quality=85),
        "again": original.encode(quality=85),  # the same bytes: an exact duplicate
        "resized": variant(original.image, "resize", rng),
        "cropped": variant(original.image, "crop", rng),
        "tiny": tiny.encode(),
        "distinct": distinct.encode(quality=85),
    }
    async with Services(settings, pool) as loop, _outcomes(settings) as decided:
        await loop.start("ingest")
        await loop.start("dedup")
        for n, (name, data) in enumerate(submissions.items(), start=1):
            # one at a time: ingest keys by image id, so different images may overtake each other
            await publish(settings, ImageSubmitted(submission_id=name, inline_bytes=data))
            await decided.wait(n)
        outcome = _by_submission(decided.messages)
    original_id = hashlib.sha256(submissions["original"]).hexdigest()
    kinds = {name: (m["event_type"], m["payload"].get("reason")) for name, m in outcome.items()}
    assert kinds == {
        "original": ("image.accepted", None),
        "again": ("image.rejected", "duplicate"),
        "resized": ("image.rejected", "near_duplicate"),
        "cropped": ("image.rejected", "near_duplicate"),
        "tiny": ("image.rejected", "low_resolution"),
        "distinct": ("image.accepted", None),
    }
    for name in ("again", "resized", "cropped"):
        payload = outcome[name]["payload"]
        assert payload["duplicate_of"] == original_id and payload["stage"] == "dedup"
        assert payload["message"]
    assert outcome["again"]["payload"]["hamming_distance"] == 0
    assert 0 < outcome["resized"]["payload"]["hamming_distance"] <= 16
    accepted = Envelope[ImageAccepted].model_validate(outcome["original"])
    assert len(accepted.payload.hashes.phash) == 16 and accepted.payload.hashes.dhash
    assert "32x32" in outcome["tiny"]["payload"]["message"] or "24x24" in outcome["tiny"]["payload"]["message"]


async def test_blur_floor_per_project(settings, pool) -> None:  # noqa: ANN001
    from PIL import ImageFilter

    sharp = render_scene(seed=5, width=640, height=480)
    blurred = render_scene(seed=6, width=640, height=480).image.filter(ImageFilter.GaussianBlur(6))
    import io

    out = io.BytesIO()
    blurred.save(out, format="JPEG", quality=85)
    config = DedupSettings(projects={"strict": {"min_blur_variance": 20.0}})
    async with Services(settings, pool, dedup=config) as loop, _outcomes(settings) as decided:
        await loop.start("ingest")
        await loop.start("dedup")
        await publish(settings, ImageSubmitted(submission_id="sharp", inline_bytes=sharp.encode(quality=85)), project="strict")
        await publish(settings, ImageSubmitted(submission_id="blurred", inline_bytes=out.getvalue()), project="strict")
        outcome = _by_submission(await decided.wait(2))
    assert outcome["sharp"]["event_type"] == "image.accepted"
    assert outcome["sharp"]["payload"]["quality"]["blur_variance"] > 20
    assert outcome["blurred"]["payload"]["reason"] == "blurry"


async def test_two_replicas_accept_each_distinct_image_exactly_once(settings, pool) -> None:  # noqa: ANN001
    """Copies and near copies spread over every partition, two dedup consumers in one group."""
    rng = np.random.default_rng(11)
    loop_ = Services(settings, pool)
    events: list[tuple[int, ImageIngested]] = []
    for group in range(24):
        scene = render_scene(seed=7000 + group, width=320, height=240)
        copies = [scene.encode(quality=85), variant(scene.image, "recompress", rng), variant(scene.image, "brightness", rng), scene.encode(quality=85)]
        for k, data in enumerate(copies):
            ref = await loop_.adapters.blobs.put(data)
            image = ImageRef(image_id=ref.sha256, blob_uri=ref.uri, width=320, height=240, format="JPEG", byte_size=len(data))
            events.append((group, ImageIngested(submission_id=f"g{group}-c{k}", image=image, source=ImageSource())))
    random.Random(5).shuffle(events)
    async with loop_, _outcomes(settings) as decided:
        first = await loop_.start("dedup", instance="replica-a")
        second = await loop_.start("dedup", instance="replica-b")
        # each near copy has its own image id, so copies land on different partitions (replicas)
        await asyncio.gather(*(publish(settings, e, key=e.image.image_id) for _, e in events))
        outcome = _by_submission(await decided.wait(len(events), timeout=60))
        assert first.counters["handled"] > 0 and second.counters["handled"] > 0  # both did work
    group_of = {e.submission_id: g for g, e in events}
    image_group = {e.image.image_id: g for g, e in events}
    accepted = [s for s, m in outcome.items() if m["event_type"] == "image.accepted"]
    assert sorted(group_of[s] for s in accepted) == list(range(24))  # one per distinct image
    for submission, message in outcome.items():
        if message["event_type"] == "image.rejected":
            assert message["payload"]["reason"] in ("duplicate", "near_duplicate")
            assert image_group[message["payload"]["duplicate_of"]] == group_of[submission]
    rows = await pool.fetchval(f'SELECT count(*) FROM "{settings.schema_for("dedup")}".hashes')
    assert rows == 24


async def test_duplicates_are_decided_within_a_project(settings, pool) -> None:  # noqa: ANN001
    """Issue 16, item 2: the same bytes in another project are that project's own image; a project
    that asks for a corpus-wide check drops the copy without learning whose it was or its fate."""
    data = render_scene(seed=404, width=640, height=480).encode(quality=85)
    config = DedupSettings(projects={"corpus": {"across_projects": True}})
    async with Services(settings, pool, dedup=config) as loop, _outcomes(settings) as decided:
        await loop.start("ingest")
        await loop.start("dedup")
        for n, (sid, project) in enumerate([("a-first", "alpha"), ("b-same", "beta"), ("a-again", "alpha"), ("c-corpus", "corpus")], 1):
            await publish(settings, ImageSubmitted(submission_id=sid, inline_bytes=data), project=project)
            await decided.wait(n)
        outcome = _by_submission(decided.messages)
    assert outcome["a-first"]["event_type"] == "image.accepted"
    assert outcome["b-same"]["event_type"] == "image.accepted"  # another project: its own image
    assert outcome["a-again"]["payload"]["reason"] == "duplicate"
    corpus = outcome["c-corpus"]["payload"]
    assert corpus["reason"] == "duplicate" and corpus["details"] == {"across_projects": True}
    assert not any(word in corpus["message"] for word in ("alpha", "beta", "first decision", "accepted"))
