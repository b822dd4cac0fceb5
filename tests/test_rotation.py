"""The embedded broker's planned restart (`libs/rotation.py`): due over the memory limit, done only
when every consumer group has caught up, said in few lines; and on a real stack, work submitted
across a rotation is all decided."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Any

from visionloop.libs.infrawatch import Watch
from visionloop.libs.rotation import Rotation


def _rotation(rss: list[float | None], behind: list[str], restarts: list[float]) -> Rotation:
    return Rotation(100.0, rss_mb=lambda: rss[0], behind=lambda: behind[0], restart=lambda: restarts.append(time.monotonic()),
                    check_every_s=1.0, waiting_check_every_s=30.0)


def test_due_only_over_the_limit_and_only_every_check(caplog) -> None:  # noqa: ANN001
    caplog.set_level(logging.WARNING, logger="visionloop.embedded")
    rss, behind, restarts = [50.0], [""], []
    rotation = _rotation(rss, behind, restarts)
    assert rotation.due(0.0) is None
    rss[0] = 150.0
    assert rotation.due(0.5) is None  # not time to look yet
    assert rotation.due(1.0) == 150.0
    assert rotation.due(2.0) == 150.0 and rotation.due(3.0) is None and rotation.due(32.0) == 150.0  # then every 30 s while it waits
    assert len([r for r in caplog.records if "restarting it as soon as" in r.getMessage()]) == 1  # said once
    rss[0] = None  # not running: nothing to rotate
    assert rotation.due(62.0) is None
    assert Rotation(0, lambda: 10_000.0, lambda: "", lambda: None).due(0.0) is None  # 0: never


def test_waits_for_the_groups_then_rotates_and_counts(caplog) -> None:  # noqa: ANN001
    caplog.set_level(logging.WARNING, logger="visionloop.embedded")
    rss, behind, restarts = [150.0], ["ingest on vl.image.submitted.v1 (12)"], []
    rotation = _rotation(rss, behind, restarts)
    assert rotation.due(0.0) == 150.0
    assert not rotation.quiet(1.0) and not rotation.quiet(400.0)
    assert len([r for r in caplog.records if "still waiting" in r.getMessage()]) == 1
    behind[0] = ""
    assert rotation.quiet(401.0)
    rotation.rotate(150.0)
    assert rotation.rotations == 1 and len(restarts) == 1 and rotation.history[0]["rss_mb"] == 150.0
    assert any("restarted to give back 150 MB (rotation 1" in r.getMessage() for r in caplog.records)
    rotation.behind = lambda: (_ for _ in ()).throw(ConnectionError("broker busy"))  # unreadable lag is not quiet
    assert not rotation.quiet(402.0)


def test_the_watch_rotates_outside_its_death_checks() -> None:
    rss, behind, restarts = [150.0], [""], []
    watch = Watch([], threading.Lock(), interval_s=0.05)
    watch.rotation = _rotation(rss, behind, restarts)
    watch.rotation.check_every_s = 0.05
    watch.start()
    try:
        deadline = time.monotonic() + 5
        while not restarts and time.monotonic() < deadline:
            time.sleep(0.05)
        rss[0] = 10.0  # a fresh broker is small: no second rotation
        time.sleep(0.3)
    finally:
        watch.stop()
    assert len(restarts) == 1


async def test_a_stack_rotates_its_broker_and_the_work_goes_on(settings, pool, tmp_path: Path, caplog) -> None:  # noqa: ANN001
    """A real broker over a tiny limit: restarted once the consumer has caught up, topics back with
    the registry's partitions at once, and every event emitted after it arrives."""
    from test_broker_restart import _spread

    from visionloop.contracts import Envelope, ImageAccepted
    from visionloop.libs.bus import Runtime
    from visionloop.libs.embedded import EmbeddedStack
    from visionloop.contracts.topics import TOPICS
    from visionloop.libs.kafka import ensure_topics

    caplog.set_level(logging.WARNING, logger="visionloop.embedded")
    stack = EmbeddedStack(settings.model_copy(update={"kafka_bootstrap": None, "state_dir": tmp_path / "state"}))
    settings = stack.start()
    received: dict[str, float] = {}

    async def record(event: Envelope[ImageAccepted], unit: Any) -> None:
        received.setdefault(event.payload.submission_id, time.monotonic())

    consumer = Runtime("rotation-consumer", settings, pool=pool)
    consumer.consume(ImageAccepted, record)
    producer = Runtime("rotation-producer", settings, pool=pool)
    producer.produces(ImageAccepted)
    events = _spread(120)
    caught_up = asyncio.Event()
    try:
        await consumer.start()
        await producer.start()
        for event in events[:60]:
            await producer.emit(event, project="p")
        while len(received) < 60:
            await asyncio.sleep(0.1)
        caught_up.set()
        stack.rotate_broker(1, behind=lambda: "" if caught_up.is_set() else "consumer behind",
                            after_start=lambda: asyncio.run(ensure_topics(settings, [TOPICS[ImageAccepted]])))
        stack.watch.rotation.check_every_s = 0.2  # type: ignore[union-attr]
        deadline = time.monotonic() + 30
        while stack.watched()["broker"].get("rotations", 0) < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        stack.rotate_broker(0, behind=lambda: "")  # once is enough for the test
        assert stack.watched()["broker"]["rotations"] == 1
        for event in events[60:]:
            await producer.emit(event, project="p")
            await asyncio.sleep(0.02)
        deadline = time.monotonic() + 90
        while len(received) < len(events) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert len(received) == len(events), f"{len(events) - len(received)} events after the rotation never arrived"
        assert stack.watched()["broker"]["deaths"] == 0  # planned: not a death
    finally:
        await producer.stop()
        await consumer.stop()
        stack.stop()
