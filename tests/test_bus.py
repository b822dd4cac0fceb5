"""The bus against the real broker and the real PostgreSQL: delivery, dead letters, inbox, outbox."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import eventually, produce, publish, read_topic
from recorder import effects, recorder

from visionloop.contracts import (
    DeadLetter,
    Envelope,
    ImageAccepted,
    ImageIngested,
    ImageRef,
    ImageSource,
    ImageSubmitted,
    topic_of,
)
from visionloop.libs.blob import open_blob_store
from visionloop.libs.bus import Runtime
from visionloop.libs.embedded import EmbeddedBroker
from visionloop.libs.scenes import render_scene
from visionloop.libs.service import Adapters
from visionloop.services.ingest.config import IngestSettings
from visionloop.services.ingest.service import SPEC as INGEST

HERE = Path(__file__).parent


def _ingested(n: int) -> ImageIngested:
    digest = hashlib.sha256(f"image-{n}".encode()).hexdigest()
    return ImageIngested(
        submission_id=f"s-{n}",
        image=ImageRef(
            image_id=digest,
            blob_uri=f"file:///blobs/{digest}",
            width=64,
            height=48,
            format="PNG",
            byte_size=100,
        ),
        source=ImageSource(domain={"site": "a"}),
    )


def _ingest_runtime(settings, pool) -> Runtime:  # noqa: ANN001
    runtime = Runtime("ingest", settings, pool=pool, migrations=INGEST.migrations)
    INGEST.wire(runtime, Adapters(blobs=open_blob_store(settings.blob_location)), IngestSettings())
    return runtime


async def test_contract_round_trip_between_two_services(settings, pool) -> None:  # noqa: ANN001
    """ingest consumes `image submitted` and emits `image ingested`; a second service consumes that."""
    ingest, rec = _ingest_runtime(settings, pool), recorder(settings, pool)
    await ingest.start()
    await rec.start()
    try:
        scene = render_scene(seed=7)
        sent = await publish(settings, ImageSubmitted(submission_id="sub-1", inline_bytes=scene.encode()), project="roundtrip")
        recorded = await eventually(lambda: effects(pool, settings))
        assert recorded == [hashlib.sha256(scene.encode()).hexdigest()]
        accepted = await read_topic(settings, topic_of(ImageAccepted, settings.topic_prefix), 1)
        envelope = Envelope[ImageAccepted].model_validate(accepted[0])
        assert envelope.project == "roundtrip"
        assert envelope.payload.image.width == 320 and envelope.payload.image.height == 240
        # correlation follows the image; causation chains back through ingest's event
        ingested = Envelope[ImageIngested].model_validate(
            (await read_topic(settings, topic_of(ImageIngested, settings.topic_prefix), 1))[0]
        )
        assert ingested.causation_id == sent.event_id
        assert envelope.causation_id == ingested.event_id
        assert envelope.correlation_id == ingested.correlation_id == envelope.payload.image.image_id
        assert ingested.producer.startswith("ingest/")
    finally:
        await rec.stop()
        await ingest.stop()


async def test_poison_messages_go_to_dead_letter_and_consumer_keeps_going(settings, pool) -> None:  # noqa: ANN001
    rec = recorder(settings, pool)
    await rec.start()
    topic = topic_of(ImageIngested, settings.topic_prefix)
    good = Envelope.of(_ingested(1), producer="test", project="p")
    future_major = json.loads(Envelope.of(_ingested(2), producer="test", project="p").model_dump_json())
    future_major["schema_version"] = "2.0"
    wrong_type = json.loads(Envelope.of(_ingested(3), producer="test", project="p").model_dump_json())
    wrong_type["event_type"] = "image.accepted"
    violation = json.loads(Envelope.of(_ingested(4), producer="test", project="p").model_dump_json())
    violation["payload"]["image"]["width"] = -5
    try:
        await produce(settings, topic, b"\xff\xfe not json at all", key=b"k")
        await produce(settings, topic, b'{"hello": "world"}', key=b"k")
        await produce(settings, topic, json.dumps(future_major).encode(), key=b"k")
        await produce(settings, topic, json.dumps(wrong_type).encode(), key=b"k")
        await produce(settings, topic, json.dumps(violation).encode(), key=b"k")
        await produce(settings, topic, good.model_dump_json().encode(), key=b"k")
        assert await eventually(lambda: effects(pool, settings)) == [good.payload.image.image_id]
        letters = await read_topic(settings, topic_of(DeadLetter, settings.topic_prefix), 5)
        parsed = [Envelope[DeadLetter].model_validate(m).payload for m in letters]
        assert [p.reason.value for p in parsed] == [
            "not_json", "not_an_envelope", "unsupported_version", "unexpected_event_type", "schema_violation",
        ]
        first = parsed[0]
        assert first.original.topic == topic and first.original.value_text is None
        assert first.original.value_base64  # bytes that are not UTF-8 are kept as base64
        assert parsed[4].original.value_text and "width" in parsed[4].message
        assert all(p.consumer_group == f"{settings.topic_prefix}recorder.image.ingested" for p in parsed)
        offsets = [p.original.offset for p in parsed]
        assert offsets == sorted(offsets)
    finally:
        await rec.stop()


async def test_failing_handler_retries_then_dead_letters_and_continues(settings, pool) -> None:  # noqa: ANN001
    bad, fine = _ingested(10), _ingested(11)
    attempts: list[str] = []
    rec = recorder(settings, pool, fail_for={bad.image.image_id}, attempts=attempts)
    await rec.start()
    try:
        await publish(settings, bad, key="same-partition")
        await publish(settings, fine, key="same-partition")
        # the failing handler's effects were rolled back each time; the next event went through
        assert await eventually(lambda: effects(pool, settings)) == [fine.image.image_id]
        assert attempts.count(bad.image.image_id) == settings.handler_max_attempts
        [letter] = await read_topic(settings, topic_of(DeadLetter, settings.topic_prefix), 1)
        dead = Envelope[DeadLetter].model_validate(letter)
        assert dead.payload.reason.value == "handler_failed"
        assert dead.payload.attempts == settings.handler_max_attempts
        assert dead.payload.error_type == "RuntimeError" and "on purpose" in dead.payload.message
        assert dead.project == "demo"  # the dead letter stays in the original event's project
        outcome = await pool.fetchval(
            f'SELECT outcome FROM "{rec.schema}".inbox WHERE event_id = $1', dead.payload.original_event_id
        )
        assert outcome == "dead_lettered"
    finally:
        await rec.stop()


async def test_redelivered_event_has_its_effect_once(settings, pool) -> None:  # noqa: ANN001
    rec = recorder(settings, pool)
    await rec.start()
    try:
        envelope = Envelope.of(_ingested(20), producer="test", project="p")
        raw = envelope.model_dump_json().encode()
        topic = topic_of(ImageIngested, settings.topic_prefix)
        for _ in range(3):  # an at-least-once producer retried twice
            await produce(settings, topic, raw, key=b"k")
        await eventually(lambda: rec.counters["duplicates_skipped"] == 2)
        assert await effects(pool, settings) == [envelope.payload.image.image_id]
    finally:
        await rec.stop()


def _spawn(settings, mode: str) -> subprocess.Popen[bytes]:  # noqa: ANN001
    env = {**os.environ, **{f"VL_{k.upper()}": str(v) for k, v in {
        "kafka_bootstrap": settings.kafka_bootstrap, "kafka_embedded": "true",
        "database_url": settings.database_url, "topic_prefix": settings.topic_prefix,
        "schema_prefix": settings.schema_prefix, "outbox_relay_interval_s": 0.2,
    }.items()}, "RECORDER_MODE": mode}
    return subprocess.Popen([sys.executable, str(HERE / "procs" / "recorder_proc.py")], env=env)


async def test_handler_killed_between_effect_and_commit_does_not_apply_twice(settings, pool) -> None:  # noqa: ANN001
    """SIGKILL after the effect's transaction committed, before the offset commit and the publish."""
    sent = await publish(settings, _ingested(30))
    first = _spawn(settings, "kill-after-effect")
    assert await asyncio.to_thread(first.wait, 60) == -signal.SIGKILL
    assert await effects(pool, settings) == [sent.payload.image.image_id]
    second = _spawn(settings, "run")
    try:
        # the event is redelivered (offset never committed) and skipped by the inbox ...
        await eventually(lambda: _inbox_rows(pool, settings), timeout=30)
        # ... and the event the killed process committed but never published goes out via the relay
        accepted = await read_topic(settings, topic_of(ImageAccepted, settings.topic_prefix), 1, timeout=30)
        assert len(accepted) == 1
        await eventually(lambda: _lag_is_zero(settings), timeout=30)
        assert await effects(pool, settings) == [sent.payload.image.image_id]
    finally:
        second.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(second.wait, 30) == 0


