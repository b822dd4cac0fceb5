"""Submitting many images on the submit topic and collecting ingest's answers, by submission id."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from visionloop.contracts import Envelope, ImageIngested, ImageRejected, ImageSubmitted, topic_of
from visionloop.libs.kafka import client_kwargs, ensure_named
from visionloop.libs.settings import Settings


async def submit_all(settings: Settings, submissions: Iterable[ImageSubmitted], *, project: str, key: str = "one-partition") -> None:
    """Publish every submission with one key, so ingest handles them in this order."""
    await ensure_named(settings, [topic_of(ImageSubmitted, settings.topic_prefix)])
    producer = AIOKafkaProducer(**client_kwargs(settings), acks="all", max_request_size=4 * 1024 * 1024)
    await producer.start()
    try:
        for submission in submissions:
            envelope = Envelope.of(submission, producer="test", project=project)
            await producer.send_and_wait(
                topic_of(ImageSubmitted, settings.topic_prefix), envelope.model_dump_json().encode(), key=key.encode()
            )
    finally:
        await producer.stop()


async def answers(settings: Settings, submission_ids: Iterable[str], timeout: float = 30.0) -> dict[str, list[dict[str, Any]]]:
    """Every `image ingested` / `image rejected` for these submission ids, in arrival order per id.

    Returns once each id has at least one answer (and fails the test after `timeout`).
    """
    wanted = set(submission_ids)
    topics = [topic_of(ImageIngested, settings.topic_prefix), topic_of(ImageRejected, settings.topic_prefix)]
    await ensure_named(settings, topics)
    consumer = AIOKafkaConsumer(*topics, **client_kwargs(settings), auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    found: dict[str, list[dict[str, Any]]] = {}
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while not wanted <= set(found):
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"no answer within {timeout}s for {sorted(wanted - set(found))}")
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for record in records:
                    message = json.loads(record.value)
                    found.setdefault(message["payload"]["submission_id"], []).append(message)
        # whatever else is already there (a duplicate answer would show up here)
        for records in (await consumer.getmany(timeout_ms=300)).values():
            for record in records:
                message = json.loads(record.value)
                found.setdefault(message["payload"]["submission_id"], []).append(message)
    finally:
        await consumer.stop()
    return found
