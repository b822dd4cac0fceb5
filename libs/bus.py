"""The bus: how a service consumes and emits contract events with at-least-once delivery and
exactly-once effects.

Consumer policy, for every subscribed contract:

1. The message is parsed and validated here (not in the framework): not JSON, not an envelope,
   an unknown major version, the wrong event type or a schema violation each go straight to the
   dead-letter topic with a reason code.
2. The handler runs inside one PostgreSQL transaction together with the inbox row (the event id
   for this consumer group) and the outbox rows of every event it emits. A redelivered event
   finds its inbox row and is skipped: the effect happens once.
3. A handler that raises is retried with exponential backoff, each attempt in a fresh
   transaction; after the last attempt the message is dead-lettered (through the outbox, in the
   same transaction as its inbox row) and the consumer goes on.
4. Only then is the offset committed. A database outage is not the message's fault: the
   message is not dead-lettered but rewound and retried.

Emitted events are handed to the broker client right after the transaction commits, in order;
the offset commit does not wait for the broker's acknowledgements (the committed outbox row is
the durable record; each acknowledgement marks its row published). A relay publishes whatever
that missed (a crash, a broker outage) and, when the broker has lost its topics (a restarted
embedded broker), re-publishes the retained outbox so downstream work is re-derived, once the
process's clients know the fresh broker's partitions and its consumers are rewound to the start of
the fresh logs (`Runtime._check_epoch`).

`consume_batch` keeps this policy per message for handlers that are cheaper per batch than per
message (model inference): up to N messages (or what arrives within T ms) are read at once, a
`prepare` step runs once for all of them outside any transaction, then every message's effect,
inbox row and outbox rows commit in one transaction, and only then are the offsets committed.
A message whose preparation or effect fails falls back to the one-message path (its own
transaction, retries, dead letter) without holding back the others.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Generic, TypeVar

import asyncpg
from faststream import AckPolicy
from faststream.kafka import KafkaBroker, KafkaMessage
from faststream.kafka.publisher.usecase import DefaultPublisher
from pydantic import ValidationError

from visionloop.contracts import (
    SUPPORTED_MAJOR,
    SYSTEM_PROJECT,
    DeadLetter,
    DeadLetterReason,
    Envelope,
    EnvelopeHeader,
    OriginalMessage,
    Payload,
    PipelineStatus,
    StatusKind,
)
from visionloop.contracts.topics import TOPICS, TopicSpec, spec_for
from visionloop.libs import kafka
from visionloop.libs.db import BUS_MIGRATIONS, Migration, discover, migrate, quote_ident
from visionloop.libs.settings import Settings

log = logging.getLogger(__name__)

P = TypeVar("P", bound=Payload)

INFRASTRUCTURE_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    ConnectionError,
)
"""Failures of the platform, not of the message: rewind and retry, never dead-letter."""


class PermanentError(Exception):
    """Raised by a handler for a message that can never succeed: dead-lettered without retries."""


@dataclass
class _Outgoing:
    envelope: Envelope[Any]
    topic: str
    key: bytes | None
    value: bytes
    headers: dict[str, str]
    outbox_id: int | None = None


@dataclass
class Unit(Generic[P]):
    """What a handler gets besides its event: the open transaction and a way to emit events.

    Everything done through `conn` and every `emit` commit together, or not at all.
    """

    conn: asyncpg.Connection
    runtime: "Runtime"
    event: Envelope[P] | None = None
    emitted: list[_Outgoing] = field(default_factory=list)

    @property
    def schema(self) -> str:
        """The service's own schema, quoted, for use in SQL text."""
        return quote_ident(self.runtime.schema)

    def emit(
        self,
        payload: Payload,
        *,
        project: str | None = None,
        key: str | None = None,
        correlation_id: str | None = None,
    ) -> Envelope[Any]:
        """Queue `payload` for publishing when the transaction commits.

        The envelope is filled in: a new event id, this service as producer, and project,
        correlation and causation taken from the incoming event unless given.
        """
        if project is None:
            if self.event is None:
                raise ValueError("emit outside a handler needs project=")
            project = self.event.project
        envelope = Envelope.of(
            payload,
            producer=self.runtime.producer,
            project=project,
            correlation_id=correlation_id,
            causation=self.event,
        )
        self.emitted.append(self.runtime._outgoing(envelope, key))
        return envelope


Handler = Callable[[Envelope[P], Unit[P]], Awaitable[None]]

