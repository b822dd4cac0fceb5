"""The demo's synthetic world: reproducible streams whose every item is what it says it is, and
whose expected outcomes are the ones ingest and dedup/quality really give."""

from __future__ import annotations

import hashlib
import io
from collections import Counter

import pytest
from helpers import Collector, Services, eventually
from PIL import Image

from visionloop.contracts import ImageAccepted, ImageRejected, ImageSubmitted, topic_of
from visionloop.demo.world import ItemKind, World, publish, submission
from visionloop.libs.perceptual import hamming, hash_image
from visionloop.services.dedup.config import Policy
from visionloop.services.ingest.config import IngestSettings
from visionloop.services.ingest.inspect import Limits, Refusal, inspect_image

RATES = {"exact_dup_rate": 0.1, "near_dup_rate": 0.15, "low_res_rate": 0.05, "corrupt_rate": 0.1}


def _distance(a: bytes, b: bytes) -> int:
    ha, _ = hash_image(a)
    hb, _ = hash_image(b)
    return hamming(ha.phash, hb.phash) + hamming(ha.dhash, hb.dhash)


@pytest.fixture(scope="module")
def stream() -> tuple[World, list]:
    world = World(7, ("circle", "square", "triangle"))
    return world, world.stream(80, **RATES)


def test_same_seed_same_stream() -> None:
    a, b, c = World(3), World(3), World(4)
    first, second, other = a.stream(30, **RATES), b.stream(30, **RATES), c.stream(30, **RATES)
    assert [(i.kind, i.data) for i in first] == [(i.kind, i.data) for i in second]
    assert [i.data for i in first] != [i.data for i in other]
    # a second stream continues the world: new items, still reproducible
    assert [i.data for i in a.stream(10, **RATES)] == [i.data for i in b.stream(10, **RATES)]
    assert len({i.index for i in a.stream(5)} | {i.index for i in first}) == 35


def test_every_kind_at_its_rate(stream) -> None:  # noqa: ANN001
    _, items = stream
    counts = Counter(i.kind for i in items)
    assert counts == {
        ItemKind.EXACT_DUPLICATE: 8, ItemKind.NEAR_DUPLICATE: 12, ItemKind.LOW_RES: 4, ItemKind.CORRUPT: 8, ItemKind.FRESH: 48,
    }
    assert {i.expected.code for i in items} == {"accepted", "duplicate", "near_duplicate", "low_resolution", "corrupt", "not_an_image"}
    with pytest.raises(ValueError):
        World(1).stream(10, exact_dup_rate=0.6, corrupt_rate=0.6)


def test_duplicates_copy_an_earlier_fresh_scene(stream) -> None:  # noqa: ANN001
    world, items = stream
    seen: dict[str, bytes] = {}
    for item in items:
        assert item.image_id == hashlib.sha256(item.data).hexdigest()
        if item.kind is ItemKind.FRESH:
            seen[item.image_id] = item.data
        elif item.kind is ItemKind.EXACT_DUPLICATE:
            assert item.original in seen and item.data == seen[item.original]
            assert item.truth == tuple(world.truth(item.original))
        elif item.kind is ItemKind.NEAR_DUPLICATE:
            assert item.original in seen, "a near duplicate copies a scene handed out before it"
            assert item.data != seen[item.original]
            assert _distance(item.data, seen[item.original]) <= Policy().near_duplicate_radius
            with Image.open(io.BytesIO(item.data)) as image:
                assert image.size == (item.width, item.height)
            original = world.truth(item.original)
            assert original is not None and len(item.truth) <= len(original)
            for box in item.truth:  # the truth follows the picture into its new size
                assert 0 <= box.x1 <= box.x2 <= item.width and 0 <= box.y1 <= box.y2 <= item.height
            if item.variant in ("recompress", "brightness"):
                assert list(item.truth) == original
    assert {i.variant for i in items if i.kind is ItemKind.NEAR_DUPLICATE} >= {"resize", "recompress"}


def test_fresh_scenes_are_not_near_each_other(stream) -> None:  # noqa: ANN001
    _, items = stream
    fresh = [i.data for i in items if i.kind is ItemKind.FRESH]
    radius = Policy().near_duplicate_radius
    assert min(_distance(a, b) for n, a in enumerate(fresh) for b in fresh[:n]) > radius


