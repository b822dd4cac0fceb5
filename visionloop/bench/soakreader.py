"""The soak's decision reader: every image's decision and what the recognizer made of it, read
across broker restarts (`visionloop bench soak`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

FOLLOWER_GROUP = "bench.soak.follower"
"""The decision reader's consumer group: a rotation keeps what it has not read yet."""
FOLLOWED = ("ImageAccepted", "ImageRejected", "ImageRecognized", "ImageUnrecognized")


def followed_topics(settings: Any) -> list[str]:
    from visionloop import contracts

    return [contracts.topic_of(getattr(contracts, name), settings.topic_prefix) for name in FOLLOWED]


async def follow(settings: Any, broker_pid: Callable[[], int | None], tally: Any, project: str) -> None:
    """Read every image's decision (accepted / rejected) and what the recognizer made of it, each
    event once by its id; from the start of every topic again whenever the broker was restarted
    (its offsets begin at 0 again)."""
    from aiokafka import AIOKafkaConsumer

    from visionloop import contracts
    from visionloop.contracts.topics import spec_for
    from visionloop.libs.kafka import consumer_kwargs, ensure_topics

    await ensure_topics(settings, [spec_for(getattr(contracts, name)) for name in FOLLOWED])  # some may not exist yet
    # Offsets are committed here, never in the background: a background commit could write the lost
    # broker's positions to the fresh one before the reader noticed the restart, and the reader would
    # then resume there and skip the start of the fresh log (seen: 35,944 of 57,600 over 5 rotations).
    reader = AIOKafkaConsumer(*followed_topics(settings), **consumer_kwargs(settings), group_id=FOLLOWER_GROUP,  # type: ignore[arg-type]
                              auto_offset_reset="earliest", enable_auto_commit=False)
    await reader.start()
    broker, committed_at = broker_pid(), time.monotonic()
    try:
        while True:
            if broker_pid() != broker:
                if not reader.assignment():
                    await asyncio.sleep(0.1)  # rejoining the fresh broker's group: no position to move yet
                    continue
                broker = broker_pid()
                await reader.seek_to_beginning(*reader.assignment())
            batch = await reader.getmany(timeout_ms=500)
            for records in batch.values():
                for record in records:
                    _tally_decision(record.value, tally, project)
            if time.monotonic() - committed_at > 1.0 and broker_pid() == broker:
                committed_at = time.monotonic()
                with contextlib.suppress(Exception):  # a rebalance under way: the next commit does it
                    await reader.commit()
    finally:
        await reader.stop()


def _tally_decision(value: bytes, tally: Any, project: str) -> None:
    with contextlib.suppress(ValueError, KeyError, TypeError):
        event = json.loads(value)
        if event.get("project") != project or event["event_id"] in tally.seen:
            return
        tally.seen.add(event["event_id"])
        payload, kind = event["payload"], event["event_type"]
        if kind == "image.accepted":
            tally.decisions.setdefault(payload["submission_id"], "accepted")
        elif kind == "image.rejected":
            tally.decisions.setdefault(payload["submission_id"], str(payload["reason"]))
        else:
            tally.downstream[kind] += 1