async def _inbox_rows(pool, settings) -> int:  # noqa: ANN001
    return await pool.fetchval(f'SELECT count(*) FROM "{settings.schema_for("recorder")}".inbox')


async def _lag_is_zero(settings) -> bool:  # noqa: ANN001
    from visionloop.libs.observe import snapshot

    topic = topic_of(ImageIngested, settings.topic_prefix)
    snap = await snapshot(settings, [(topic, f"{settings.topic_prefix}recorder.image.ingested")])
    return bool(snap.lags) and sum(lag.lag for lag in snap.lags) == 0


async def test_fresh_broker_is_refed_from_the_outbox(settings, pool, tmp_path) -> None:  # noqa: ANN001
    """A restarted embedded broker lost every topic: work in flight is re-derived from PostgreSQL."""
    first_broker = EmbeddedBroker(tmp_path / "broker1.log")
    settings = settings.model_copy(update={"kafka_bootstrap": first_broker.start()})
    try:
        ingest = _ingest_runtime(settings, pool)
        await ingest.start()
        await publish(settings, ImageSubmitted(submission_id="before-restart", inline_bytes=render_scene(seed=3).encode()))
        await eventually(lambda: ingest.counters["handled"] == 1)
        await ingest.stop()
    finally:
        first_broker.stop()  # the ingested event, never consumed downstream, is gone with it
    second_broker = EmbeddedBroker(tmp_path / "broker2.log")
    settings = settings.model_copy(update={"kafka_bootstrap": second_broker.start()})
    try:
        ingest, rec = _ingest_runtime(settings, pool), recorder(settings, pool)
        await ingest.start()  # sees a new broker epoch and re-publishes its retained outbox
        await rec.start()
        assert ingest.counters["epoch_replays"] == 1
        recorded = await eventually(lambda: effects(pool, settings), timeout=30)
        assert recorded == [hashlib.sha256(render_scene(seed=3).encode()).hexdigest()]
        await rec.stop()
        await ingest.stop()
    finally:
        second_broker.stop()


