"""The embedded broker's planned restart (`libs/rotation.py`): due over the memory limit, retried
after a failure, said in one line; the front door holds produce requests; and on a real stack,
records an outside producer has acknowledged while a slow consumer lags all arrive across a
rotation."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from visionloop.libs.frontdoor import FrontDoor, client_id_of
from visionloop.libs.infrawatch import Watch
from visionloop.libs.rotation import Rotation


def _rotation(rss: list[float | None], restarts: list[float], fail: list[bool] | None = None) -> Rotation:
    def restart() -> int:
        if fail and fail[0]:
            raise RuntimeError("door stuck")
        restarts.append(time.monotonic())
        return 7

    return Rotation(100.0, rss_mb=lambda: rss[0], restart=restart, check_every_s=1.0)


def test_due_only_over_the_limit_and_only_every_check() -> None:
    rss, restarts = [50.0], []
    rotation = _rotation(rss, restarts)
    assert rotation.due(0.0) is None
    rss[0] = 150.0
    assert rotation.due(0.5) is None  # not time to look yet
    assert rotation.due(1.0) == 150.0
    rss[0] = None  # not running: nothing to rotate
    assert rotation.due(2.0) is None
    assert Rotation(0, lambda: 10_000.0, lambda: 0).due(0.0) is None  # 0: never


def test_rotates_counts_and_tries_again_a_minute_after_a_failure(caplog) -> None:  # noqa: ANN001
    caplog.set_level(logging.WARNING, logger="visionloop.embedded")
    rss, restarts, fail = [150.0], [], [True]
    rotation = _rotation(rss, restarts, fail)
    assert rotation.due(0.0) == 150.0
    with pytest.raises(RuntimeError):
        rotation.rotate(150.0)
    assert rotation.rotations == 0 and rotation.due(time.monotonic() + 5) is None  # not before a minute
    fail[0] = False
    rotation.rotate(150.0)
    assert rotation.rotations == 1 and len(restarts) == 1
    assert rotation.history[0]["rss_mb"] == 150.0 and rotation.history[0]["kept"] == 7
    assert any("restarted to give back 150 MB" in r.getMessage() and "7 unread record(s) written back" in r.getMessage()
               for r in caplog.records)


def test_the_watch_rotates_outside_its_death_checks() -> None:
    rss, restarts = [150.0], []
    watch = Watch([], threading.Lock(), interval_s=0.05)
    watch.rotation = _rotation(rss, restarts)
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


def _request(api_key: int, correlation: int, client_id: str) -> bytes:
    cid = client_id.encode()
    body = api_key.to_bytes(2, "big") + (3).to_bytes(2, "big") + correlation.to_bytes(4, "big") + len(cid).to_bytes(2, "big") + cid
    return len(body).to_bytes(4, "big") + body


def test_a_planned_epoch_continues_only_the_one_it_names() -> None:
    from visionloop.libs.kafka import continues, planned_epoch

    first = "a" * 32
    second = planned_epoch(first)
    third = planned_epoch(second)
    assert continues(second, first) and continues(third, second)
    assert not continues(third, first)  # a process that missed a life replays (it may have missed a death's)
    assert not continues(first, None) and not continues(second, None) and not continues("b" * 32, first)
    assert third.count("+") == 1  # the chain does not grow with rotations


def test_a_produce_request_with_acks_0_expects_no_answer() -> None:
    """The door waits for the answers of forwarded produce requests, so it must know which get one."""
    from visionloop.libs.frontdoor import answer_expected

    def produce(version: int, acks: int, transactional: bytes | None = None) -> bytes:
        head = (0).to_bytes(2, "big") + version.to_bytes(2, "big") + (7).to_bytes(4, "big") + (3).to_bytes(2, "big") + b"cli"
        if version >= 9:
            txn = b"\x00" if transactional is None else bytes([len(transactional) + 1]) + transactional
            return head + b"\x00" + txn + acks.to_bytes(2, "big", signed=True) + b"rest"
        if version >= 3:
            txn = b"\xff\xff" if transactional is None else len(transactional).to_bytes(2, "big") + transactional
            return head + txn + acks.to_bytes(2, "big", signed=True) + b"rest"
        return head + acks.to_bytes(2, "big", signed=True) + b"rest"

    for version in (2, 3, 7, 9, 11):
        assert answer_expected(produce(version, -1)) and answer_expected(produce(version, 1))
        assert not answer_expected(produce(version, 0)), version
        assert not answer_expected(produce(version, 0, b"txn-1")), version
    assert answer_expected(b"\x00\x00")  # unreadable: assume an answer comes


def test_client_id_of_a_request() -> None:
    assert client_id_of(_request(0, 1, "visionloop.ingest")[4:]) == "visionloop.ingest"
    assert client_id_of(b"\x00\x00\x00\x03\x00\x00\x00\x01\xff\xff") is None  # null client id: not the exempt one
    assert client_id_of(b"\x00\x00") is None


def test_the_door_holds_produce_requests_but_not_the_exempt_ones_or_others() -> None:
    """An echo server stands in for the broker: while the door holds, a produce request of an
    ordinary client waits; a fetch, and the exempt client's produce, pass; release lets it on."""
    inner = socket.create_server(("127.0.0.1", 0))
    inner_port = inner.getsockname()[1]

    def answer(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                answer = data[8:12]  # one request per send in this test; the answer: its correlation id
                conn.sendall(len(answer).to_bytes(4, "big") + answer)

    def serve() -> None:
        while True:
            threading.Thread(target=answer, args=(inner.accept()[0],), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    door = FrontDoor("127.0.0.1", port, inner_port, exempt_client_id="vl.rotation")
    door.start()
    try:
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        client.sendall(_request(1, 1, "app"))
        assert client.recv(65536)[4:8] == (1).to_bytes(4, "big")
        assert door.hold(timeout_s=2) == 0
        client.sendall(_request(0, 2, "app"))  # produce: held
        client.settimeout(0.5)
        with pytest.raises(TimeoutError):
            client.recv(65536)
        assert door.held_requests == 1
        other = socket.create_connection(("127.0.0.1", port), timeout=5)
        other.sendall(_request(0, 3, "vl.rotation"))  # the exempt client's produce passes
        assert other.recv(65536)[4:8] == (3).to_bytes(4, "big")
        other.close()
        door.release()
        client.settimeout(5)
        assert client.recv(65536)[4:8] == (2).to_bytes(4, "big")
        client.close()
    finally:
        door.stop()
        inner.close()


async def test_a_rotation_loses_no_record_an_outside_producer_had_acknowledged(settings, pool, tmp_path: Path, caplog) -> None:  # noqa: ANN001
    """A real broker behind its door, over a tiny limit: an upstream producer (a plain Kafka client)
    sends steadily while a slow consuming service lags; the broker is rotated mid-stream, and every
    record the producer had acknowledged reaches the consumer; a rotation is not a death."""
    from aiokafka import AIOKafkaProducer

    from test_broker_restart import _spread

    from visionloop.app import rotate_embedded_broker
    from visionloop.contracts import Envelope, ImageAccepted, topic_of
    from visionloop.contracts.topics import TOPICS
    from visionloop.libs.bus import Runtime
    from visionloop.libs.embedded import EmbeddedStack
    from visionloop.libs.kafka import client_kwargs, ensure_topics

    caplog.set_level(logging.WARNING, logger="visionloop.embedded")
    stack = EmbeddedStack(settings.model_copy(update={"kafka_bootstrap": None, "state_dir": tmp_path / "state",
                                                      "embedded_broker_max_mb": 0}))
    settings = stack.start(door=True)
    await ensure_topics(settings, [TOPICS[ImageAccepted]])
    received: dict[str, float] = {}

    async def record(event: Envelope[ImageAccepted], unit: Any) -> None:
        await asyncio.sleep(0.01)  # slow: the group lags behind the producer
        received.setdefault(event.payload.submission_id, time.monotonic())

    consumer = Runtime("rotation-consumer", settings, pool=pool)
    consumer.consume(ImageAccepted, record)
    topic = topic_of(ImageAccepted, settings.topic_prefix)
    producer = AIOKafkaProducer(**client_kwargs(settings), acks="all", linger_ms=0, request_timeout_ms=30_000)  # type: ignore[arg-type]
    acknowledged: list[str] = []
    events = _spread(600)

    async def send(event: ImageAccepted) -> None:
        await producer.send_and_wait(topic, Envelope.of(event, producer="upstream", project="p").model_dump_json().encode(),
                                     key=event.image.image_id.encode())
        acknowledged.append(event.submission_id)

    try:
        await consumer.start()
        await producer.start()
        sends = []
        for n, event in enumerate(events):
            sends.append(asyncio.create_task(send(event)))
            await asyncio.sleep(0.01)
            if n == 300:
                rotate_embedded_broker(stack, settings.model_copy(update={"embedded_broker_max_mb": 1}), [],
                                       groups=consumer.subscriptions)
            if n > 300 and stack.watched()["broker"].get("rotations", 0):
                stack.rotate_broker(0, unread=list, put_back=lambda kept: None)  # once is enough for the test
        await asyncio.gather(*sends, return_exceptions=True)
        deadline = time.monotonic() + 120
        while not set(acknowledged) <= set(received) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        watched = stack.watched()["broker"]
        assert watched.get("rotations", 0) == 1, caplog.text
        missing = set(acknowledged) - set(received)
        assert not missing, f"{len(missing)} acknowledged records never arrived after {watched['rotation_history']}"
        assert len(acknowledged) == len(events)  # the held produce requests were sent again, to the fresh broker
        assert watched["deaths"] == 0
        assert (consumer.counters["epoch_continued"], consumer.counters["epoch_replays"]) == (1, 0)  # planned: no replay
    finally:
        await producer.stop()
        await consumer.stop()
        stack.stop()
