"""Helpers shared by the tests (imported as `helpers`; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from visionloop.contracts import Box, Detection, Envelope, Payload, topic_of
from visionloop.libs.kafka import client_kwargs, consumer_kwargs, ensure_named
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
    await ensure_named(settings, [topic])
    consumer = AIOKafkaConsumer(topic, **consumer_kwargs(settings), auto_offset_reset="earliest", enable_auto_commit=False)
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
    """Write raw bytes to a topic, as any Kafka client could (the topic is created first, as the
    services would: this project's clients never create a topic by naming it)."""
    await ensure_named(settings, [topic])
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


class Services:
    """Real services of the loop, wired by the composition root, started in this event loop."""

    def __init__(self, settings: Settings, pool: Any, **configs: Any) -> None:
        from visionloop.libs.blob import open_blob_store
        from visionloop.libs.service import Adapters

        self.settings = settings
        self.pool = pool
        self.configs = configs
        self.adapters = Adapters(blobs=open_blob_store(settings.blob_location))
        self.runtimes: list[Any] = []
        self.apps: dict[str, Any] = {}
        """The ASGI app of each started service that has one (call it with an httpx ASGITransport)."""

    async def start(self, name: str, *, instance: str | None = None) -> Any:
        """Start one service (a second call with another instance name adds a replica)."""
        from visionloop import services
        from visionloop.app import build_runtime

        settings = self.settings if instance is None else self.settings.model_copy(update={"instance": instance})
        spec = services.get(name)
        runtime, app = build_runtime(spec, settings, self.pool, self.adapters, self.configs.get(name.replace("-", "_")))
        if app is not None:
            self.apps[name] = app
        await runtime.start()
        self.runtimes.append(runtime)
        return runtime

    async def stop(self) -> None:
        """Stop every started service, newest first."""
        for runtime in reversed(self.runtimes):
            await runtime.stop()
        self.runtimes.clear()

    async def __aenter__(self) -> "Services":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class Collector:
    """Reads topics from the start in the background and keeps every decoded message."""

    def __init__(self, settings: Settings, *topics: str) -> None:
        self._settings, self._topics = settings, topics
        self._consumer = AIOKafkaConsumer(*topics, **consumer_kwargs(settings), auto_offset_reset="earliest", enable_auto_commit=False)
        self.messages: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> "Collector":
        await ensure_named(self._settings, self._topics)
        await self._consumer.start()
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        while True:
            batch = await self._consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for record in records:
                    try:
                        self.messages.append(json.loads(record.value))
                    except ValueError:
                        self.messages.append({"_raw": record.value})

    async def wait(self, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until at least `count` messages arrived; return them all."""
        await eventually(lambda: len(self.messages) >= count, timeout=timeout)
        return self.messages

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()


def box(x1: float, y1: float, x2: float, y2: float, cls: str = "car", score: float | None = None) -> Box:
    """A box in pixels (a label's)."""
    return Box(x1=x1, y1=y1, x2=x2, y2=y2, class_name=cls, score=score)


def det(x1: float, y1: float, x2: float, y2: float, cls: str = "car", score: float = 0.9) -> Detection:
    """A detection in pixels (a model's)."""
    return Detection(x1=x1, y1=y1, x2=x2, y2=y2, class_name=cls, score=score)
