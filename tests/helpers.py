"""Helpers shared by the tests (imported as `helpers`; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from visionloop.contracts import Envelope, Payload, topic_of
from visionloop.libs.kafka import client_kwargs
from visionloop.libs.settings import Settings


async def eventually(predicate, timeout: float = 20.0, interval: float = 0.05):  # noqa: ANN001, ANN201
    """Await until `predicate()` (sync or async) is truthy; return its value or fail."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


async def read_topic(settings: Settings, topic: str, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    """Read at least `count` messages from the start of `topic` (no consumer group); JSON-decoded."""
    consumer = AIOKafkaConsumer(topic, **client_kwargs(settings), auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    found: list[dict[str, Any]] = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(found) < count and asyncio.get_running_loop().time() < deadline:
            batch = await consumer.getmany(timeout_ms=300)
            for records in batch.values():
                for record in records:
                    try:
                        found.append(json.loads(record.value))
                    except ValueError:
                        found.append({"_raw": record.value})
    finally:
        await consumer.stop()
    return found


async def produce(settings: Settings, topic: str, value: bytes, key: bytes | None = None) -> None:
    """Write raw bytes to a topic, as any Kafka client could."""
    producer = AIOKafkaProducer(**client_kwargs(settings), acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


async def publish(settings: Settings, payload: Payload, *, project: str = "demo", key: str | None = None) -> Envelope[Any]:
    """Publish a contract event on its registry topic, as an upstream producer would."""
    envelope = Envelope.of(payload, producer="test", project=project)
    await produce(settings, topic_of(payload, settings.topic_prefix), envelope.model_dump_json().encode(),
                  key.encode() if key else None)
    return envelope
