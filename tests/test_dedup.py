"""dedup/quality through the real broker and PostgreSQL: two replicas in one consumer group accept
every distinct image exactly once. The decisions themselves are tested on the in-memory bus
(test_dedup_handlers.py)."""

from __future__ import annotations

import asyncio
import random

import numpy as np
from helpers import Collector, Services, publish

from visionloop.contracts import (
    ImageAccepted,
    ImageIngested,
    ImageRef,
    ImageRejected,
    ImageSource,
    topic_of,
)
from visionloop.libs.scenes import render_scene
from visionloop.libs.variants import variant


def _outcomes(settings) -> Collector:
    """Collects what dedup (or ingest) decided: accepts and rejects."""
    return Collector(settings, topic_of(ImageAccepted, settings.topic_prefix), topic_of(ImageRejected, settings.topic_prefix))


def _by_submission(messages: list[dict]) -> dict[str, dict]:
    return {m["payload"]["submission_id"]: m for m in messages}


async def test_two_replicas_accept_each_distinct_image_exactly_once(settings, pool) -> None:
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
