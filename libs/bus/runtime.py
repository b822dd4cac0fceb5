"""One service's connection to the loop: the wiring of its handlers and the lifecycle of its clients."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import asyncpg
from faststream import AckPolicy
from faststream.kafka import KafkaBroker, KafkaMessage, Topic

from visionloop.contracts import (
    SYSTEM_PROJECT,
    DeadLetter,
    Envelope,
    Payload,
    PipelineStatus,
    StatusKind,
)
from visionloop.contracts.topics import TopicSpec, spec_for
from visionloop.libs import kafka
from visionloop.libs.bus.batch import _BATCH_POLL_MS, Batching, _linger
from visionloop.libs.bus.epoch import Epoch
from visionloop.libs.bus.outbox import LOG_EVERY_S, Outbox
from visionloop.libs.bus.unit import (
    BatchHandler,
    BatchPrepare,
    Handler,
    Outgoing,
    P,
    Subscription,
    Unit,
    outgoing_of,
)
from visionloop.libs.db import BUS_MIGRATIONS, Migration, discover, migrate
from visionloop.libs.settings import Settings

log = logging.getLogger("visionloop.libs.bus")

EPOCH_CHECK_TICKS = 30
"""The relay checks the broker's epoch at least every this many ticks, suspicion or not."""


class Runtime(Batching):
    """One service's connection to the loop: broker, database schema, handlers, outbox relay.

    Build it, register handlers with `consume` and emitted contracts with `produces`, then
    `start()`. The composition root owns it; services only receive it.
    """

    def __init__(
        self,
        service: str,
        settings: Settings,
        *,
        pool: asyncpg.Pool | None,
        migrations: Iterable[Migration] = (),
        description: str | None = None,
    ) -> None:
        self.service = service
        self.settings = settings
        self.pool = pool
        self.schema = settings.schema_for(service)
        self.producer = f"{service}/{settings.instance}"
        self.description = description
        self.http_url: str | None = None
        """Where the service's HTTP app is reachable, once the composition root serves it."""
        self.broker: KafkaBroker = kafka.make_broker(settings, service)
        self.counters: Counter[str] = Counter()
        self.outbox = Outbox(service, settings, self.schema, pool, self.counters)
        self.epoch = Epoch(self)
        self._migrations = discover("bus", BUS_MIGRATIONS) + list(migrations)
        self._subscriptions: list[Subscription] = []
        self._publishers: dict[type[Payload], Any] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._background: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        self._on_start: list[Callable[[], Any]] = []
        self._stop_listening: Callable[[], None] | None = None
        self.gauges: dict[str, float] = {}
        """Current values a service reports in every heartbeat (queue depth, calibration...)."""
        self._started_at = time.monotonic()
        self.produces(DeadLetter, PipelineStatus)

    # -- wiring -------------------------------------------------------------------------------
    def produces(self, *payloads: type[Payload]) -> None:
        """Declare contracts this service emits (they appear in the AsyncAPI document)."""
        for payload in payloads:
            if payload in self._publishers:
                continue
            spec = spec_for(payload)
            self.outbox.topics[self.settings.topic(spec.name)] = spec.partitions
            self._publishers[payload] = self.broker.publisher(
                self.settings.topic(spec.name),
                schema=Envelope[payload],  # type: ignore[valid-type]
                title=f"{self.service}: {spec.name}",
                description=f"{payload.__doc__ or ''} Key: {spec.key}.".strip(),
            )

    def consume(
        self,
        payload: type[P],
        handler: Handler[P],
        *,
        group: str | None = None,
        description: str | None = None,
    ) -> None:
        """Run `handler` for every `payload` event, under the consumer policy of this package."""
        spec = spec_for(payload)
        group = group or f"{self.settings.topic_prefix}{self.service}.{spec.payload.event_type}"
        model = Envelope[payload]  # type: ignore[valid-type]
        sub = Subscription(spec, handler, group, model)
        self._subscriptions.append(sub)

        async def on_message(message: Any) -> None:
            await self._on_message(sub, message)

        # The annotation is what FastStream documents in AsyncAPI; the body arrives raw
        # (the decoder hands over the framework message) and is validated in _on_message.
        on_message.__annotations__ = {"message": model, "return": None}
        on_message.__name__ = f"{self.service}_{spec.payload.event_type.replace('.', '_')}"
        sub.subscriber = self.broker.subscriber(
            self._topic(spec), group_id=group, **self._subscriber_policy(spec, description or handler.__doc__)
        )
        sub.subscriber(on_message)

    def _topic(self, spec: TopicSpec) -> Topic:
        """The topic for FastStream, which must not create it: `start` has (`kafka.ensure_topics`,
        with the registry's partitions; after a broker restart the epoch check does), and under
        Kafka ACLs no service may create topics (FastStream's attempt would only log a refusal)."""
        return Topic(self.settings.topic(spec.name), declare=False)

    def _subscriber_policy(self, spec: TopicSpec, description: str | None) -> dict[str, Any]:
        """Subscriber options every consumer shares, single or batch: the consumer policy's knobs."""
        return {
            "auto_offset_reset": "earliest",
            "ack_policy": AckPolicy.NACK_ON_ERROR,
            "session_timeout_ms": self.settings.session_timeout_ms,
            "heartbeat_interval_ms": self.settings.heartbeat_interval_ms,
            "fetch_max_wait_ms": self.settings.fetch_max_wait_ms,
            "decoder": _raw,
            "title": f"{self.service} consumes {spec.name}",
            "description": description,
        }

    def background(self, name: str, work: Callable[[], Awaitable[None]]) -> None:
        """Run `work()` as a task from `start()` until `stop()` (workers behind HTTP endpoints).

        `work` should loop; an exception ends it and is logged, and it is restarted after a pause.
        """
        self._background.append((name, work))

    def on_start(self, hook: Callable[[], Any]) -> None:
        """Call `hook()` once in `start()`, before consuming: work with effects (reading a key,
        creating a file) that wiring must not do, since wiring also runs to list what a service
        consumes (`visionloop status`, the AsyncAPI document)."""
        self._on_start.append(hook)

    def consume_batch(
        self,
        payload: type[P],
        handler: BatchHandler[P],
        *,
        prepare: BatchPrepare[P],
        max_records: int = 16,
        max_wait_ms: int = 0,
        group: str | None = None,
        description: str | None = None,
    ) -> None:
        """Handle `payload` events in batches: `prepare` once per batch, `handler` once per event.

        The consumer reads up to `max_records` messages; when fewer are waiting it lingers up to
        `max_wait_ms` for more (0: take what is there, so batches grow only under load). Then:

        1. Malformed messages are dead-lettered as in `consume`; events this consumer group
           handled before (inbox) are skipped.
        2. `prepare(events)` runs once, outside any transaction, and returns one result per
           event, in order; an element that is an exception is that event's failure. It must
           have no durable effects: it runs again for a retried or redelivered event.
        3. Every event's `handler(event, unit, result)`, inbox row and outbox rows commit in one
           transaction; the emitted events are published after the commit.
        4. An event whose preparation failed, or every event of a batch whose transaction failed,
           goes through the one-message path: its own transaction, retries with backoff (its
           `prepare` run again for that event alone), then a dead letter; `PermanentError`
           skips the retries. A database outage rewinds the whole batch, as in `consume`.
        5. Only then are the batch's offsets committed.

        Events of one batch that needed retries take effect after the batch's other events, so
        use this for events that do not depend on each other's order (images, not a ledger).
        """
        if max_records < 1:
            raise ValueError("max_records must be at least 1")
        spec = spec_for(payload)
        group = group or f"{self.settings.topic_prefix}{self.service}.{spec.payload.event_type}"
        model = Envelope[payload]  # type: ignore[valid-type]
        sub = Subscription(spec, handler, group, model, prepare=prepare)
        self._subscriptions.append(sub)

        async def on_batch(message: Any) -> None:
            await self._on_batch(sub, message)

        on_batch.__annotations__ = {"message": list[model], "return": None}  # type: ignore[valid-type]
        on_batch.__name__ = f"{self.service}_{spec.payload.event_type.replace('.', '_')}_batch"
        sub.subscriber = self.broker.subscriber(
            self._topic(spec),
            group_id=group,
            batch=True,
            max_records=max_records,
            batch_timeout_ms=_BATCH_POLL_MS,
            **self._subscriber_policy(spec, description or handler.__doc__),
        )
        sub.subscriber(on_batch)
        _linger(sub.subscriber, max_records, max_wait_ms)

    @property
    def subscriptions(self) -> list[tuple[str, str]]:
        """(topic, consumer group) of every handler."""
        return [(self.settings.topic(s.spec.name), s.group) for s in self._subscriptions]

    def subscriptions_running(self) -> list[Subscription]:
        """The subscriptions whose consumer is running."""
        return [s for s in self._subscriptions if s.consumer is not None]

    def specs(self) -> set[TopicSpec]:
        """Every registry topic this service consumes or produces."""
        return {s.spec for s in self._subscriptions} | {spec_for(p) for p in self._publishers}

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Migrate the schema, create topics, check the broker epoch, start consuming."""
        if self.pool is not None:
            await migrate(self.pool, self.schema, self._migrations)
        await kafka.ensure_topics(self.settings, self.specs())
        self._stop_listening = kafka.on_connection_lost(self.epoch.connection_lost)
        for hook in self._on_start:
            done = hook()
            if asyncio.iscoroutine(done):
                await done
        await self.outbox.start()
        if self.pool is not None:
            await self.epoch.check(clients_running=False)
        else:
            self.epoch.release()
        await self._start_subscribers()
        if self.pool is not None:
            self._tasks.append(asyncio.create_task(self._relay_loop(), name=f"{self.service}-relay"))
        self._tasks.append(asyncio.create_task(self._heartbeat_loop(), name=f"{self.service}-heartbeat"))
        for name, work in self._background:
            self._tasks.append(asyncio.create_task(self._keep_running(name, work), name=f"{self.service}-{name}"))
        await self.status(StatusKind.STARTED)
        log.info("%s started: %d handlers, schema %s", self.service, len(self._subscriptions), self.schema)

    async def _start_subscribers(self) -> None:
        """`KafkaBroker.start()`, with the subscribers started side by side: each consumer's start
        waits for its group's coordinator, about a second per group on the embedded broker, and a
        service with nine subscriptions took nine seconds to start one after the other."""
        await self.broker.connect()
        await asyncio.gather(*(subscriber.start() for subscriber in self.broker.subscribers))
        for publisher in self.broker.publishers:
            await publisher.start()
        self.broker.running = True

    async def stop(self) -> None:
        """Stop consuming, flush the outbox marks, close the broker connections."""
        if self._stop_listening is not None:
            self._stop_listening()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.status(StatusKind.STOPPED), timeout=5)
        self.epoch.stop()
        await self.broker.stop()
        await self.outbox.stop()

    # -- emitting outside a handler (HTTP endpoints, timers) ---------------------------------------
    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Unit[Any]]:
        """A unit of work not caused by an event; emitted events publish after it commits."""
        if self.pool is None:
            raise RuntimeError(f"{self.service} has no database")
        async with self.pool.acquire() as conn:
            unit: Unit[Any] = Unit(conn=conn, runtime=self)
            async with conn.transaction():
                yield unit
                await self.outbox.store(conn, unit.emitted)
        await self.outbox.publish_after_commit(unit.emitted)

    async def emit(self, payload: Payload, *, project: str, key: str | None = None, correlation_id: str | None = None) -> Envelope[Any]:
        """Emit one event in a transaction of its own (durable through the outbox)."""
        async with self.transaction() as unit:
            return unit.emit(payload, project=project, key=key, correlation_id=correlation_id)

    def outgoing(self, envelope: Envelope[Any], key: str | None) -> Outgoing:
        """The record of `envelope` on its registry topic (refused for an undeclared contract)."""
        return outgoing_of(self.service, self._publishers, envelope, key, self.settings.topic)

    async def publish_now(self, envelope: Envelope[Any], key: str | None = None) -> bool:
        """Publish without the outbox: only for ephemeral facts (heartbeats, progress). False when
        the bus is held (the fact is dropped)."""
        return await self.outbox.send_now(self.outgoing(envelope, key))

    async def status(self, kind: StatusKind, **fields: Any) -> None:
        """Publish a pipeline status event for this instance (best effort)."""
        fields.setdefault("gauges", dict(self.gauges))
        payload = PipelineStatus(
            service=self.service,
            instance=self.settings.instance,
            kind=kind,
            uptime_s=time.monotonic() - self._started_at,
            counters=dict(self.counters),
            **fields,
        )
        envelope = Envelope.of(payload, producer=self.producer, project=SYSTEM_PROJECT)
        try:
            await self.publish_now(envelope)
        except Exception as exc:  # status is advisory; never fail the service for it
            self.outbox.distrust(f"a status was not published ({type(exc).__name__}: {exc})")

    # -- the relay loop -------------------------------------------------------------------------
    async def relay_once(self, *, min_age_s: float = 2.0, limit: int = 500) -> int:
        """Publish unpublished outbox rows older than `min_age_s`; return how many went out."""
        return await self.outbox.relay_once(min_age_s=min_age_s, limit=limit)

    async def prune_inbox(self) -> int:
        """Delete inbox rows older than `inbox_retention_s`; how many went."""
        return await self.outbox.prune_inbox()

    async def _relay_loop(self) -> None:
        ticks = 0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.epoch.wake.wait(), timeout=self.settings.outbox_relay_interval_s)
            self.epoch.wake.clear()
            ticks += 1
            try:
                why = self.outbox.suspect or (None if self.epoch.ok else "held") or await self.epoch.inspect()
                if why is not None or ticks % EPOCH_CHECK_TICKS == 0:
                    await self.epoch.check()
                while await self.outbox.relay_once() > 0:
                    pass
                await self.outbox.prune_inbox()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.outbox.say("relay", "%s: outbox relay: %s", f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(min(LOG_EVERY_S / 10, self.settings.outbox_relay_interval_s))

    async def _keep_running(self, name: str, work: Callable[[], Awaitable[None]]) -> None:
        while True:
            try:
                await work()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s: background task %s failed; restarting it in 1 s", self.service, name)
                self.counters[f"background_failures.{name}"] += 1
            await asyncio.sleep(1.0)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            await self.status(StatusKind.HEARTBEAT)


async def _raw(message: KafkaMessage) -> KafkaMessage:
    """FastStream decoder that hands the framework message itself to the bus."""
    return message