def test_low_res_and_corrupt_items(stream) -> None:  # noqa: ANN001
    world, items = stream
    floor = Policy()
    config = IngestSettings()
    limits = Limits(config.max_bytes, config.max_pixels, config.max_frames, frozenset(config.formats))
    for item in items:
        if item.kind is ItemKind.LOW_RES:
            facts = inspect_image(item.data, limits)  # ingest keeps it; dedup's floor drops it
            assert facts.width < floor.min_width and facts.height < floor.min_height
            assert (facts.width, facts.height) == (item.width, item.height)
            assert world.truth(item.image_id) == list(item.truth)
        elif item.kind is ItemKind.CORRUPT:
            with pytest.raises(Refusal) as refused:
                inspect_image(item.data, limits)
            assert refused.value.reason == item.expected.reason
            with pytest.raises(Exception):
                with Image.open(io.BytesIO(item.data)) as image:
                    image.load()
            assert item.truth is None and world.truth(item.image_id) is None
        else:
            inspect_image(item.data, limits)
    assert {i.variant for i in items if i.kind is ItemKind.CORRUPT} == {"truncated", "garbage"}


def test_truth_is_known_only_for_handed_out_images(stream) -> None:  # noqa: ANN001
    world, items = stream
    for item in items:
        if item.truth is not None:
            assert world.truth(item.image_id) == list(item.truth)
            for box in item.truth:
                assert box.class_name in ("circle", "square", "triangle")
    assert world.truth("0" * 64) is None and not world.knows("0" * 64)


def test_new_classes_only_when_asked() -> None:
    world = World(11, ("circle", "square", "triangle"), objects=(3, 4))
    before = {b.class_name for i in world.stream(30) for b in i.truth}
    assert before == {"circle", "square", "triangle"}
    later = world.stream(30, classes=("circle", "square", "triangle", "diamond"))
    assert "diamond" in {b.class_name for i in later for b in i.truth}
    assert "diamond" not in {b.class_name for i in world.stream(30) for b in i.truth}
    with pytest.raises(ValueError):
        World(1, ("car",))


def test_submission_payload() -> None:
    item = World(5).stream(1)[0]
    sent = submission(item, "parking", source="cam-feed")
    again = ImageSubmitted.model_validate_json(sent.model_dump_json())
    assert again.inline_bytes == item.data and again.submission_id == f"cam-feed-{item.name}"
    assert again.source.source_system == "cam-feed" and again.source.upstream_id == f"parking/{item.name}"


async def test_ingest_and_dedup_answer_as_expected(settings, pool) -> None:  # noqa: ANN001
    """The real ingest and dedup/quality give every item its expected answer (originals first)."""
    world = World(21)
    items = world.stream(24, exact_dup_rate=0.125, near_dup_rate=0.125, low_res_rate=0.125, corrupt_rate=0.125)
    topics = (topic_of(ImageAccepted, settings.topic_prefix), topic_of(ImageRejected, settings.topic_prefix))
    async with Services(settings, pool) as loop, Collector(settings, *topics) as decided:
        await loop.start("ingest")
        await loop.start("dedup")
        # Duplicates after their originals were decided: items on other partitions may overtake.
        first = [i for i in items if i.kind not in (ItemKind.EXACT_DUPLICATE, ItemKind.NEAR_DUPLICATE)]
        later = [i for i in items if i not in first]
        await publish(settings, first, "worldtest")
        await decided.wait(len(first))
        envelopes = await publish(settings, later, "worldtest")
        assert all(e.project == "worldtest" for e in envelopes)
        await eventually(lambda: len(decided.messages) >= len(items), timeout=30)
    answers = {m["payload"]["submission_id"]: m for m in decided.messages}
    for item in items:
        answer = answers[f"demo-upstream-{item.name}"]
        got = "accepted" if answer["event_type"] == "image.accepted" else answer["payload"]["reason"]
        assert got == item.expected.code, (item.kind, item.variant, answer["payload"].get("message"))
        if not item.expected.accepted:
            assert answer["payload"]["stage"] == item.expected.stage
        if item.original is not None:
            assert answer["payload"]["duplicate_of"] == item.original
