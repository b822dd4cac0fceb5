"""The publishing side of the bus: outbox rows, the producer, acknowledgements and the relay.

Every emitted event is an outbox row written in the transaction of the effect that caused it.
After the commit it is handed to the producer at once (the fast path) and its row is marked
published when the broker acknowledges it; the relay sends whatever the fast path did not.

A row marked published must mean the record is readable on the broker, and a restarted embedded
broker acknowledges records it never stores (libs/kafka.py). So:

- nothing is sent while the bus is `held` (a connection broke, or the broker's epoch is being
  checked), nor to a topic whose partition count in the producer's metadata is not the
  registry's: those rows wait for the relay;
- an acknowledgement counts only in the generation it was sent in (`new_generation` drops every
  acknowledgement still on its way when the broker turns out to be a new one);
- marks are written under a share lock of the schema's recorded broker epoch and only when it is
  the epoch this process verified, so a replica that has not yet noticed a new broker cannot mark
  rows another replica has just queued for re-publication.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections import Counter
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer

from visionloop.libs import kafka
from visionloop.libs.bus.unit import Outgoing
from visionloop.libs.db import quote_ident
from visionloop.libs.settings import Settings

log = logging.getLogger(__name__)

LOG_EVERY_S = 10.0
"""A repeated publishing problem is logged at most this often (per process and kind)."""


class Outbox:
    """Outbox rows, the producer that sends them, and the relay, for one service's schema."""

    def __init__(self, service: str, settings: Settings, schema: str, pool: asyncpg.Pool | None, counters: Counter[str]) -> None:
        self.service = service
        self.settings = settings
        self.schema = quote_ident(schema)
        self.pool = pool
        self.counters = counters
        self.topics: dict[str, int] = {}
        """Every topic this service publishes to, with the registry's partition count."""
        self.producer: AIOKafkaProducer | None = None
        self.epoch: str | None = None
        """The broker epoch this process has verified (None before the first check)."""
        self.held = True
        """Nothing is sent while set: before the first epoch check, and while the broker is suspect."""
        self.suspect: str | None = None
        """Why the broker's epoch should be checked again soon (a failed send, odd metadata)."""
        self.generation = 0
        self._published: list[int] = []
        self._unacked: set[asyncio.Future[Any]] = set()
        self._inflight: set[int] = set()
        """Outbox ids handed to the producer and not yet acknowledged (the relay leaves them alone)."""
        self._logged: dict[str, float] = {}

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the producer and let it learn every topic it will publish to."""
        self.producer = AIOKafkaProducer(**kafka.producer_kwargs(self.settings))  # type: ignore[arg-type]
        await self.producer.start()
        await self.producer.client.set_topics(list(self.topics))

    async def stop(self) -> None:
        """Send what the producer holds, wait briefly for acknowledgements, write the marks."""
        if self.producer is not None:
            try:
                await asyncio.wait_for(self.producer.stop(), timeout=15)  # flushes what it holds before it closes
            except TimeoutError:
                log.warning("%s: the producer did not flush within 15 s; the relay sends the rest", self.service)
        if self._unacked:
            await asyncio.wait(set(self._unacked), timeout=10)
        if self.pool is not None and not self.held:
            try:
                await self.flush_marks()
            except Exception as exc:
                log.warning("%s: outbox marks not written at stop: %s", self.service, exc)

    def new_generation(self) -> None:
        """Forget every acknowledgement still to come or not yet written: the broker changed."""
        self.generation += 1
        self._published.clear()
        self._inflight.clear()

    # -- what may be sent ---------------------------------------------------------------------------
    def ready(self, topic: str) -> bool:
        """Whether `topic` may be published to now: not held, and the producer's metadata shows
        the registry's partition count (otherwise a key would map to another partition, or to one
        the broker does not have)."""
        if self.held or self.producer is None:
            return False
        known = kafka.known_partitions(self.producer, topic)
        if known == self.topics.get(topic):
            return True
        self.distrust(f"the producer's metadata shows {known} partitions of {topic}, the registry {self.topics.get(topic)}")
        return False

    def distrust(self, why: str) -> None:
        """Note a reason to check the broker's epoch on the relay's next tick."""
        self.suspect = self.suspect or why
        self.say("distrust", "%s: %s; the relay checks the broker", why)

    def say(self, kind: str, message: str, *args: Any) -> None:
        """Log a warning of this kind at most once per LOG_EVERY_S."""
        now = time.monotonic()
        if now - self._logged.get(kind, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._logged[kind] = now
            log.warning(message, self.service, *args)

    # -- rows -----------------------------------------------------------------------------------------
    async def store(self, conn: asyncpg.Connection, outgoing: list[Outgoing]) -> None:
        """Write the outbox rows of `outgoing` in the caller's transaction."""
        if not outgoing:
            return
        if len(outgoing) == 1:  # the common case: plain parameters encode cheaper than arrays
            (out,) = outgoing
            out.outbox_id = await conn.fetchval(
                f"""INSERT INTO {self.schema}.outbox (event_id, topic, key, value, headers)
                    VALUES ($1, $2, $3, $4, $5::jsonb) RETURNING id""",
                out.envelope.event_id, out.topic, out.key, out.value, json.dumps(out.headers),
            )
            return
        rows = await conn.fetch(
            f"""INSERT INTO {self.schema}.outbox (event_id, topic, key, value, headers)
                SELECT * FROM unnest($1::uuid[], $2::text[], $3::bytea[], $4::bytea[], $5::jsonb[])
                RETURNING id""",
            [o.envelope.event_id for o in outgoing],
            [o.topic for o in outgoing],
            [o.key for o in outgoing],
            [o.value for o in outgoing],
            [json.dumps(o.headers) for o in outgoing],
        )
        for out, row in zip(outgoing, rows, strict=True):
            out.outbox_id = row["id"]

    # -- sending --------------------------------------------------------------------------------------
    async def _hand_over(self, topic: str, value: bytes, key: bytes | None, headers: dict[str, str]) -> asyncio.Future[Any]:
        assert self.producer is not None
        return await self.producer.send(
            topic, value, key=key, headers=[(k, v.encode()) for k, v in headers.items()]
        )

    async def publish_after_commit(self, outgoing: list[Outgoing], *, concurrently: bool = False) -> None:
        """Fast path: hand what was just committed to the producer; the relay covers the rest.

        Events are handed over in order (so in order on the wire, per partition) without waiting
        for acknowledgements; each acknowledgement marks its row. An ordered list stops at the
        first event that cannot go (the relay sends the rest in order); `concurrently` (a batch
        of independent events) skips only that event.
        """
        generation = self.generation
        for out in outgoing:
            try:
                if not self.ready(out.topic):
                    raise _NotNow
                acked = await self._hand_over(out.topic, out.value, out.key, out.headers)
            except Exception as exc:
                self.counters["publish_deferred"] += 1
                if not isinstance(exc, _NotNow):
                    self.distrust(f"a publish to {out.topic} failed ({type(exc).__name__}: {exc})")
                if concurrently:
                    continue
                self.counters["publish_deferred"] += len(outgoing) - outgoing.index(out) - 1
                return
            self._unacked.add(acked)
            if out.outbox_id is not None:
                self._inflight.add(out.outbox_id)
            acked.add_done_callback(functools.partial(self._on_ack, out, generation))

    def _on_ack(self, out: Outgoing, generation: int, acked: asyncio.Future[Any]) -> None:
        self._unacked.discard(acked)
        self._inflight.discard(out.outbox_id)  # type: ignore[arg-type]
        problem = acked.exception() if not acked.cancelled() else asyncio.CancelledError()
        if problem is not None:
            self.counters["publish_deferred"] += 1
            self.distrust(f"a publish to {out.topic} was not acknowledged ({type(problem).__name__})")
            return
        self.counters["published"] += 1
        if out.outbox_id is not None and generation == self.generation:
            self._published.append(out.outbox_id)

    async def send_now(self, out: Outgoing) -> bool:
        """Send one ephemeral event (no outbox row) and wait for its acknowledgement; False when
        the bus is held or the topic not ready (it is then not sent at all)."""
        if not self.ready(out.topic):
            return False
        await (await self._hand_over(out.topic, out.value, out.key, out.headers))
        self.counters["published"] += 1
        return True

    # -- marks and the relay ------------------------------------------------------------------------
    async def _epoch_holds(self, conn: asyncpg.Connection) -> bool:
        """Lock the recorded broker epoch (share) for this transaction; True if it is ours."""
        recorded = await conn.fetchval(
            f"SELECT value FROM {self.schema}.bus_state WHERE name = 'broker_epoch' FOR SHARE"
        )
        if recorded == self.epoch and self.epoch is not None:
            return True
        self.distrust("another process of this service recorded a new broker epoch")
        return False

    async def flush_marks(self) -> None:
        """Mark the acknowledged rows published (see the module's note on epochs)."""
        if not self._published or self.pool is None:
            return
        ids, self._published = self._published, []
        async with self.pool.acquire() as conn, conn.transaction():
            if not await self._epoch_holds(conn):
                return  # the rows stay unpublished: the relay sends them again, the inbox skips copies
            await conn.execute(
                f"UPDATE {self.schema}.outbox SET published_at = now() WHERE id = ANY($1::bigint[]) AND published_at IS NULL",
                ids,
            )

    async def relay_once(self, *, min_age_s: float = 2.0, limit: int = 500) -> int:
        """Publish unpublished outbox rows older than `min_age_s`; return how many went out."""
        assert self.pool is not None
        if self.held:
            return 0
        await self.flush_marks()
        generation = self.generation
        async with self.pool.acquire() as conn, conn.transaction():
            if not await self._epoch_holds(conn):
                return 0
            # SKIP LOCKED lets several replicas of one service relay without sending a row twice.
            rows = await conn.fetch(
                f"""SELECT id, topic, key, value, headers FROM {self.schema}.outbox
                    WHERE published_at IS NULL AND created_at < now() - make_interval(secs => $1)
                      AND id <> ALL($3::bigint[])
                    ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED""",
                min_age_s,
                limit,
                list(self._inflight),
            )
            done = await self._send_rows(rows)
            if done and generation == self.generation:
                await conn.execute(f"UPDATE {self.schema}.outbox SET published_at = now() WHERE id = ANY($1::bigint[])", done)
                self.counters["relayed"] += len(done)
            await conn.execute(
                f"DELETE FROM {self.schema}.outbox WHERE published_at < now() - make_interval(secs => $1)",
                self.settings.outbox_retention_s,
            )
        return len(done) if generation == self.generation else 0

    async def _send_rows(self, rows: list[asyncpg.Record]) -> list[int]:
        """Hand rows over in order until one cannot go; the ids the broker acknowledged."""
        sent: list[tuple[int, asyncio.Future[Any]]] = []
        for row in rows:
            if not self.ready(row["topic"]):
                break
            key = bytes(row["key"]) if row["key"] is not None else None
            try:
                sent.append((row["id"], await self._hand_over(row["topic"], bytes(row["value"]), key, json.loads(row["headers"]))))
            except Exception as exc:
                self.distrust(f"the relay could not publish to {row['topic']} ({type(exc).__name__}: {exc})")
                break
        done = []
        for row_id, acked in sent:
            try:
                await acked
            except Exception as exc:
                self.distrust(f"a relayed publish was not acknowledged ({type(exc).__name__}: {exc})")
                continue
            done.append(row_id)
        return done

    async def prune_inbox(self) -> int:
        """Delete inbox rows older than `inbox_retention_s` (no redelivery reaches back that far); how many went."""
        assert self.pool is not None
        status = await self.pool.execute(
            f"DELETE FROM {self.schema}.inbox WHERE handled_at < now() - make_interval(secs => $1)",
            self.settings.inbox_retention_s,
        )
        pruned = int(status.split()[-1])
        self.counters["inbox_pruned"] += pruned
        return pruned


class _NotNow(Exception):
    """The fast path leaves an event to the relay (held, or the topic not ready)."""
