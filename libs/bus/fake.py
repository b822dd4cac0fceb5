"""An in-memory stand-in for `Runtime` and the broker, for handler tests (no Kafka).

A service's own `wire()` registers its handlers on a `FakeRuntime` exactly as on the real one;
`FakeBus` then carries events between fake runtimes in memory:

    bus = FakeBus()
    verifier = bus.runtime("verifier", pool=pool)         # pool: only for handlers with SQL
    SPEC.wire(verifier, adapters, VerifierSettings())
    await verifier.migrate(SPEC.migrations)               # the service's schema, when pooled
    seen = await bus.deliver(Envelope.of(payload, producer="test", project="p"))

What it keeps of the consumer policy: one transaction per delivery holding the handler's SQL
(when the runtime has a pool), the inbox (a redelivered event id does nothing), events emitted
only when the handler succeeds, `PermanentError` dead-lettered, and a refusal of undeclared
contracts. What it leaves out is what the real-stack tests prove: Kafka, the outbox relay,
offsets, retries with backoff, and the broker's epoch. Handlers run in the caller's task, in
delivery order, so a test reads no clock and waits for nothing; several tasks may deliver side by
side (a served app's requests), each carrying on only what its own handlers emitted. Events emitted outside a handler
(`transaction()`: HTTP endpoints, workers) wait in `outside` until `FakeBus.flush()`; `start()`
runs the wiring's start hooks (`on_start`), never its background loops.
"""

from __future__ import annotations

import contextlib
import inspect
import tempfile
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from visionloop.contracts import SYSTEM_PROJECT, DeadLetter, Envelope, Payload, PipelineStatus
from visionloop.contracts.topics import spec_for
from visionloop.libs.bus.unit import Outgoing, PermanentError, Unit, outgoing_of
from visionloop.libs.db import BUS_MIGRATIONS, Migration, discover, migrate


@dataclass
class _Consumer:
    payload: type[Payload]
    handler: Any
    group: str
    prepare: Any = None


@dataclass
class FakeSettings:
    """What handlers and wiring read of `Settings` through the runtime, with test defaults."""

    topic_prefix: str = ""
    instance: str = "test"
    kafka_embedded: bool = False
    embedded_kafka: bool = False
    state_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="vl-fake-")))
    schema_prefix: str = field(default_factory=lambda: f"t_{uuid.uuid4().hex[:8]}_")

    def topic(self, name: str) -> str:
        """The topic's full name."""
        return f"{self.topic_prefix}{name}"

    def schema_for(self, service: str) -> str:
        """The schema of `service` (a shared one, like the library's), unique to these settings."""
        return f"{self.schema_prefix}{service.replace('-', '_')}"


