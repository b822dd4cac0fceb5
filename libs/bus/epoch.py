"""The broker's epoch: noticing a broker that lost its topics, and what the bus does then.

The embedded broker keeps everything in memory; restarted, it has no topics, records or offsets.
Each life of the broker has an id, its epoch (`kafka.broker_epoch`). Each process verifies the
epoch before it publishes or commits anything, and again whenever one of its Kafka connections
breaks (a restarted broker always breaks them), a publish fails, or a client's metadata disagrees
with the registry; at the latest every 30 relay ticks.

From the moment a connection breaks until the check is done the bus is *held*: no event is handed
to the producer (the relay sends it later) and no handler returns (so no offset is committed to a
broker whose topics nobody has re-created yet). On a new epoch, still held:

1. every acknowledgement still to come is dropped (`Outbox.new_generation`);
2. the registry's topics are created where missing, and the producer's and every consumer's
   metadata must show each with the registry's partition count;
3. every running consumer is rewound to offset 0 of its partitions (a consumer that lived through
   the restart still holds the lost broker's positions and would skip the start of every fresh
   log; the inbox skips what was handled already);
4. the schema's retained outbox is queued for re-publication (once per schema and epoch), so work
   in flight is re-derived downstream; not after a planned restart (`libs/rotation.py`), whose
   epoch names the one it continues: that restart wrote back every record no group had read, and
   an outbox row not yet marked published is sent again anyway.

Then the bus is released. Consumers are also watched between checks: one whose metadata shows a
topic with fewer partitions than the registry says is named in the log (once) and re-subscribed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from visionloop.libs import kafka

if TYPE_CHECKING:
    from visionloop.libs.bus.runtime import Runtime

log = logging.getLogger(__name__)

METADATA_WAIT_S = 30.0
"""Longest wait for the clients' metadata to show the registry's topics after a new epoch."""


class Stopping(Exception):
    """The service stops while the bus is held: the message is not acknowledged (redelivered later)."""


class Epoch:
    """The epoch guard of one runtime (see the module's note)."""

    def __init__(self, runtime: "Runtime") -> None:
        self.rt = runtime
        self.verified = asyncio.Event()
        """Set while the bus may publish and commit."""
        self.wake = asyncio.Event()
        """Set to make the relay loop tick now."""
        self.ok = False
        """True between a check that passed and the next hold."""
        self._short: set[str] = set()

    # -- holding ------------------------------------------------------------------------------------
    def connection_lost(self, where: str) -> None:
        """A Kafka connection of this process broke: hold until the epoch is checked."""
        self.hold(f"a connection to the broker ({where}) broke")

    def hold(self, why: str) -> None:
        """Stop publishing and committing until the next check; wake the relay for it."""
        outbox = self.rt.outbox
        if self.rt.pool is None:  # no outbox, no relay: nothing to hold, nobody to check
            return
        if self.ok:
            outbox.say("hold", "%s: %s; holding publishes and offset commits until the broker's epoch is checked", why)
        self.ok = False
        self.verified.clear()
        outbox.held = True
        self.wake.set()

    async def wait_verified(self) -> None:
        """Return once the bus may commit (a handler's offset); raise `Stopping` if it stops first."""
        if self.ok:
            return
        await self.verified.wait()
        if not self.ok:
            raise Stopping(f"{self.rt.service} stopped before it could check the broker's epoch")

    def release(self) -> None:
        """Let the bus publish and commit again."""
        self.rt.outbox.held = False
        self.rt.outbox.suspect = None
        self.ok = True
        self.verified.set()

    def stop(self) -> None:
        """Wake every handler that waits (they raise `Stopping` unless the bus is verified)."""
        self.verified.set()

    # -- checking -------------------------------------------------------------------------------------
    async def check(self, *, clients_running: bool = True) -> bool:
        """Verify the broker's epoch (steps 1-4 of the module's note on a new one), then release.

        Returns True when the epoch was new to this process (or not the one recorded for its
        schema: a check that raced a restart may have recorded a stale one). A broker that cannot
        be reached raises, and the bus stays held.
        """
        rt, outbox = self.rt, self.rt.outbox
        epoch = await kafka.broker_epoch(rt.settings)
        if epoch == outbox.epoch and await self._recorded() == epoch:
            self.release()
            return False
        if outbox.epoch is not None:
            self.hold("the broker's epoch is new to this process")
        outbox.held = True
        outbox.new_generation()
        await kafka.ensure_topics(rt.settings, rt.specs())
        await self._wait_for_metadata(clients_running)
        if clients_running:
            await self._rewind_consumers()
        await self._record(epoch)
        outbox.epoch = epoch
        outbox.new_generation()
        self.release()
        return True

    async def _recorded(self) -> str | None:
        """The epoch recorded for the schema (by this process or another of the same service)."""
        assert self.rt.pool is not None
        return await self.rt.pool.fetchval(f"SELECT value FROM {self.rt.outbox.schema}.bus_state WHERE name = 'broker_epoch'")

    async def _record(self, epoch: str) -> None:
        """Record the epoch for the schema; the first process to see it queues the replay."""
        rt = self.rt
        assert rt.pool is not None
        schema = rt.outbox.schema
        async with rt.pool.acquire() as conn, conn.transaction():
            last = await conn.fetchval(f"SELECT value FROM {schema}.bus_state WHERE name = 'broker_epoch' FOR UPDATE")
            if last == epoch:
                return
            if kafka.continues(epoch, last):
                log.info("%s: the broker was restarted by plan with its unread records; nothing to re-publish", rt.service)
                rt.counters["epoch_continued"] += 1
            elif last is not None:
                replayed = await conn.execute(f"UPDATE {schema}.outbox SET published_at = NULL WHERE published_at IS NOT NULL")
                log.warning(
                    "%s: the broker lost its topics (new epoch); re-publishing retained events (%s)", rt.service, replayed
                )
                rt.counters["epoch_replays"] += 1
            await conn.execute(
                f"""INSERT INTO {schema}.bus_state (name, value) VALUES ('broker_epoch', $1)
                    ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value""",
                epoch,
            )

    def _clients(self, consumers: bool) -> list[tuple[Any, dict[str, int]]]:
        """(client, {topic: partitions it must show}) for the producer and, if asked, every consumer."""
        rt = self.rt
        clients: list[tuple[Any, dict[str, int]]] = [(rt.outbox.producer, dict(rt.outbox.topics))]
        if consumers:
            for sub in rt.subscriptions_running():
                clients.append((sub.consumer, {rt.settings.topic(sub.spec.name): sub.spec.partitions}))
        return [(client, topics) for client, topics in clients if client is not None]

    async def _wait_for_metadata(self, consumers: bool) -> None:
        """Until every client's metadata shows each of its topics with the registry's count."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + METADATA_WAIT_S
        while True:
            wrong = [
                f"{topic}: {kafka.known_partitions(client, topic)} of {want}"
                for client, topics in self._clients(consumers)
                for topic, want in topics.items()
                if kafka.known_partitions(client, topic) != want
            ]
            if not wrong:
                return
            if loop.time() > deadline:
                raise RuntimeError(f"after {METADATA_WAIT_S:.0f} s the clients' metadata still shows {', '.join(wrong[:5])}")
            for client, _ in self._clients(consumers):
                await asyncio.wait_for(kafka.refresh_metadata(client), timeout=5)
            await asyncio.sleep(0.1)

    async def _rewind_consumers(self) -> None:
        """Every running consumer back to offset 0 of its partitions, and that offset committed."""
        rt = self.rt
        for sub in rt.subscriptions_running():
            consumer = sub.consumer
            partitions = consumer.assignment()
            if not partitions:
                continue
            for partition in partitions:
                consumer.seek(partition, 0)
            try:
                await consumer.commit({partition: 0 for partition in partitions})
            except Exception as exc:  # a rebalance under way: its new assignment starts from no committed offset
                log.warning("%s: rewound consumer could not commit offset 0: %s", rt.service, exc)
            rt.counters["consumers_rewound"] += 1

    # -- watching between checks -------------------------------------------------------------------
    async def inspect(self) -> str | None:
        """Cheap checks on the clients' metadata (nothing asked of the broker); a reason to check the
        epoch now, or None. A consumer that sees too few partitions is re-subscribed."""
        rt = self.rt
        producer = rt.outbox.producer
        if producer is not None:
            for topic, want in rt.outbox.topics.items():
                known = kafka.known_partitions(producer, topic)
                if known is None:
                    return f"the producer's metadata has no topic {topic}"
                if known != want:
                    return f"the producer's metadata shows {known} partitions of {topic}, the registry {want}"
        await self._watch_consumers()
        return None

    async def _watch_consumers(self) -> None:
        rt = self.rt
        for sub in rt.subscriptions_running():
            topic, want = rt.settings.topic(sub.spec.name), sub.spec.partitions
            known = kafka.known_partitions(sub.consumer, topic)
            if known is None or known >= want:
                continue
            if topic not in self._short:
                self._short.add(topic)
                log.warning(
                    "%s: consumer group %s sees %d partitions of %s, the registry says %d; re-subscribing",
                    rt.service, sub.group, known, topic, want,
                )
            rt.counters["consumers_resubscribed"] += 1
            await kafka.refresh_metadata(sub.consumer)
            listener = getattr(getattr(sub.consumer, "_subscription", None), "listener", None)
            sub.consumer.subscribe(topics=[topic], listener=listener)
