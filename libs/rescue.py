"""Records no consumer group has read yet, read back from the embedded broker and written to a
fresh one: the planned restart's way to lose nothing (`libs/rotation.py`).

`unread` starts each partition at the lowest offset any of its topic's groups committed (offset 0
where one committed nothing, the earliest record where an offset lies past the log) and reads
until nothing more comes; the broker's end offsets are not trusted (`libs/lag.py`). `put_back`
writes them to the same partitions in the same order, with their keys, headers and timestamps. Both
use the rotation's own client id, the one the front door never holds. `continue_epoch` then makes
the fresh broker's epoch say that nothing was lost (`libs/bus/epoch.py`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from visionloop.libs import kafka
from visionloop.libs.kafka import client_kwargs
from visionloop.libs.lag import committed_offsets
from visionloop.libs.settings import Settings

QUIET_MS = 300
"""Reading stops once no record has come for this long."""


@dataclass(frozen=True)
class Kept:
    """One record to write back."""

    topic: str
    partition: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    timestamp_ms: int


def rotation_client_id(settings: Settings) -> str:
    """The client id of the rotation's reader and writer (never held at the front door)."""
    return f"{settings.kafka_client_id}.rotation"


async def unread(settings: Settings, pairs: Iterable[tuple[str, str]], whole: Iterable[str] = ()) -> list[Kept]:
    """Every record past the lowest committed offset of the groups in `pairs` ((topic, group)), and
    every record of the `whole` topics (read by clients whose groups are not known here: edge
    agents, dashboards)."""
    pairs = sorted(set(pairs) | {(topic, "") for topic in whole})
    reader = AIOKafkaConsumer(**client_kwargs(settings), client_id=rotation_client_id(settings),  # type: ignore[arg-type]
                              enable_auto_commit=False, auto_offset_reset="earliest")
    await reader.start()
    try:
        existing = await reader.topics()
        partitions = {t: len(reader.partitions_for_topic(t) or ()) for t, _ in pairs if t in existing}
        committed = await committed_offsets(settings, [(t, g) for t, g in pairs if g], partitions)
        committed |= {("", TopicPartition(t, p)): 0 for t, g in pairs if not g for p in range(partitions.get(t, 0))}
        start: dict[TopicPartition, int] = {}
        for (_, tp), offset in committed.items():
            start[tp] = min(start.get(tp, offset or 0), offset or 0)
        if not start:
            return []
        reader.assign(list(start))
        for tp, offset in start.items():
            reader.seek(tp, offset)
        return await _read_until_quiet(reader)
    finally:
        await reader.stop()


async def _read_until_quiet(reader: AIOKafkaConsumer) -> list[Kept]:
    kept: list[Kept] = []
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < QUIET_MS / 1000:
        batch = await reader.getmany(timeout_ms=100, max_records=5000)
        for tp, records in sorted(batch.items()):
            if records:
                quiet_since = time.monotonic()
            kept += [Kept(tp.topic, tp.partition, r.key, r.value, tuple(r.headers or ()), r.timestamp) for r in records]
    return kept


async def put_back(settings: Settings, kept: list[Kept], *, attempts: int = 3) -> None:
    """Write `kept` to the broker, each record to its partition, in order (retried whole: a record
    written twice is skipped by its consumer's inbox)."""
    if not kept:
        return
    for attempt in range(attempts):
        producer = AIOKafkaProducer(**client_kwargs(settings), client_id=rotation_client_id(settings),  # type: ignore[arg-type]
                                    acks="all", enable_idempotence=False, linger_ms=5, max_batch_size=1 << 20,
                                    max_request_size=1 << 26)
        try:
            await producer.start()
            sent = [await producer.send(k.topic, k.value, key=k.key, partition=k.partition, timestamp_ms=k.timestamp_ms,
                                        headers=list(k.headers)) for k in kept]
            await asyncio.gather(*sent)
            return
        except Exception:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(1.0)
        finally:
            await producer.stop()


async def epoch_now(settings: Settings) -> str | None:
    """The broker's epoch before a planned restart (None: no process has checked one yet)."""
    return await kafka.first_epoch(settings, client_id=rotation_client_id(settings))


async def continue_epoch(settings: Settings, previous: str | None) -> None:
    """After the records are back: the fresh broker's first epoch message says it continues
    `previous`, so the services do not re-publish their outboxes (`libs/bus/epoch.py`)."""
    if previous is not None:
        await kafka.write_epoch(settings, kafka.planned_epoch(previous), client_id=rotation_client_id(settings))
