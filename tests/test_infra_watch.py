"""The embedded stack watches its broker and PostgreSQL: a death is said once, repaired, and the
work goes on; while the broker is down a service's log says so about once per 10 s, not on every
retry (issue 15: 21,864 "Unable connect to node" lines in three minutes, then a hung bench)."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from test_broker_restart import _spread

from visionloop.contracts import Envelope, ImageAccepted
from visionloop.libs.bus import Runtime
from visionloop.libs.embedded import EmbeddedBroker, EmbeddedPostgres, EmbeddedStack
from visionloop.libs.infrawatch import Watch, Watched, tail
from visionloop.libs.logthrottle import RepeatFilter, kind_of


def _records(caplog: Any, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


async def _wait(predicate: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.2)
    return bool(predicate())


async def test_a_killed_broker_is_said_once_restarted_and_the_work_finishes(settings, pool, tmp_path: Path, caplog) -> None:  # noqa: ANN001
    """SIGKILL the stack's broker while a service emits to another: one line says it died (how,
    and its log's last lines), it serves again on the same port, and every event arrives."""
    caplog.set_level(logging.WARNING, logger="visionloop.embedded")
    stack = EmbeddedStack(settings.model_copy(update={"kafka_bootstrap": None, "state_dir": tmp_path / "state"}))
    settings = stack.start()
    assert stack.broker is not None and stack.postgres is None  # PostgreSQL is the suite's own here
    received: dict[str, float] = {}

    async def record(event: Envelope[ImageAccepted], unit: Any) -> None:
        received.setdefault(event.payload.submission_id, time.monotonic())

    consumer = Runtime("watch-consumer", settings, pool=pool)
    consumer.consume(ImageAccepted, record)
    producer = Runtime("watch-producer", settings, pool=pool)
    producer.produces(ImageAccepted)
    events = _spread(240)
    port = stack.broker.port
    try:
        await consumer.start()
        await producer.start()
        for n, event in enumerate(events):
            await producer.emit(event, project="p")
            if n == 60:
                os.kill(stack.broker.process.pid, signal.SIGKILL)
            await asyncio.sleep(0.02)
        assert await _wait(lambda: len(received) == len(events), 90), f"{len(events) - len(received)} events never arrived"
        died = _records(caplog, "embedded broker died")
        assert len(died) == 1, died
        assert "killed by SIGKILL" in died[0] and "broker.log" in died[0]
        assert len(_records(caplog, "embedded broker restarted")) == 1
        assert stack.broker.port == port and stack.broker.dead() is None
        assert stack.watched()["broker"]["deaths"] == 1 and stack.watched()["broker"]["restarts"] == 1
    finally:
        await producer.stop()
        await consumer.stop()
        stack.stop()
    assert stack.broker.dead() is not None and stack.watch is None  # stopped on purpose: nothing restarts it


async def test_a_killed_postgres_is_restarted_on_its_data_folder(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    """The same for the embedded PostgreSQL (not a child of ours: no exit status); the data stays."""
    caplog.set_level(logging.WARNING, logger="visionloop.embedded")
    postgres = EmbeddedPostgres(tmp_path / "pg")
    url = await asyncio.to_thread(postgres.start)
    lock = __import__("threading").Lock()
    watch = Watch([Watched("PostgreSQL", postgres.dead, postgres.restart, postgres.log_path)], lock, interval_s=0.2)
    try:
        conn = await asyncpg.connect(url)
        await conn.execute("CREATE TABLE kept (n int); INSERT INTO kept VALUES (7)")
        await conn.close()
        watch.start()
        os.kill(postgres.server.get_pid(), signal.SIGKILL)  # type: ignore[union-attr]
        assert await _wait(lambda: _records(caplog, "embedded PostgreSQL restarted"), 60), [r.getMessage() for r in caplog.records]
        assert len(_records(caplog, "embedded PostgreSQL died")) == 1
        conn = await asyncpg.connect(url)
        assert await conn.fetchval("SELECT n FROM kept") == 7
        await conn.close()
    finally:
        watch.stop()
        await asyncio.to_thread(postgres.stop)


@pytest.mark.slow
async def test_a_broker_down_is_said_about_once_per_10_s(settings, pool, tmp_path: Path) -> None:  # noqa: ANN001
    """Two services keep working against a broker that is gone for 25 s: what the log's handler
    writes stays within one line of a kind per 10 s (the filter counts what it leaves out)."""
    broker = EmbeddedBroker(tmp_path / "broker.log")
    settings = settings.model_copy(update={"kafka_bootstrap": broker.start()})
    written = io.StringIO()
    handler = logging.StreamHandler(written)
    throttle = RepeatFilter()
    handler.addFilter(throttle)
    root = logging.getLogger()
    root.addHandler(handler)

    async def nothing(event: Envelope[ImageAccepted], unit: Any) -> None:
        return None

    consumer = Runtime("flood-consumer", settings, pool=pool)
    consumer.consume(ImageAccepted, nothing)
    producer = Runtime("flood-producer", settings, pool=pool)
    producer.produces(ImageAccepted)
    try:
        await consumer.start()
        await producer.start()
        await asyncio.to_thread(broker.stop)
        started = time.monotonic()
        for event in _spread(50):
            await producer.emit(event, project="p")
            await asyncio.sleep(0.5)
        down_s = time.monotonic() - started
        await asyncio.to_thread(broker.start)
        await asyncio.sleep(2)
    finally:
        root.removeHandler(handler)
        await producer.stop()
        await consumer.stop()
        broker.stop()
    lines = [line for line in written.getvalue().splitlines() if line.strip()]
    kinds = {line.split(" [", 1)[0] for line in lines}
    allowed = len(kinds) * (int(down_s // 10) + 2)
    assert throttle.suppressed > 0, "nothing repeated: the test did not take the broker away"
    assert len(lines) <= allowed, f"{len(lines)} lines in {down_s:.0f} s ({len(kinds)} kinds):\n" + "\n".join(lines[:40])


def test_repeats_are_counted_and_kafka_connection_errors_are_one_kind() -> None:
    now = [0.0]
    throttle = RepeatFilter(10.0, clock=lambda: now[0])

    def record(name: str, msg: str, *args: object, level: int = logging.ERROR) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, msg, args, None)

    first = record("aiokafka.client", "Unable connect to node with id %s: %s", 1, "refused")
    assert kind_of(first) == kind_of(record("aiokafka.conn", "Unable to update metadata from %s", [0]))
    assert throttle.filter(first)
    assert not throttle.filter(record("aiokafka.conn", "Unable to update metadata from %s", [0]))
    assert throttle.filter(record("aiokafka.client", "some other trouble"))  # not about connecting: its own kind
    assert throttle.filter(record("x", "a line", level=logging.INFO)) and throttle.filter(record("x", "a line", level=logging.INFO))
    assert throttle.filter(record("x", "same")) and not throttle.filter(record("x", "same"))
    assert throttle.filter(record("x", "other"))
    now[0] = 10.5
    again = record("aiokafka.client", "Unable connect to node with id %s: %s", 2, "refused")
    assert throttle.filter(again) and again.getMessage().endswith("[1 more like this since the last one shown]")
    assert throttle.suppressed == 2


def test_tail_quotes_the_last_lines(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("".join(f"line {n}\n" for n in range(100)) + "\n\n")
    assert tail(log, 3) == "line 97 | line 98 | line 99"
    assert tail(tmp_path / "missing.log") == ""