def test_emitting_an_undeclared_contract_is_refused(settings) -> None:  # noqa: ANN001
    runtime = Runtime("lonely", settings, pool=None)
    with pytest.raises(ValueError, match="produces"):
        runtime.outgoing(Envelope.of(_ingested(1), producer="x", project="p"), None)


async def test_topics_are_created_from_the_registry_and_existing_ones_tolerated(settings) -> None:  # noqa: ANN001
    from aiokafka.admin import AIOKafkaAdminClient

    from visionloop.contracts import TOPICS
    from visionloop.libs.kafka import client_kwargs, ensure_topics

    created = await ensure_topics(settings, TOPICS.values())
    assert len(created) == len(TOPICS)
    assert await ensure_topics(settings, TOPICS.values()) == []  # a second start finds them all
    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    await admin.start()
    try:
        described = await admin.describe_topics([settings.topic(s.name) for s in TOPICS.values()])
    finally:
        await admin.close()
    partitions = {d["topic"]: len(d["partitions"]) for d in described}
    assert partitions == {settings.topic(s.name): s.partitions for s in TOPICS.values()}


async def test_inbox_rows_older_than_the_retention_are_pruned_by_the_relay_loop(settings, pool) -> None:  # noqa: ANN001
    """The inbox would otherwise grow forever (every handled event, heartbeats included)."""
    settings = settings.model_copy(update={"inbox_retention_s": 3600.0, "outbox_retention_s": 60.0})
    rec = recorder(settings, pool)
    await rec.start()
    try:
        sent = [await publish(settings, _ingested(40 + n)) for n in range(3)]
        await eventually(lambda: rec.counters["handled"] == 3)
        inbox = f'"{rec.schema}".inbox'
        old = [sent[0].event_id, sent[1].event_id]
        # Two handled long ago (past the retention), one just now.
        await pool.execute(f"UPDATE {inbox} SET handled_at = now() - interval '2 hours' WHERE event_id = ANY($1::uuid[])", old)
        # The relay loop (every outbox_relay_interval_s) prunes them; the recent one stays.
        await eventually(lambda: rec.counters["inbox_pruned"] == 2, timeout=10)
        assert [r["event_id"] for r in await pool.fetch(f"SELECT event_id FROM {inbox}")] == [sent[2].event_id]
        assert await rec.prune_inbox() == 0
    finally:
        await rec.stop()


def test_the_inbox_must_outlive_the_outbox() -> None:
    """A re-fed broker replays outbox events that old: their consumers must still skip them."""
    from visionloop.libs.settings import Settings

    with pytest.raises(ValueError, match="inbox_retention_s"):
        Settings(inbox_retention_s=60.0, outbox_retention_s=3600.0)
    assert Settings().inbox_retention_s >= Settings().outbox_retention_s
