"""What `visionloop status` shows: running services, consumer lag per group, last events."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer, TopicPartition

from visionloop.contracts import TOPICS
from visionloop.libs.kafka import client_kwargs
from visionloop.libs.lag import committed_offsets, true_ends
from visionloop.libs.settings import Settings


@dataclass
class GroupLag:
    """How far one consumer group is behind on its topic."""

    group: str
    topic: str
    committed: int
    end: int

    @property
    def lag(self) -> int:
        """Messages not yet handled and committed."""
        return max(self.end - self.committed, 0)


@dataclass
class LastEvent:
    """The newest message on a topic."""

    topic: str
    messages: int
    event_type: str | None = None
    occurred_at: str | None = None
    producer: str | None = None
    project: str | None = None


@dataclass
class Instance:
    """A service instance as its latest status event describes it."""

    service: str
    instance: str
    kind: str
    seen_s_ago: float
    uptime_s: float
    counters: dict[str, int] = field(default_factory=dict)


@dataclass
class Snapshot:
    """Everything `status` reports."""

    bootstrap: str
    instances: list[Instance]
    lags: list[GroupLag]
    last_events: list[LastEvent]

    def to_json(self) -> str:
        """The snapshot as one JSON object."""
        data = asdict(self)
        for item, lag in zip(data["lags"], self.lags, strict=True):
            item["lag"] = lag.lag
        return json.dumps(data)


async def snapshot(settings: Settings, groups: list[tuple[str, str]], *, status_window_s: float = 60.0) -> Snapshot:
    """Read the broker: lag of `groups` ((topic, group) pairs), newest events, live instances.

    Committed offsets are read first and each partition's end after them, as one past its last
    record actually read (the embedded broker reports end offsets low: `libs/lag.py`), so a
    group's committed offset never shows above the end and its lag never reads 0 while records
    wait."""
    kwargs = client_kwargs(settings)
    reader = AIOKafkaConsumer(**kwargs, enable_auto_commit=False)  # type: ignore[arg-type]
    await reader.start()
    try:
        existing = await reader.topics()
        names = [settings.topic(spec.name) for spec in TOPICS.values() if settings.topic(spec.name) in existing]
        partitions = {name: sorted(reader.partitions_for_topic(name) or ()) for name in names}
        committed = await committed_offsets(settings, groups, {n: len(partitions[n]) for n in names})
        tps = [TopicPartition(n, p) for n in names for p in partitions[n]]
        ends = await true_ends(reader, dict(await reader.end_offsets(tps)), 300) if tps else {}
        lags = [
            GroupLag(group, topic, sum(committed.get((group, TopicPartition(topic, p))) or 0 for p in partitions[topic]),
                     sum(ends.get(TopicPartition(topic, p), 0) for p in partitions[topic]))
            for topic, group in groups if topic in partitions
        ]
        last = await _last_events(reader, names, partitions, ends)
        instances = await _instances(reader, settings, partitions, ends, status_window_s)
    finally:
        await reader.stop()
    return Snapshot(settings.kafka_bootstrap or "", instances, lags, last)


async def _read_at(reader: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> bytes | None:
    reader.assign([tp])
    reader.seek(tp, offset)
    batch = await reader.getmany(tp, timeout_ms=2000, max_records=1)
    records = batch.get(tp, [])
    return records[0].value if records else None


async def _last_events(reader: AIOKafkaConsumer, names: list[str], partitions: dict[str, list[int]], ends: dict[TopicPartition, int]) -> list[LastEvent]:
    events = []
    for name in names:
        total = sum(ends.get(TopicPartition(name, p), 0) for p in partitions[name])
        item = LastEvent(topic=name, messages=total)
        newest: tuple[str, dict[str, object]] | None = None
        for p in partitions[name]:
            tp = TopicPartition(name, p)
            if ends.get(tp, 0) == 0:
                continue
            value = await _read_at(reader, tp, ends[tp] - 1)
            try:
                data = json.loads(value or b"")
            except ValueError:
                continue
            stamp = str(data.get("occurred_at", ""))
            if newest is None or stamp > newest[0]:
                newest = (stamp, data)
        if newest is not None:
            data = newest[1]
            item.event_type = str(data.get("event_type"))
            item.occurred_at = str(data.get("occurred_at"))
            item.producer = str(data.get("producer"))
            item.project = str(data.get("project"))
        events.append(item)
    return events


async def _instances(reader: AIOKafkaConsumer, settings: Settings, partitions: dict[str, list[int]], ends: dict[TopicPartition, int], window_s: float) -> list[Instance]:
    from visionloop.contracts import PipelineStatus
    from visionloop.contracts.topics import spec_for

    topic = settings.topic(spec_for(PipelineStatus).name)
    if topic not in partitions:
        return []
    latest: dict[tuple[str, str], Instance] = {}
    now = datetime.now(UTC)
    for p in partitions[topic]:
        tp = TopicPartition(topic, p)
        end = ends.get(tp, 0)
        start = max(end - 500, 0)  # enough recent status events to see every live instance
        reader.assign([tp])
        reader.seek(tp, start)
        deadline = time.monotonic() + 5
        position = start
        while position < end and time.monotonic() < deadline:
            batch = await reader.getmany(tp, timeout_ms=500)
            for record in batch.get(tp, []):
                position = record.offset + 1
                try:
                    data = json.loads(record.value)
                    payload = data["payload"]
                    seen = (now - datetime.fromisoformat(data["occurred_at"])).total_seconds()
                except (ValueError, KeyError, TypeError):
                    continue
                latest[(payload["service"], payload["instance"])] = Instance(
                    service=payload["service"],
                    instance=payload["instance"],
                    kind=payload["kind"],
                    seen_s_ago=round(seen, 1),
                    uptime_s=round(float(payload.get("uptime_s", 0.0)), 1),
                    counters=payload.get("counters", {}),
                )
            await asyncio.sleep(0)
    return sorted(
        (i for i in latest.values() if i.seen_s_ago <= window_s and i.kind != "stopped"),
        key=lambda i: (i.service, i.instance),
    )
