"""`Runtime.consume_batch` against the real broker and PostgreSQL: one `prepare` per batch, and
per message still exactly one effect, retries, dead letters, and offsets committed last."""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

from helpers import eventually, produce, publish, read_topic
from recorder import MIGRATIONS, effects

from visionloop.contracts import (
    DeadLetter,
    Envelope,
    ImageAccepted,
    ImageHashes,
    ImageIngested,
    ImageRef,
    ImageSource,
    topic_of,
)
from visionloop.libs.bus import PermanentError, Runtime, Unit
from visionloop.libs.db import Migration


def _ingested(n: int) -> ImageIngested:
    digest = hashlib.sha256(f"batch-image-{n}".encode()).hexdigest()
    return ImageIngested(
        submission_id=f"s-{n}",
        image=ImageRef(image_id=digest, blob_uri=f"file:///blobs/{digest}", width=64, height=48, format="PNG", byte_size=100),
        source=ImageSource(),
    )


class BatchRecorder:
    """A `consume_batch` service: prepare doubles the width, the handler stores it and emits."""

    def __init__(self, settings, pool, *, max_records: int = 8, max_wait_ms: int = 0,  # noqa: ANN001
                 prepare_fails: dict[str, BaseException] | None = None, handler_fails: set[str] | None = None) -> None:
        self.batches: list[int] = []
        self.prepared: list[str] = []
        self.prepare_fails = prepare_fails or {}
        self.handler_fails = handler_fails or set()
        self.runtime = Runtime("recorder", settings, pool=pool, migrations=[Migration("recorder", p) for p in sorted(MIGRATIONS.glob("*.sql"))])
        self.runtime.consume_batch(ImageIngested, self.handle, prepare=self.prepare, max_records=max_records, max_wait_ms=max_wait_ms)
        self.runtime.produces(ImageAccepted)

    async def prepare(self, events: list[Envelope[ImageIngested]]) -> list[Any]:
        self.batches.append(len(events))
        out: list[Any] = []
        for event in events:
            image_id = event.payload.image.image_id
            self.prepared.append(image_id)
            out.append(self.prepare_fails.get(image_id, event.payload.image.width * 2))
        return out

    async def handle(self, event: Envelope[ImageIngested], unit: Unit[ImageIngested], doubled: int) -> None:
        image_id = event.payload.image.image_id
        assert doubled == 128
        await unit.conn.execute(f"INSERT INTO {unit.schema}.effects (image_id, event_id) VALUES ($1, $2)", image_id, event.event_id)
        if image_id in self.handler_fails:
            raise RuntimeError(f"refusing {image_id[:8]} on purpose")
        unit.emit(ImageAccepted(submission_id=event.payload.submission_id, image=event.payload.image,
                                source=event.payload.source, hashes=ImageHashes(phash="0" * 16)))


async def _lag(settings) -> int:  # noqa: ANN001
    from visionloop.libs.observe import snapshot

    topic = topic_of(ImageIngested, settings.topic_prefix)
    snap = await snapshot(settings, [(topic, f"{settings.topic_prefix}recorder.image.ingested")])
    return sum(lag.lag for lag in snap.lags) if snap.lags else -1


async def test_a_backlog_is_handled_in_batches_each_event_once(settings, pool) -> None:  # noqa: ANN001
    events = [_ingested(n) for n in range(60)]
    await asyncio.gather(*(publish(settings, e, key=e.image.image_id) for e in events))
    rec = BatchRecorder(settings, pool, max_records=16)
    await rec.runtime.start()
    try:
        recorded = await eventually(lambda: _count(effects(pool, settings), 60), timeout=30)
        assert sorted(recorded) == sorted(e.image.image_id for e in events)
        assert max(rec.batches) > 1 and max(rec.batches) <= 16  # a backlog makes batches
        assert sum(rec.batches) == 60 and len(rec.prepared) == 60  # each event prepared once
        accepted = await read_topic(settings, topic_of(ImageAccepted, settings.topic_prefix), 60)
        assert len({a["payload"]["image"]["image_id"] for a in accepted}) == 60 and len(accepted) == 60
        await eventually(lambda: _is(_lag(settings), 0), timeout=20)  # offsets committed
        assert rec.runtime.counters["handled"] == 60
    finally:
        await rec.runtime.stop()