class FakeRuntime:
    """Where a service's handlers are wired in a test; see the module's note."""

    def __init__(self, service: str, *, pool: asyncpg.Pool | None = None, schema: str | None = None, settings: Any = None) -> None:
        self.service = service
        self.pool = pool
        self.settings = settings if settings is not None else FakeSettings()
        self.schema = schema or self.settings.schema_for(service)
        self.producer = f"{service}/test"
        self.http_url: str | None = None
        self.counters: Counter[str] = Counter()
        self.gauges: dict[str, float] = {}
        self.consumers: list[_Consumer] = []
        self.background_work: dict[str, Callable[[], Awaitable[None]]] = {}
        """Registered background loops: not started (a test calls the one it wants)."""
        self.start_hooks: list[Callable[[], Any]] = []
        self.produced: set[type[Payload]] = {DeadLetter, PipelineStatus}
        self.emitted: list[Envelope[Any]] = []
        """Every event this runtime emitted, in order (committed ones only)."""
        self.outside: list[Envelope[Any]] = []
        """Events emitted outside a handler (`transaction()`: HTTP endpoints, timers) not yet
        delivered: `FakeBus.flush()` delivers them."""
        self.dead_letters: list[tuple[Envelope[Any], BaseException]] = []
        self._inbox: set[tuple[str, uuid.UUID]] = set()

    # -- the wiring calls of Runtime ------------------------------------------------------------
    def produces(self, *payloads: type[Payload]) -> None:
        """Declare contracts this service emits."""
        for payload in payloads:
            spec_for(payload)  # refuses a payload without a topic, as the real runtime does
            self.produced.add(payload)

    def consume(self, payload: type[Payload], handler: Any, *, group: str | None = None, description: str | None = None) -> None:
        """Run `handler(event, unit)` for every delivered `payload` event."""
        self.consumers.append(_Consumer(payload, handler, group or f"{self.service}.{spec_for(payload).payload.event_type}"))

    def consume_batch(self, payload: type[Payload], handler: Any, *, prepare: Any, group: str | None = None, **_: Any) -> None:
        """Batch subscriptions run here one event at a time: `prepare([event])`, then the handler."""
        group = group or f"{self.service}.{spec_for(payload).payload.event_type}"
        self.consumers.append(_Consumer(payload, handler, group, prepare))

    def background(self, name: str, work: Callable[[], Awaitable[None]]) -> None:
        """Keep `work` under `name`; it is not started."""
        self.background_work[name] = work

    def on_start(self, hook: Callable[[], Any]) -> None:
        """Keep `hook` for `start()`."""
        self.start_hooks.append(hook)

    async def start(self) -> None:
        """Run the start hooks (no broker to connect to)."""
        for hook in self.start_hooks:
            done = hook()
            if inspect.isawaitable(done):
                await done

    def outgoing(self, envelope: Envelope[Any], key: str | None) -> Outgoing:
        """The record of `envelope`, refused for an undeclared contract (as on the real runtime)."""
        return outgoing_of(self.service, self.produced, envelope, key, self.settings.topic)

    async def publish_now(self, envelope: Envelope[Any], key: str | None = None) -> bool:
        """Ephemeral facts are recorded like emitted events."""
        self.outgoing(envelope, key)
        self.emitted.append(envelope)
        return True

    async def status(self, *_: Any, **__: Any) -> None:
        """Heartbeats are not recorded."""

    # -- the database -----------------------------------------------------------------------------
    async def migrate(self, migrations: Iterable[Migration] = ()) -> None:
        """Create this runtime's schema with the bus's tables and `migrations` (needs a pool)."""
        if self.pool is None:
            raise RuntimeError(f"{self.service}: migrate needs a pool")
        await migrate(self.pool, self.schema, discover("bus", BUS_MIGRATIONS) + list(migrations))

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Unit[Any]]:
        """A unit of work not caused by an event; its emitted events count when it commits."""
        async with self._unit(None) as unit:
            yield unit
        self.outside.extend(out.envelope for out in unit.emitted)

    @contextlib.asynccontextmanager
    async def _unit(self, event: Envelope[Any] | None) -> AsyncIterator[Unit[Any]]:
        if self.pool is None:
            unit: Unit[Any] = Unit(conn=None, runtime=self, event=event)  # type: ignore[arg-type]
            yield unit
            self.emitted.extend(out.envelope for out in unit.emitted)
            return
        async with self.pool.acquire() as conn, conn.transaction():
            unit = Unit(conn=conn, runtime=self, event=event)  # type: ignore[arg-type]
            yield unit
        self.emitted.extend(out.envelope for out in unit.emitted)

    # -- delivery ---------------------------------------------------------------------------------
    async def handle(self, event: Envelope[Any]) -> list[Envelope[Any]]:
        """Run every handler of this runtime that consumes `event`'s contract; what they emitted."""
        out: list[Envelope[Any]] = []
        for consumer in self.consumers:
            if consumer.payload is not type(event.payload):
                continue
            if (consumer.group, event.event_id) in self._inbox:
                self.counters["duplicates_skipped"] += 1
                continue
            try:
                async with self._unit(event) as unit:
                    if consumer.prepare is None:
                        await consumer.handler(event, unit)
                    else:
                        (prepared,) = await consumer.prepare([event])
                        if isinstance(prepared, BaseException):
                            raise prepared
                        await consumer.handler(event, unit, prepared)
            except PermanentError as exc:
                self.dead_letters.append((event, exc))
                self.counters["dead_lettered"] += 1
                self._inbox.add((consumer.group, event.event_id))
                continue
            self._inbox.add((consumer.group, event.event_id))
            self.counters["handled"] += 1
            out.extend(emitted.envelope for emitted in unit.emitted)  # this unit's own: other deliveries may run beside it
        return out


@dataclass
class FakeBus:
    """Fake runtimes joined by an in-memory broker: what one emits, the others consume."""

    runtimes: list[FakeRuntime] = field(default_factory=list)
    log: list[Envelope[Any]] = field(default_factory=list)
    """Every event delivered, in delivery order."""

    def runtime(self, service: str, **kwargs: Any) -> FakeRuntime:
        """A new fake runtime on this bus."""
        runtime = FakeRuntime(service, **kwargs)
        self.runtimes.append(runtime)
        return runtime

    async def deliver(self, *events: Envelope[Any], max_events: int = 10_000) -> list[Envelope[Any]]:
        """Deliver `events` and everything they cause, breadth first, until nothing is left;
        every event delivered (the given ones included), in order."""
        queue = deque(events)
        seen: list[Envelope[Any]] = []
        while queue:
            if len(seen) >= max_events:
                raise RuntimeError(f"more than {max_events} events: a handler loop?")
            event = queue.popleft()
            seen.append(event)
            for runtime in self.runtimes:
                queue.extend(await runtime.handle(event))
        self.log.extend(seen)
        return seen

    async def flush(self) -> list[Envelope[Any]]:
        """Deliver what runtimes emitted outside handlers (in their order), and what that causes."""
        waiting = [event for runtime in self.runtimes for event in runtime.outside]
        for runtime in self.runtimes:
            runtime.outside.clear()
        return await self.deliver(*waiting)

    async def publish(self, payload: Payload, *, project: str = SYSTEM_PROJECT, producer: str = "test") -> list[Envelope[Any]]:
        """Deliver one event made from `payload` (and what it causes)."""
        return await self.deliver(Envelope.of(payload, producer=producer, project=project))


def of_type(events: Iterable[Envelope[Any]], payload: type[Payload]) -> list[Any]:
    """The payloads of `events` that are `payload`s, in order."""
    return [event.payload for event in events if isinstance(event.payload, payload)]
