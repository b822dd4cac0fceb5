"""What a handler works with: the unit (its transaction and what it emits) and the failure kinds."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Container, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import asyncpg

from visionloop.contracts import Envelope, Payload
from visionloop.contracts.topics import TOPICS, TopicSpec
from visionloop.libs.db import quote_ident

if TYPE_CHECKING:
    from visionloop.libs.bus.runtime import Runtime

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
class Outgoing:
    """One emitted event, ready for the outbox and the broker."""

    envelope: Envelope[Any]
    topic: str
    key: bytes | None
    value: bytes
    headers: dict[str, str]
    outbox_id: int | None = None


def outgoing_of(service: str, declared: Container[type[Payload]], envelope: Envelope[Any], key: str | None,
                topic: Callable[[str], str]) -> Outgoing:
    """The record of `envelope` on its registry topic (`topic` adds the deployment's prefix),
    refused for a contract the service did not declare; shared by the runtime and its fake."""
    payload_type = type(envelope.payload)
    if payload_type not in declared:
        raise ValueError(
            f"{service} emits {payload_type.__name__} without declaring it: call "
            f"runtime.produces({payload_type.__name__})"
        )
    spec = TOPICS[payload_type]
    key = key if key is not None else spec.key_of(envelope)
    return Outgoing(
        envelope=envelope,
        topic=topic(spec.name),
        key=key.encode() if key is not None else None,
        value=envelope.model_dump_json().encode(),
        headers={
            "event_type": envelope.event_type,
            "schema_version": envelope.schema_version,
            "event_id": str(envelope.event_id),
        },
    )


@dataclass
class Unit(Generic[P]):
    """What a handler gets besides its event: the open transaction and a way to emit events.

    Everything done through `conn` and every `emit` commit together, or not at all.
    """

    conn: asyncpg.Connection
    runtime: "Runtime"
    event: Envelope[P] | None = None
    emitted: list[Outgoing] = field(default_factory=list)

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
        self.emitted.append(self.runtime.outgoing(envelope, key))
        return envelope


Handler = Callable[[Envelope[P], Unit[P]], Awaitable[None]]

BatchPrepare = Callable[[list[Envelope[P]]], Awaitable[Sequence[Any]]]
"""Work for a whole batch, outside any transaction: one result (or exception) per event, in order."""
BatchHandler = Callable[[Envelope[P], Unit[P], Any], Awaitable[None]]
"""One event's effect inside the transaction, given its prepared result."""


@dataclass
class Subscription:
    """One consumed contract: its topic, handler and consumer group."""

    spec: TopicSpec
    handler: Any
    group: str
    model: type[Envelope[Any]]
    prepare: Any = None
    """Set for batch subscriptions (`consume_batch`)."""
    subscriber: Any = None
    """The FastStream subscriber (its `consumer` is the aiokafka consumer once started)."""

    @property
    def consumer(self) -> Any:
        """The running aiokafka consumer, or None."""
        return getattr(self.subscriber, "consumer", None)