async def test_one_failing_event_does_not_hold_back_its_batch(settings, pool) -> None:  # noqa: ANN001
    events = [_ingested(n) for n in range(100, 110)]
    flaky, broken, poisoned = (events[2].image.image_id, events[5].image.image_id, events[7].image.image_id)
    rec = BatchRecorder(
        settings, pool, max_records=10,
        prepare_fails={flaky: RuntimeError("fails every time, retried first"), broken: PermanentError("unreadable: never works")},
        handler_fails={poisoned},
    )
    for e in events:  # one partition: a single batch holds them all
        await publish(settings, e, key="one-key")
    await rec.runtime.start()
    try:
        letters = await read_topic(settings, topic_of(DeadLetter, settings.topic_prefix), 3, timeout=30)
        by_event = {Envelope[DeadLetter].model_validate(m).payload.original_event_id: Envelope[DeadLetter].model_validate(m).payload for m in letters}
        await eventually(lambda: _count(effects(pool, settings), 7), timeout=20)
        recorded = await effects(pool, settings)
        # the seven good events took effect once each; the three bad ones not at all
        assert sorted(recorded) == sorted(e.image.image_id for e in events if e.image.image_id not in (flaky, broken, poisoned))
        assert len(by_event) == 3
        reasons = sorted((p.error_type, p.attempts) for p in by_event.values())
        max_attempts = settings.handler_max_attempts
        # the permanent failure is not retried; the others are, `prepare` running again for them alone
        assert reasons == sorted([("PermanentError", 1), ("RuntimeError", max_attempts), ("RuntimeError", max_attempts)])
        assert rec.prepared.count(flaky) == max_attempts and rec.prepared.count(broken) == 1
        assert rec.runtime.counters["batch_fallbacks"] >= 1
        await eventually(lambda: _is(_lag(settings), 0), timeout=20)
    finally:
        await rec.runtime.stop()


async def test_duplicates_and_malformed_messages_in_a_batch(settings, pool) -> None:  # noqa: ANN001
    topic = topic_of(ImageIngested, settings.topic_prefix)
    envelope = Envelope.of(_ingested(200), producer="test", project="p")
    raw = envelope.model_dump_json().encode()
    for _ in range(3):  # an at-least-once producer retried twice
        await produce(settings, topic, raw, key=b"k")
    await produce(settings, topic, b"not json", key=b"k")
    rec = BatchRecorder(settings, pool, max_records=10)
    await rec.runtime.start()
    try:
        await eventually(lambda: rec.runtime.counters["duplicates_skipped"] == 2, timeout=20)
        assert await effects(pool, settings) == [envelope.payload.image.image_id]
        [letter] = await read_topic(settings, topic_of(DeadLetter, settings.topic_prefix), 1)
        assert letter["payload"]["reason"] == "not_json"
        # redelivered later (a consumer that died before committing): skipped by the inbox
        await produce(settings, topic, raw, key=b"k")
        await eventually(lambda: rec.runtime.counters["duplicates_skipped"] == 3, timeout=20)
        assert await effects(pool, settings) == [envelope.payload.image.image_id]
        assert rec.prepared == [envelope.payload.image.image_id]  # duplicates are never prepared
    finally:
        await rec.runtime.stop()


async def test_batches_linger_for_more_messages(settings, pool) -> None:  # noqa: ANN001
    rec = BatchRecorder(settings, pool, max_records=6, max_wait_ms=1500)
    await rec.runtime.start()
    try:
        await asyncio.sleep(1.0)  # the group has joined
        for n in range(6):
            await publish(settings, _ingested(300 + n), key="k")
            await asyncio.sleep(0.05)
        await eventually(lambda: _count(effects(pool, settings), 6), timeout=20)
        assert rec.batches == [6]  # the first message waited for the other five
    finally:
        await rec.runtime.stop()


async def _count(found, n: int):  # noqa: ANN001, ANN202
    values = await found
    return values if len(values) >= n else None


async def _is(value, expected) -> bool:  # noqa: ANN001
    return (await value) == expected


def test_batch_subscriber_is_documented_in_asyncapi(settings) -> None:  # noqa: ANN001
    from faststream.specification import AsyncAPI

    runtime = BatchRecorder(settings, None).runtime
    doc = json.loads(AsyncAPI(runtime.broker, schema_version="3.0.0").to_specification().to_json())
    assert any("vl.image.ingested.v1" in name for name in doc["channels"])
