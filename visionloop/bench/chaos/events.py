"""The bench's own event reader: every event of the run, kept once by id, across broker restarts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import defaultdict
from typing import Any

from visionloop.bench.chaos.config import PROJECT

log = logging.getLogger(__name__)


class EventLog:
    """Every event on the loop's topics, once per event id, across broker restarts.

    After a broker restart `reconnect()` makes the reader start over on the fresh broker (its
    positions mean nothing there); events the stack re-publishes are recognised by their id.
    """

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.events: dict[str, dict[str, Any]] = {}
        self.by_type: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
        self.copies = 0
        """Records of events already read (the relay's and the replay's re-publications)."""
        self.reconnects = 0
        self.decided: dict[str, str] = {}
        """Submission id -> `accepted` or the reject reason (from the first decision read)."""
        self.accepted: dict[str, str] = {}
        """Submission id -> image id."""
        self.verified: set[str] = set()
        """Image ids with a verified label (not the test set's)."""
        self.test_verified = 0
        self.last_change = time.monotonic()
        self._reconnect = asyncio.Event()

    def reconnect(self) -> None:
        """Start over on the (fresh) broker."""
        self._reconnect.set()

    def of(self, event_type: str) -> list[dict[str, Any]]:
        """Events of one type read so far."""
        return self.by_type.get(event_type, [])

    def add(self, raw: bytes | None) -> None:
        """One record: kept when its event id is new."""
        try:
            event = json.loads(raw or b"")
            event_id = str(event["event_id"])
        except (ValueError, KeyError, TypeError):
            return
        if event_id in self.events:
            self.copies += 1
            return
        self.events[event_id] = event
        kind = str(event.get("event_type"))
        self.by_type[kind].append(event)
        if kind not in ("pipeline.status", "device.status"):
            self.last_change = time.monotonic()
        with contextlib.suppress(KeyError, TypeError, AttributeError):
            payload = event["payload"]
            if kind in ("image.accepted", "image.rejected") and event.get("project") == PROJECT:
                self.decided.setdefault(payload["submission_id"], "accepted" if kind == "image.accepted" else payload["reason"])
                if kind == "image.accepted":
                    self.accepted.setdefault(payload["submission_id"], payload["image"]["image_id"])
            elif kind == "label.verified" and event.get("project") == PROJECT:
                if payload.get("for_test_set"):
                    self.test_verified += 1
                else:
                    self.verified.add(payload["image"]["image_id"])

    async def run(self) -> None:
        """Read every registry topic from the beginning until cancelled, reconnecting when asked or broken."""
        from aiokafka import AIOKafkaConsumer

        from visionloop.contracts import TOPICS
        from visionloop.libs.kafka import consumer_kwargs, ensure_topics

        topics = [self.settings.topic(spec.name) for spec in TOPICS.values()]
        while True:
            self._reconnect.clear()
            with contextlib.suppress(Exception):  # a broker still restarting: the reader's start retries
                await ensure_topics(self.settings, TOPICS.values())
            reader = AIOKafkaConsumer(*topics, **(consumer_kwargs(self.settings) | {"fetch_max_wait_ms": 20}),
                                      auto_offset_reset="earliest", enable_auto_commit=False, group_id=None)
            try:
                await reader.start()
                while not self._reconnect.is_set():
                    batch = await reader.getmany(timeout_ms=200)
                    for records in batch.values():
                        for record in records:
                            self.add(record.value)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker went away under the reader: start over
                log.warning("chaos: event reader: %s; reconnecting", exc)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await reader.stop()
            self.reconnects += 1