BatchPrepare = Callable[[list[Envelope[P]]], Awaitable[Sequence[Any]]]
"""Work for a whole batch, outside any transaction: one result (or exception) per event, in order."""
BatchHandler = Callable[[Envelope[P], Unit[P], Any], Awaitable[None]]
"""One event's effect inside the transaction, given its prepared result."""


@dataclass
class _Subscription:
    spec: TopicSpec
    handler: Any
    group: str
    model: type[Envelope[Any]]
    prepare: Any = None
    """Set for batch subscriptions (`consume_batch`)."""


class Runtime:
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
        self._migrations = discover("bus", BUS_MIGRATIONS) + list(migrations)
        self._subscriptions: list[_Subscription] = []
        self._publishers: dict[type[Payload], DefaultPublisher] = {}
        self._published_ids: list[int] = []
        self._unacked: set[asyncio.Future[Any]] = set()
        """Publishes handed to the client whose broker acknowledgement has not come yet."""
        self._releasing: set[asyncio.Future[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._background: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        self.gauges: dict[str, float] = {}
        """Current values a service reports in every heartbeat (queue depth, calibration...)."""
        self._started_at = time.monotonic()
        self._epoch: str | None = None
        self._broker_suspect = False
        """A publish failed: the relay checks the broker epoch on its next tick, not in 30."""
        self.produces(DeadLetter, PipelineStatus)

    # -- wiring -------------------------------------------------------------------------------
    def produces(self, *payloads: type[Payload]) -> None:
        """Declare contracts this service emits (they appear in the AsyncAPI document)."""
        for payload in payloads:
            if payload in self._publishers:
                continue
            spec = spec_for(payload)
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
        """Run `handler` for every `payload` event, under the consumer policy of this module."""
        spec = spec_for(payload)
        group = group or f"{self.settings.topic_prefix}{self.service}.{spec.payload.event_type}"
        model = Envelope[payload]  # type: ignore[valid-type]
        sub = _Subscription(spec, handler, group, model)
        self._subscriptions.append(sub)

        async def on_message(message: Any) -> None:
            await self._on_message(sub, message)

        # The annotation is what FastStream documents in AsyncAPI; the body arrives raw
        # (the decoder hands over the framework message) and is validated in _on_message.
        on_message.__annotations__ = {"message": model, "return": None}
        on_message.__name__ = f"{self.service}_{spec.payload.event_type.replace('.', '_')}"
        self.broker.subscriber(
            self.settings.topic(spec.name),
            group_id=group,
            **self._subscriber_policy(spec, description or handler.__doc__),
        )(on_message)

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
        sub = _Subscription(spec, handler, group, model, prepare=prepare)
        self._subscriptions.append(sub)

        async def on_batch(message: Any) -> None:
            await self._on_batch(sub, message)

        on_batch.__annotations__ = {"message": list[model], "return": None}  # type: ignore[valid-type]
        on_batch.__name__ = f"{self.service}_{spec.payload.event_type.replace('.', '_')}_batch"
        subscriber = self.broker.subscriber(
            self.settings.topic(spec.name),
            group_id=group,
            batch=True,
            max_records=max_records,
            batch_timeout_ms=_BATCH_POLL_MS,
            **self._subscriber_policy(spec, description or handler.__doc__),
        )
        subscriber(on_batch)
        _linger(subscriber, max_records, max_wait_ms)

    @property
    def subscriptions(self) -> list[tuple[str, str]]:
        """(topic, consumer group) of every handler."""
        return [(self.settings.topic(s.spec.name), s.group) for s in self._subscriptions]

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Migrate the schema, create topics, check the broker epoch, start consuming."""
        if self.pool is not None:
            await migrate(self.pool, self.schema, self._migrations)
        specs = {s.spec for s in self._subscriptions} | {spec_for(p) for p in self._publishers}
        await kafka.ensure_topics(self.settings, specs)
        if self.pool is not None:
            await self._check_epoch(clients_running=False)
        await self.broker.start()
        if self.pool is not None:
            self._tasks.append(asyncio.create_task(self._relay_loop(), name=f"{self.service}-relay"))
        self._tasks.append(asyncio.create_task(self._heartbeat_loop(), name=f"{self.service}-heartbeat"))
        for name, work in self._background:
            self._tasks.append(asyncio.create_task(self._keep_running(name, work), name=f"{self.service}-{name}"))
        await self.status(StatusKind.STARTED)
        log.info("%s started: %d handlers, schema %s", self.service, len(self._subscriptions), self.schema)

    async def stop(self) -> None:
        """Stop consuming, flush the outbox marks, close the broker connection."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        with contextlib.suppress(Exception):
            await self.status(StatusKind.STOPPED)
        await self.broker.stop()  # the client sends what it holds before it closes
        if self._unacked or self._releasing:
            await asyncio.wait({*self._unacked, *self._releasing}, timeout=10)
        if self.pool is not None:
            with contextlib.suppress(Exception):
                await self._flush_published_marks()

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
                await self._store_outbox(conn, unit.emitted)
        await self._publish_after_commit(unit.emitted)

    async def emit(self, payload: Payload, *, project: str, key: str | None = None, correlation_id: str | None = None) -> Envelope[Any]:
        """Emit one event in a transaction of its own (durable through the outbox)."""
        async with self.transaction() as unit:
            return unit.emit(payload, project=project, key=key, correlation_id=correlation_id)

    async def publish_now(self, envelope: Envelope[Any], key: str | None = None) -> None:
        """Publish without the outbox: only for ephemeral facts (heartbeats, progress)."""
        out = self._outgoing(envelope, key)
        await self._send(out)

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
            log.warning("%s: status not published: %s", self.service, exc)
            self._broker_suspect = True

    # -- consuming --------------------------------------------------------------------------------
    async def _on_message(self, sub: _Subscription, message: KafkaMessage) -> None:
        record = message.raw_message
        self.counters["received"] += 1
        event, reason, problem = self._parse(sub, record.value)
        if event is None:
            assert reason is not None
            await self._dead_letter(sub, record, reason, problem, attempts=1, event_id=None, error_type=None)
            return
        await self._with_retries(sub, record, event, lambda attempt: self._handle_once(sub, event))

    async def _with_retries(
        self,
        sub: _Subscription,
        record: Any,
        event: Envelope[Any],
        attempt: Callable[[int], Awaitable[bool]],
        *,
        attempts: int = 0,
        failure: BaseException | None = None,
    ) -> None:
        """Run `attempt(n)` until it succeeds, retrying with backoff, then dead-letter.

        `attempts` and `failure` carry an attempt that already failed elsewhere (a batch).
        """
        backoff = self.settings.retry_backoff_ms / 1000
        while True:
            try:
                if failure is not None:
                    exc, failure = failure, None
                    raise exc
                attempts += 1
                handled = await attempt(attempts)
                self.counters["handled" if handled else "duplicates_skipped"] += 1
                return
            except INFRASTRUCTURE_ERRORS as exc:
                # Not the message's fault: back off, then rewind (FastStream nacks on raise).
                log.warning("%s: infrastructure error on %s, will redeliver: %s", self.service, sub.spec.name, exc)
                self.counters["infrastructure_errors"] += 1
                await asyncio.sleep(min(backoff * 4, self.settings.retry_backoff_max_ms / 1000))
                raise
            except Exception as exc:
                permanent = isinstance(exc, PermanentError)
                if permanent or attempts >= self.settings.handler_max_attempts:
                    log.error(
                        "%s: %s %s failed %d time(s), dead-lettering: %r",
                        self.service, sub.spec.payload.event_type, event.event_id, attempts, exc,
                    )
                    await self._dead_letter(
                        sub, record, DeadLetterReason.HANDLER_FAILED, f"{type(exc).__name__}: {exc}",
                        attempts=attempts, event_id=event.event_id, error_type=type(exc).__name__,
                        envelope=event,
                    )
                    return
                self.counters["retries"] += 1
                delay = min(backoff * 2 ** (attempts - 1), self.settings.retry_backoff_max_ms / 1000)
                await asyncio.sleep(delay * (0.5 + random.random() / 2))

    async def _on_batch(self, sub: _Subscription, message: KafkaMessage) -> None:
        """The batch policy of `consume_batch`; FastStream commits the offsets when this returns."""
        records = message.raw_message
        if not isinstance(records, tuple):
            records = (records,)
        self.counters["received"] += len(records)
        self.counters["batches"] += 1
        malformed: list[tuple[Any, DeadLetterReason, str]] = []
        parsed: dict[Any, tuple[Any, Envelope[Any]]] = {}
        for record in records:
            event, reason, problem = self._parse(sub, record.value)
            if event is None:
                assert reason is not None
                malformed.append((record, reason, problem))
            elif event.event_id in parsed:  # the same event twice in one batch (a relayed copy)
                self.counters["duplicates_skipped"] += 1
            else:
                parsed[event.event_id] = (record, event)
        assert self.pool is not None, "consumers need a database (inbox)"
        done = {
            row["event_id"]
            for row in await self.pool.fetch(
                f"SELECT event_id FROM {quote_ident(self.schema)}.inbox "
                "WHERE consumer_group = $1 AND event_id = ANY($2::uuid[])",
                sub.group,
                list(parsed),
            )
        } if parsed else set()
        self.counters["duplicates_skipped"] += len(done)
        fresh = [item for key, item in parsed.items() if key not in done]
        if fresh:
            try:
                await self._handle_batch(sub, fresh)
            except INFRASTRUCTURE_ERRORS as exc:
                # Not the messages' fault: back off, then rewind the whole batch (nack).
                log.warning("%s: infrastructure error on %s, will redeliver: %s", self.service, sub.spec.name, exc)
                self.counters["infrastructure_errors"] += 1
                await asyncio.sleep(min(self.settings.retry_backoff_ms * 4, self.settings.retry_backoff_max_ms) / 1000)
                raise
        for record, reason, problem in malformed:
            await self._dead_letter(sub, record, reason, problem, attempts=1, event_id=None, error_type=None)

    async def _handle_batch(self, sub: _Subscription, fresh: list[tuple[Any, Envelope[Any]]]) -> None:
        """Prepare once, commit what prepared in one transaction, settle the rest one by one."""
        results = await self._prepare(sub, [event for _, event in fresh])
        pairs = list(zip(fresh, results, strict=True))
        ready = [(r, e, res) for (r, e), res in pairs if not isinstance(res, BaseException)]
        failed: list[tuple[Any, Envelope[Any], Any]] = [(r, e, res) for (r, e), res in pairs if isinstance(res, BaseException)]
        if ready:
            try:
                await self._handle_together(sub, ready)
            except INFRASTRUCTURE_ERRORS:
                raise
            except Exception as exc:
                # One event's effect failed and rolled the transaction back: settle each alone.
                log.warning(
                    "%s: batch of %d on %s failed (%r); handling its events one by one",
                    self.service, len(ready), sub.spec.name, exc,
                )
                self.counters["batch_fallbacks"] += 1
                failed = [(r, e, _Prepared(res)) for r, e, res in ready] + failed
        for record, event, outcome in failed:
            await self._settle_alone(sub, record, event, outcome)

    async def _prepare(self, sub: _Subscription, events: list[Envelope[Any]]) -> list[Any]:
        """`prepare` for a batch; a failure of the whole call becomes every event's failure."""
        try:
            results = list(await sub.prepare(events))
        except INFRASTRUCTURE_ERRORS:
            raise
        except Exception as exc:
            log.warning("%s: preparing a batch of %d failed: %r", self.service, len(events), exc)
            return [exc] * len(events)
        if len(results) != len(events):
            problem = RuntimeError(f"prepare returned {len(results)} results for {len(events)} events")
            return [problem] * len(events)
        return results

    async def _settle_alone(self, sub: _Subscription, record: Any, event: Envelope[Any], outcome: Any) -> None:
        """The one-message path for an event of a batch: its first result, then fresh attempts."""

        async def attempt(n: int) -> bool:
            if n == 1 and isinstance(outcome, _Prepared):
                result = outcome.value
            else:
                (result,) = await self._prepare(sub, [event])
                if isinstance(result, BaseException):
                    raise result

            async def handler(ev: Envelope[Any], unit: Unit[Any]) -> None:
                await sub.handler(ev, unit, result)

            return await self._handle_once(sub, event, handler)

        if isinstance(outcome, BaseException):
            await self._with_retries(sub, record, event, attempt, attempts=1, failure=outcome)
        else:
            await self._with_retries(sub, record, event, attempt)

    async def _handle_together(self, sub: _Subscription, ready: list[tuple[Any, Envelope[Any], Any]]) -> None:
        """Every prepared event's effect, inbox row and outbox rows in one transaction."""
        assert self.pool is not None
        schema = quote_ident(self.schema)
        units: list[Unit[Any]] = []
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                fresh = {
                    row["event_id"]
                    for row in await conn.fetch(
                        f"INSERT INTO {schema}.inbox (consumer_group, event_id) "
                        "SELECT $1, unnest($2::uuid[]) ON CONFLICT DO NOTHING RETURNING event_id",
                        sub.group,
                        [event.event_id for _, event, _ in ready],
                    )
                }
                for _, event, result in ready:
                    if event.event_id not in fresh:
                        continue
                    unit: Unit[Any] = Unit(conn=conn, runtime=self, event=event)
                    await sub.handler(event, unit, result)
                    units.append(unit)
                emitted = [out for unit in units for out in unit.emitted]
                await self._store_outbox(conn, emitted)
        self.counters["handled"] += len(units)
        self.counters["duplicates_skipped"] += len(ready) - len(units)
        await self._publish_after_commit(emitted, concurrently=True)

    def _parse(
        self, sub: _Subscription, value: bytes | None
    ) -> tuple[Envelope[Any] | None, DeadLetterReason | None, str]:
        return parse_event(sub.spec, sub.model, value)

    async def _handle_once(self, sub: _Subscription, event: Envelope[Any], handler: Handler[Any] | None = None) -> bool:
        """One attempt in one transaction; False when the inbox says it was handled already."""
        assert self.pool is not None, "consumers need a database (inbox)"
        handler = handler or sub.handler
        conn = await self.pool.acquire()
        committed = False
        try:
            unit: Unit[Any] = Unit(conn=conn, runtime=self, event=event)
            async with conn.transaction():
                fresh = await conn.fetchval(
                    f"INSERT INTO {quote_ident(self.schema)}.inbox (consumer_group, event_id) "
                    "VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING true",
                    sub.group,
                    event.event_id,
                )
                if not fresh:
                    return False
                await handler(event, unit)
                await self._store_outbox(conn, unit.emitted)
            committed = True
        finally:
            if committed:
                # The connection's reset for the pool (a round trip) overlaps the publish and
                # the offset commit instead of preceding them.
                self._release_later(conn)
            else:
                await self.pool.release(conn)
        await self._publish_after_commit(unit.emitted)
        return True

    def _release_later(self, conn: asyncpg.Connection) -> None:
        assert self.pool is not None
        pool = self.pool

        async def release() -> None:
            try:
                await pool.release(conn)
            except Exception as exc:  # asyncpg has closed it; the pool opens a fresh one
                log.warning("%s: resetting a database connection failed: %s", self.service, exc)

        task = asyncio.ensure_future(release())
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _dead_letter(
        self,
        sub: _Subscription,
        record: Any,
        reason: DeadLetterReason,
        problem: str,
        *,
        attempts: int,
        event_id: Any,
        error_type: str | None,
        envelope: Envelope[Any] | None = None,
    ) -> None:
        """Send a message to the dead-letter topic, durably, and record it in the inbox."""
        letter = dead_letter(
            record, reason, problem, consumer_group=sub.group, service=self.service, attempts=attempts,
            event_id=event_id, error_type=error_type,
        )
        self.counters[f"dead_lettered.{reason.value}"] += 1
        assert self.pool is not None
        async with self.pool.acquire() as conn:
            unit: Unit[Any] = Unit(conn=conn, runtime=self, event=envelope)
            async with conn.transaction():
                if event_id is not None:
                    await conn.execute(
                        f"INSERT INTO {quote_ident(self.schema)}.inbox (consumer_group, event_id, outcome) "
                        "VALUES ($1, $2, 'dead_lettered') ON CONFLICT DO NOTHING",
                        sub.group,
                        event_id,
                    )
                unit.emit(letter, project=envelope.project if envelope else SYSTEM_PROJECT)
                await self._store_outbox(conn, unit.emitted)
        await self._publish_after_commit(unit.emitted)

    # -- outbox -----------------------------------------------------------------------------------
    def _outgoing(self, envelope: Envelope[Any], key: str | None) -> _Outgoing:
        payload_type = type(envelope.payload)
        if payload_type not in self._publishers:
            raise ValueError(
                f"{self.service} emits {payload_type.__name__} without declaring it: call "
                f"runtime.produces({payload_type.__name__})"
            )
        spec = TOPICS[payload_type]
        key = key if key is not None else spec.key_of(envelope)
        return _Outgoing(
            envelope=envelope,
            topic=self.settings.topic(spec.name),
            key=key.encode() if key is not None else None,
            value=envelope.model_dump_json().encode(),
            headers={
                "event_type": envelope.event_type,
                "schema_version": envelope.schema_version,
                "event_id": str(envelope.event_id),
            },
        )

    async def _store_outbox(self, conn: asyncpg.Connection, outgoing: list[_Outgoing]) -> None:
        if not outgoing:
            return
        if len(outgoing) == 1:  # the common case: plain parameters encode cheaper than arrays
            (out,) = outgoing
            out.outbox_id = await conn.fetchval(
                f"""INSERT INTO {quote_ident(self.schema)}.outbox (event_id, topic, key, value, headers)
                    VALUES ($1, $2, $3, $4, $5::jsonb) RETURNING id""",
                out.envelope.event_id,
                out.topic,
                out.key,
                out.value,
                json.dumps(out.headers),
            )
            return
        rows = await conn.fetch(
            f"""INSERT INTO {quote_ident(self.schema)}.outbox (event_id, topic, key, value, headers)
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

    async def _send(self, out: _Outgoing) -> None:
        publisher = self._publishers[type(out.envelope.payload)]
        await publisher.publish(
            out.value,
            topic=out.topic,
            key=out.key,
            headers=out.headers,
            correlation_id=out.envelope.correlation_id,
        )
        self.counters["published"] += 1

    async def _publish_after_commit(self, outgoing: list[_Outgoing], *, concurrently: bool = False) -> None:
        """Fast path: publish what was just committed; the relay covers any failure here.

        `concurrently` sends every event at once (the client batches them into few requests);
        their order on the wire is then not guaranteed, so only batches of independent events
        use it.
        """
        if concurrently and len(outgoing) > 1:
            sent = await asyncio.gather(*(self._send(out) for out in outgoing), return_exceptions=True)
            for out, outcome in zip(outgoing, sent, strict=True):
                if isinstance(outcome, BaseException):
                    log.warning("%s: publish to %s deferred to the relay: %s", self.service, out.topic, outcome)
                    self.counters["publish_deferred"] += 1
                elif out.outbox_id is not None:
                    self._published_ids.append(out.outbox_id)
            return
        # Handed to the client in order (so in order on the wire, per partition) without waiting
        # for the broker's acknowledgements: the outbox row is already the durable record, so
        # the offset commit need not wait for them. Each acknowledgement marks its row.
        for out in outgoing:
            try:
                publisher = self._publishers[type(out.envelope.payload)]
                acked = await publisher.publish(
                    out.value,
                    topic=out.topic,
                    key=out.key,
                    headers=out.headers,
                    correlation_id=out.envelope.correlation_id,
                    no_confirm=True,
                )
            except Exception as exc:
                log.warning("%s: publish to %s deferred to the relay: %s", self.service, out.topic, exc)
                self.counters["publish_deferred"] += 1
                self._broker_suspect = True
                return
            self._unacked.add(acked)
            acked.add_done_callback(functools.partial(self._on_ack, out))

    def _on_ack(self, out: _Outgoing, acked: asyncio.Future[Any]) -> None:
        self._unacked.discard(acked)
        problem = acked.exception() if not acked.cancelled() else asyncio.CancelledError()
        if problem is not None:
            log.warning("%s: publish to %s deferred to the relay: %s", self.service, out.topic, problem)
            self.counters["publish_deferred"] += 1
            self._broker_suspect = True
            return
        self.counters["published"] += 1
        if out.outbox_id is not None:
            self._published_ids.append(out.outbox_id)

    async def _flush_published_marks(self) -> None:
        if not self._published_ids or self.pool is None:
            return
        ids, self._published_ids = self._published_ids, []
        await self.pool.execute(
            f"UPDATE {quote_ident(self.schema)}.outbox SET published_at = now() "
            "WHERE id = ANY($1::bigint[]) AND published_at IS NULL",
            ids,
        )

    async def relay_once(self, *, min_age_s: float = 2.0, limit: int = 500) -> int:
        """Publish unpublished outbox rows older than `min_age_s`; return how many went out."""
        assert self.pool is not None
        await self._flush_published_marks()
        schema = quote_ident(self.schema)
        sent = 0
        async with self.pool.acquire() as conn, conn.transaction():
            # SKIP LOCKED lets several replicas of one service relay without sending a row twice.
            rows = await conn.fetch(
                f"""SELECT id, topic, key, value, headers FROM {schema}.outbox
                    WHERE published_at IS NULL AND created_at < now() - make_interval(secs => $1)
                    ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED""",
                min_age_s,
                limit,
            )
            done = []
            for row in rows:
                headers = json.loads(row["headers"])
                try:
                    await self.broker.publish(
                        bytes(row["value"]),
                        topic=row["topic"],
                        key=bytes(row["key"]) if row["key"] is not None else None,
                        headers=headers,
                    )
                except Exception as exc:
                    log.warning("%s: relay could not publish to %s: %s", self.service, row["topic"], exc)
                    break
                done.append(row["id"])
            if done:
                await conn.execute(
                    f"UPDATE {schema}.outbox SET published_at = now() WHERE id = ANY($1::bigint[])", done
                )
                sent = len(done)
                self.counters["relayed"] += sent
            await conn.execute(
                f"DELETE FROM {schema}.outbox WHERE published_at < now() - make_interval(secs => $1)",
                self.settings.outbox_retention_s,
            )
        return sent

    async def prune_inbox(self) -> int:
        """Delete inbox rows older than `inbox_retention_s` (no redelivery can reach back that far); how many went."""
        assert self.pool is not None
        status = await self.pool.execute(
            f"DELETE FROM {quote_ident(self.schema)}.inbox WHERE handled_at < now() - make_interval(secs => $1)",
            self.settings.inbox_retention_s,
        )
        pruned = int(status.split()[-1])
        self.counters["inbox_pruned"] += pruned
        return pruned

    async def _check_epoch(self, *, clients_running: bool = True) -> None:
        """Replay the retained outbox when the broker is not the one this schema last saw.

        Before the replay the registry's topics are created where still missing and, when this
        process's Kafka clients are running, their metadata is given time to refresh (a client that
        still holds the lost broker's partitions sends to partitions the fresh broker may not have,
        libs/kafka.py, and the replayed records would be lost again) and every consumer is rewound
        to the start of the fresh logs (`_rewind_consumers`).
        """
        assert self.pool is not None
        epoch = await kafka.broker_epoch(self.settings)
        self._epoch = epoch
        self._broker_suspect = False
        schema = quote_ident(self.schema)
        last = await self.pool.fetchval(f"SELECT value FROM {schema}.bus_state WHERE name = 'broker_epoch'")
        if last == epoch:
            return
        if last is not None:
            specs = {s.spec for s in self._subscriptions} | {spec_for(p) for p in self._publishers}
            await kafka.ensure_topics(self.settings, specs)
            if clients_running:
                await asyncio.sleep(kafka.metadata_refresh_s(self.settings) * 1.5)
                await self._rewind_consumers()
        async with self.pool.acquire() as conn, conn.transaction():
            last = await conn.fetchval(
                f"SELECT value FROM {schema}.bus_state WHERE name = 'broker_epoch' FOR UPDATE"
            )
            if last == epoch:
                return
            if last is not None:
                replayed = await conn.execute(
                    f"UPDATE {schema}.outbox SET published_at = NULL WHERE published_at IS NOT NULL"
                )
                log.warning(
                    "%s: the broker lost its topics (new epoch); re-publishing retained events (%s)",
                    self.service, replayed,
                )
                self.counters["epoch_replays"] += 1
            await conn.execute(
                f"""INSERT INTO {schema}.bus_state (name, value) VALUES ('broker_epoch', $1)
                    ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value""",
                epoch,
            )

    async def _rewind_consumers(self) -> None:
        """Every running consumer back to offset 0 of its partitions, and that offset committed.

        A consumer that lived through a broker restart still fetches from the lost broker's positions
        (and commits them to the fresh broker with its next acknowledgement, so a rejoin keeps them):
        it skips the first records of every fresh log, what was published since the restart. From
        the start, the inbox skips what was handled already.
        """
        for subscriber in self.broker.subscribers:
            consumer = getattr(subscriber, "consumer", None)
            partitions = consumer.assignment() if consumer is not None else set()
            if not partitions:
                continue
            for partition in partitions:
                consumer.seek(partition, 0)
            try:
                await consumer.commit({partition: 0 for partition in partitions})
            except Exception as exc:  # a rebalance under way: its new assignment starts from no committed offset
                log.warning("%s: rewound consumer could not commit offset 0: %s", self.service, exc)
            self.counters["consumers_rewound"] += 1

    async def _relay_loop(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(self.settings.outbox_relay_interval_s)
            ticks += 1
            try:
                if ticks % 30 == 0 or self._broker_suspect:
                    await self._check_epoch()
                while await self.relay_once() > 0:
                    pass
                await self.prune_inbox()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("%s: outbox relay: %s", self.service, exc)

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


@dataclass(frozen=True)
class _Prepared:
    """A prepared result carried to the one-message path (it may itself be any value)."""

    value: Any


_BATCH_POLL_MS = 200
"""How long a batch consumer's fetch waits when nothing is buffered (it wakes when data comes)."""


def _linger(subscriber: Any, max_records: int, max_wait_ms: int) -> None:
    """Make a FastStream batch subscriber wait up to `max_wait_ms` to fill its batch.

    FastStream's batch subscriber takes whatever one `getmany` returns; this replaces its
    `get_msg` (FastStream's hook for reading one batch) with one that, having found fewer than
    `max_records` messages, polls again until the batch is full or the time is up. Records of
    one partition stay in order.
    """

    async def get_msg(consumer: Any) -> tuple[Any, ...]:
        got = await consumer.getmany(timeout_ms=_BATCH_POLL_MS, max_records=max_records)
        records = list(chain.from_iterable(got.values()))
        if records and max_wait_ms > 0 and len(records) < max_records:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + max_wait_ms / 1000
            while len(records) < max_records and (left := deadline - loop.time()) > 0:
                more = await consumer.getmany(timeout_ms=max(1, int(left * 1000)), max_records=max_records - len(records))
                records.extend(chain.from_iterable(more.values()))
        return tuple(records)

    subscriber.get_msg = get_msg


async def _raw(message: KafkaMessage) -> KafkaMessage:
    """FastStream decoder that hands the framework message itself to the bus."""
    return message


def parse_event(
    spec: TopicSpec, model: type[Envelope[Any]], value: bytes | None
) -> tuple[Envelope[Any] | None, DeadLetterReason | None, str]:
    """Validate a raw message of `spec`'s topic as `model`; on failure say why, as a dead-letter
    reason and a sentence (the first step of the consumer policy, for any consumer)."""
    try:
        data = json.loads(value or b"")
    except (ValueError, UnicodeDecodeError) as exc:
        return None, DeadLetterReason.NOT_JSON, f"the message is not JSON: {exc}"
    try:
        header = EnvelopeHeader.model_validate(data)
    except ValidationError as exc:
        return None, DeadLetterReason.NOT_AN_ENVELOPE, f"the message is not a visionloop envelope: {_brief(exc)}"
    major = int(header.schema_version.split(".", 1)[0])
    if major != SUPPORTED_MAJOR:
        return None, DeadLetterReason.UNSUPPORTED_VERSION, (
            f"schema_version {header.schema_version} has major {major}; this consumer reads "
            f"major {SUPPORTED_MAJOR} (a new major travels on a new topic)"
        )
    if header.event_type != spec.payload.event_type:
        return None, DeadLetterReason.UNEXPECTED_EVENT_TYPE, (
            f"event_type {header.event_type!r} on topic {spec.name}, which carries "
            f"{spec.payload.event_type!r}"
        )
    try:
        return model.model_validate(data), None, ""
    except ValidationError as exc:
        return None, DeadLetterReason.SCHEMA_VIOLATION, f"the payload breaks the {spec.name} schema: {_brief(exc)}"


def dead_letter(
    record: Any,
    reason: DeadLetterReason,
    problem: str,
    *,
    consumer_group: str,
    service: str,
    attempts: int = 1,
    event_id: Any = None,
    error_type: str | None = None,
) -> DeadLetter:
    """The dead letter of a consumed Kafka record: why, and the original bytes to replay it."""
    value: bytes = record.value or b""
    try:
        text, b64 = value.decode("utf-8"), None
    except UnicodeDecodeError:
        text, b64 = None, base64.b64encode(value).decode("ascii")
    original = OriginalMessage(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=record.key.decode("utf-8", "replace") if record.key else None,
        headers={k: v.decode("utf-8", "replace") for k, v in (record.headers or ())},
        value_text=text,
        value_base64=b64,
        timestamp_ms=record.timestamp,
    )
    return DeadLetter(
        reason=reason,
        message=problem[:4096],
        error_type=error_type,
        consumer_group=consumer_group,
        service=service,
        attempts=attempts,
        original_event_id=str(event_id) if event_id else None,
        original=original,
    )


def _brief(exc: ValidationError) -> str:
    """A validation error in one line: the first few problems with their locations."""
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{loc}: {err['msg']}")
    more = f" (+{exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
    return "; ".join(parts) + more
