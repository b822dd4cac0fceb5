"""How far consumer groups are behind, per partition, measured so that the embedded broker's habits
cannot fool it.

Tansu reports end offsets low (19,942 of 20,000 records produced, all of them readable), so a lag
computed from end offsets alone reads too low and can even put a committed offset above the end.
Here the end of each partition is one past the last record actually read from it, reading from the
reported end onwards (the records past it are few), or the reported end if nothing lies past it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from visionloop.libs.kafka import client_kwargs
from visionloop.libs.settings import Settings


@dataclass
class PartitionLag:
    """One consumer group on one partition."""

    topic: str
    partition: int
    group: str
    end: int
    """One past the last record (the reported end or the last record read, whichever is larger)."""
    reported_end: int
    """The end offset the broker reported."""
    committed: int | None
    """The group's committed offset (None: nothing committed)."""

    @property
    def lag(self) -> int:
        """Records past the committed offset (a committed offset past the end counts as caught up)."""
        return max(self.end - (self.committed or 0), 0)

    @property
    def ahead(self) -> int:
        """How far the committed offset lies past the end: above 0 only for an offset committed on a
        broker that has since lost its log (the group would skip that many fresh records)."""
        return max((self.committed or 0) - self.end, 0)


@dataclass
class LagReport:
    """Every (topic, group) pair asked for, per partition."""

    partitions: list[PartitionLag] = field(default_factory=list)
    topic_partitions: dict[str, int] = field(default_factory=dict)
    """Each topic's partition count on the broker (absent: the topic does not exist)."""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: per topic its partitions, per group its lag per partition."""
        topics: dict[str, Any] = {}
        for p in self.partitions:
            entry = topics.setdefault(p.topic, {"partitions": self.topic_partitions.get(p.topic), "end": {}, "reported_end": {}, "groups": {}})
            entry["end"][str(p.partition)] = p.end
            entry["reported_end"][str(p.partition)] = p.reported_end
            group = entry["groups"].setdefault(p.group, {"committed": {}, "lag": {}})
            group["committed"][str(p.partition)] = p.committed
            group["lag"][str(p.partition)] = p.lag
            if p.ahead:
                group.setdefault("ahead", {})[str(p.partition)] = p.ahead
        return topics


async def read_partitions(settings: Settings, groups: Iterable[tuple[str, str]], *, quiet_ms: int = 300) -> LagReport:
    """Lag of every (topic, group) pair, per partition, against each partition's true end."""
    pairs = sorted(set(groups))
    topics = sorted({topic for topic, _ in pairs})
    report = LagReport()
    reader = AIOKafkaConsumer(**client_kwargs(settings), enable_auto_commit=False)  # type: ignore[arg-type]
    await reader.start()
    try:
        existing = await reader.topics()
        for topic in topics:
            if topic in existing:
                report.topic_partitions[topic] = len(reader.partitions_for_topic(topic) or ())
        # Committed offsets first, ends after: on a busy topic the other order would show a group
        # that commits between the two readings as committed past the end.
        committed = await committed_offsets(settings, pairs, report.topic_partitions)
        tps = [TopicPartition(t, p) for t in report.topic_partitions for p in range(report.topic_partitions[t])]
        reported = dict(await reader.end_offsets(tps)) if tps else {}
        ends = await true_ends(reader, reported, quiet_ms) if tps else {}
    finally:
        await reader.stop()
    for topic, group in pairs:
        for p in range(report.topic_partitions.get(topic, 0)):
            tp = TopicPartition(topic, p)
            report.partitions.append(PartitionLag(topic, p, group, ends.get(tp, 0), reported.get(tp, 0), committed.get((group, tp))))
    return report


async def true_ends(reader: AIOKafkaConsumer, reported: dict[TopicPartition, int], quiet_ms: int) -> dict[TopicPartition, int]:
    """One past the last record of every partition, reading on from the reported end until nothing
    more comes for `quiet_ms`."""
    tps = list(reported)
    reader.assign(tps)
    for tp in tps:
        reader.seek(tp, reported[tp])
    ends = dict(reported)
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < quiet_ms / 1000:
        batch = await reader.getmany(timeout_ms=100, max_records=5000)
        for tp, records in batch.items():
            if records:
                quiet_since = time.monotonic()
                ends[tp] = max(ends[tp], records[-1].offset + 1)
    return ends


async def committed_offsets(settings: Settings, pairs: Iterable[tuple[str, str]], partitions: dict[str, int]) -> dict[tuple[str, TopicPartition], int | None]:
    """Each group's committed offset on each partition of its topic (read without joining the group)."""
    result: dict[tuple[str, TopicPartition], int | None] = {}
    for topic, group in pairs:
        if topic not in partitions:
            continue
        consumer = AIOKafkaConsumer(**client_kwargs(settings), group_id=group, enable_auto_commit=False)  # type: ignore[arg-type]
        await consumer.start()  # not subscribed: reads committed offsets without joining
        try:
            for p in range(partitions[topic]):
                tp = TopicPartition(topic, p)
                result[(group, tp)] = await consumer.committed(tp)
        finally:
            await consumer.stop()
    return result


@dataclass
class Progress:
    """Groups with lag, told apart by whether their committed offsets moved between two readings."""

    stuck: dict[str, dict[int, int]]
    """'topic group' -> {partition: lag} where the lag is above 0 and the committed offset did not move."""
    slow: dict[str, int]
    """'topic group' -> total lag, where some committed offset moved."""
    ahead: dict[str, dict[int, int]]
    """'topic group' -> {partition: how far} where the committed offset lies past the end."""
    caught_up: list[str]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


async def progress(settings: Settings, groups: Iterable[tuple[str, str]], *, interval_s: float = 10.0) -> Progress:
    """Read every group's lag twice, `interval_s` apart: a group whose committed offsets moved is slow,
    one with lag whose offsets stood still is stuck (on the partitions where they stood still)."""
    pairs = list(groups)
    before = {(p.topic, p.group, p.partition): p for p in (await read_partitions(settings, pairs)).partitions}
    await asyncio.sleep(interval_s)
    after = (await read_partitions(settings, pairs)).partitions
    stuck: dict[str, dict[int, int]] = {}
    ahead: dict[str, dict[int, int]] = {}
    slow: dict[str, int] = {}
    totals: dict[str, int] = {}
    for p in after:
        key = f"{p.topic} {p.group}"
        totals[key] = totals.get(key, 0) + p.lag + p.ahead
        if p.ahead:
            ahead.setdefault(key, {})[p.partition] = p.ahead
        earlier = before.get((p.topic, p.group, p.partition))
        if p.lag == 0:
            continue
        if earlier is not None and earlier.lag > 0 and earlier.committed == p.committed:
            stuck.setdefault(key, {})[p.partition] = p.lag
        else:
            slow[key] = slow.get(key, 0) + p.lag
    return Progress(stuck=stuck, slow=slow, ahead=ahead, caught_up=sorted(k for k, v in totals.items() if v == 0))


async def consumer_groups(settings: Settings) -> list[str]:
    """The name of every consumer group the broker knows (anyone's: filter by name)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**client_kwargs(settings))  # type: ignore[arg-type]
    await admin.start()
    try:
        listed = await admin.list_consumer_groups()
    finally:
        await admin.close()
    return sorted({group for group, *_ in listed})
