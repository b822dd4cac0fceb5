"""`visionloop status` reads lag against a known backlog (issue 16, item 7): committed offsets are
never shown above the end, and the lag is exactly what waits."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from visionloop.contracts import ImageIngested, topic_of
from visionloop.contracts.topics import TOPICS
from visionloop.libs.kafka import client_kwargs, ensure_topics
from visionloop.libs.observe import snapshot


async def _produce(settings, topic: str, first: int, count: int) -> None:  # noqa: ANN001
    # Sent together, so records share batches (the embedded broker then reports ends low).
    producer = AIOKafkaProducer(**client_kwargs(settings), acks="all", linger_ms=20)  # type: ignore[arg-type]
    await producer.start()
    try:
        sent = [await producer.send(topic, f"record {n}".encode(), key=f"k{n % 7}".encode()) for n in range(first, first + count)]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def _consume_and_commit(settings, topic: str, group: str, count: int) -> None:  # noqa: ANN001
    consumer = AIOKafkaConsumer(topic, **client_kwargs(settings), group_id=group, enable_auto_commit=False,  # type: ignore[arg-type]
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        seen = 0
        while seen < count:
            batch = await consumer.getmany(timeout_ms=1000)
            seen += sum(len(records) for records in batch.values())
            await consumer.commit()
    finally:
        await consumer.stop()


async def test_status_lag_matches_a_known_backlog(settings) -> None:  # noqa: ANN001
    topic = topic_of(ImageIngested, settings.topic_prefix)
    group = f"{settings.topic_prefix}status-check"
    await ensure_topics(settings, [TOPICS[ImageIngested]])
    await _produce(settings, topic, 0, 19)
    await _consume_and_commit(settings, topic, group, 19)
    (lag,) = (await snapshot(settings, [(topic, group)])).lags
    assert (lag.committed, lag.end, lag.lag) == (19, 19, 0)
    await _produce(settings, topic, 19, 10)
    snap = await snapshot(settings, [(topic, group)])
    (lag,) = snap.lags
    assert (lag.committed, lag.end, lag.lag) == (19, 29, 10)
    (last,) = [e for e in snap.last_events if e.topic == topic]
    assert last.messages == 29
