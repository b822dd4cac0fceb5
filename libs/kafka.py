"""Kafka plumbing below the bus: client options, topic creation, the broker epoch, and two hooks
into aiokafka that keep a restarted embedded broker from losing records.

Defaults work on both the embedded Tansu broker and Apache Kafka: no idempotent or
transactional producer (Tansu refuses them; the inbox makes effects exactly-once instead),
`acks=all`, and short group timeouts only where the broker is the embedded one.

What a restarted Tansu does (measured on 0.6.0, memory storage; tests/test_broker_restart.py):

- It has lost every topic, record and committed offset.
- A metadata request that names a missing topic creates it with Tansu's default of 4 partitions,
  not the registry's count; CreatePartitions is not supported, so it stays at 4.
- A produce request to a topic or partition it does not have is acknowledged (offset 0) and
  stored nowhere.
- Commit metadata is not kept (an offset commit's metadata string reads back empty).

So no client of this project may create a topic by naming it: every client's metadata requests
say `allow_auto_topic_creation=false` (aiokafka always says true; `_NoAutoCreate` below), and
topics are created only with the registry's partition counts, by `ensure_topics` (and by
FastStream's subscribers, which the bus gives the registry's counts; Apache Kafka's own
`auto.create.topics.enable` would otherwise create them with one partition). A client outside the
services (a bench, the CLI, a test) calls `ensure_named` or `ensure_topics` before it produces or
subscribes. And every
process learns at once that its connection to the broker broke (`on_connection_lost`): the bus
then holds its offset commits and publishes until it has checked the broker's epoch
(`libs/bus/epoch.py`), so nothing is committed to, or counted as published on, a broker that has
not yet been given the registry's topics.

On the embedded broker every client also refreshes its metadata every few seconds
(`EMBEDDED_METADATA_MAX_AGE_MS`; aiokafka's default is 5 minutes).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import uuid
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import aiokafka.admin.client
import aiokafka.client
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.conn import CloseReason
from aiokafka.protocol.metadata import MetadataRequest
from faststream.kafka import KafkaBroker
from faststream.security import BaseSecurity, SASLPlaintext, SASLScram256, SASLScram512

from visionloop.contracts.topics import TopicSpec
from visionloop.libs.settings import Settings

if TYPE_CHECKING:
    from visionloop.contracts import Envelope, Payload

log = logging.getLogger(__name__)

TOPIC_ALREADY_EXISTS = 36
UNKNOWN_TOPIC_OR_PARTITION = 3
EPOCH_TOPIC = "vl._broker.epoch"
"""Internal topic whose first message names the broker's life: a new value means lost topics."""
EMBEDDED_METADATA_MAX_AGE_MS = 3000
"""How often clients of the embedded broker refresh their metadata (aiokafka's default: 5 minutes)."""


# -- hooks into aiokafka ------------------------------------------------------------------------


class _NoAutoCreate(MetadataRequest):
    """A metadata request that never creates the topics it names (aiokafka always asks to)."""

    def __init__(self, topics: list[str] | None = None, allow_auto_topic_creation: bool | None = False) -> None:
        super().__init__(topics, bool(allow_auto_topic_creation))


aiokafka.client.MetadataRequest = _NoAutoCreate  # type: ignore[misc]
aiokafka.admin.client.MetadataRequest = _NoAutoCreate  # type: ignore[misc]


class _MissingTopicIsNoError(logging.Filter):
    """aiokafka logs an ERROR at every metadata refresh for each topic a client tracks that does not
    exist yet; without automatic creation that is the normal state until `ensure_topics` runs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "Topic %s not found in cluster metadata"


logging.getLogger("aiokafka.cluster").addFilter(_MissingTopicIsNoError())

_LOST_REASONS = {CloseReason.CONNECTION_BROKEN, CloseReason.CONNECTION_TIMEOUT, CloseReason.OUT_OF_SYNC}
_lost_listeners: list[Callable[[str], None]] = []
_closed = aiokafka.client.AIOKafkaClient._on_connection_closed


def _on_connection_closed(client: Any, conn: Any, reason: Any) -> None:
    _closed(client, conn, reason)
    if reason in _LOST_REASONS:
        where = f"{getattr(conn, 'host', '?')}:{getattr(conn, 'port', '?')}"
        for listener in list(_lost_listeners):
            listener(where)


aiokafka.client.AIOKafkaClient._on_connection_closed = _on_connection_closed  # type: ignore[method-assign]


def on_connection_lost(listener: Callable[[str], None]) -> Callable[[], None]:
    """Call `listener(host:port)` whenever any Kafka client of this process loses a connection
    (broken or timed out, not closed on purpose); returns the function that stops it."""
    _lost_listeners.append(listener)
    return lambda: _lost_listeners.remove(listener) if listener in _lost_listeners else None


def known_partitions(client: Any, topic: str) -> int | None:
    """How many partitions a running client's metadata shows for `topic` (None: not known).

    `client` is an AIOKafkaProducer or AIOKafkaConsumer; nothing is requested from the broker.
    """
    inner = getattr(client, "client", None) or getattr(client, "_client", None)
    partitions = inner.cluster.partitions_for_topic(topic) if inner is not None else None
    return len(partitions) if partitions is not None else None


async def refresh_metadata(client: Any) -> None:
    """Make a running producer or consumer fetch its metadata now (it does so every few seconds anyway)."""
    inner = getattr(client, "client", None) or getattr(client, "_client", None)
    if inner is not None:
        await inner.force_metadata_update()


def _ssl_context(settings: Settings) -> ssl.SSLContext | None:
    if "SSL" not in settings.kafka_security_protocol:
        return None
    context = ssl.create_default_context(cafile=settings.kafka_ssl_cafile)
    if settings.kafka_ssl_certfile:
        context.load_cert_chain(settings.kafka_ssl_certfile, settings.kafka_ssl_keyfile)
    return context


def security(settings: Settings) -> BaseSecurity | None:
    """FastStream security object for the configured protocol (SASL and/or TLS)."""
    protocol = settings.kafka_security_protocol
    context = _ssl_context(settings)
    if protocol == "PLAINTEXT":
        return None
    if protocol == "SSL":
        return BaseSecurity(ssl_context=context, use_ssl=True)
    password = settings.sasl_password
    if not settings.kafka_sasl_username or password is None:
        raise ValueError(
            f"{protocol} needs VL_KAFKA_SASL_USERNAME and VL_KAFKA_SASL_PASSWORD(_FILE)"
        )
    kind = {"PLAIN": SASLPlaintext, "SCRAM-SHA-256": SASLScram256, "SCRAM-SHA-512": SASLScram512}[
        settings.kafka_sasl_mechanism
    ]
    return kind(
        settings.kafka_sasl_username,
        password.get_secret_value(),
        ssl_context=context,
        use_ssl=protocol == "SASL_SSL",
    )


def client_kwargs(settings: Settings) -> dict[str, object]:
    """Connection options for plain aiokafka clients (admin, producer, consumer)."""
    if settings.kafka_bootstrap is None:
        raise RuntimeError("no Kafka bootstrap configured: set VL_KAFKA_BOOTSTRAP or use `visionloop up`")
    kwargs: dict[str, object] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "security_protocol": settings.kafka_security_protocol,
    }
    if embedded(settings):
        kwargs["metadata_max_age_ms"] = EMBEDDED_METADATA_MAX_AGE_MS
    context = _ssl_context(settings)
    if context is not None:
        kwargs["ssl_context"] = context
    if settings.kafka_security_protocol.startswith("SASL"):
        password = settings.sasl_password
        kwargs |= {
            "sasl_mechanism": settings.kafka_sasl_mechanism,
            "sasl_plain_username": settings.kafka_sasl_username,
            "sasl_plain_password": password.get_secret_value() if password else None,
        }
    return kwargs


def embedded(settings: Settings) -> bool:
    """Whether the broker is the embedded Tansu (memory only: a restart loses every topic)."""
    return settings.embedded_kafka or settings.kafka_embedded


def consumer_kwargs(settings: Settings) -> dict[str, object]:
    """Options for plain aiokafka consumers: connection plus the fetch long-poll limit in force."""
    return client_kwargs(settings) | {"fetch_max_wait_ms": settings.fetch_max_wait_ms}


def producer_kwargs(settings: Settings) -> dict[str, object]:
    """Options for the bus's producer: connection, `acks=all`, no idempotence (Tansu refuses it)."""
    return client_kwargs(settings) | {"acks": "all", "enable_idempotence": False}


def make_broker(settings: Settings, client_id: str) -> KafkaBroker:
    """A FastStream KafkaBroker configured from settings.

    `apply_types=False`: the bus validates envelopes itself, so that a malformed message becomes
    a dead letter with a reason instead of an exception inside the framework.
    """
    return KafkaBroker(
        settings.kafka_bootstrap or "127.0.0.1:9092",
        client_id=f"{settings.kafka_client_id}.{client_id}",
        security=security(settings),
        acks="all",
        enable_idempotence=False,
        apply_types=False,
        logger=logging.getLogger(f"visionloop.kafka.{client_id}"),
        log_level=logging.DEBUG,  # per-message "Received/Processed" lines only at debug level
        graceful_timeout=15.0,
        **({"metadata_max_age_ms": EMBEDDED_METADATA_MAX_AGE_MS} if embedded(settings) else {}),
    )


async def ensure_topics(settings: Settings, specs: Iterable[TopicSpec], extra: Iterable[tuple[str, int]] = ()) -> list[str]:
    """Create the registry's topics (partitions from the registry); existing ones are fine.

    An existing topic with fewer partitions than the registry says (created by a client that
    named it, or by hand) is grown where the broker can (Apache Kafka); where it cannot (Tansu has
    no CreatePartitions) it is named in a warning, once per process. Returns the names created now.
    """
    wanted = dict([(settings.topic(s.name), s.partitions) for s in specs] + list(extra))
    admin = AIOKafkaAdminClient(**client_kwargs(settings))  # type: ignore[arg-type]
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [
            NewTopic(name, partitions, settings.kafka_replication_factor)
            for name, partitions in wanted.items()
            if name not in existing
        ]
        await _grow(admin, {name: count for name, count in wanted.items() if name in existing})
        if not new:
            return []
        response = await admin.create_topics(new)
        created = []
        for name, code, message in (e[:3] for e in response.topic_errors):
            if code == 0:
                created.append(name)
            elif code != TOPIC_ALREADY_EXISTS:  # a concurrent start created it: fine
                raise RuntimeError(f"cannot create topic {name}: error {code} {message}")
        return created
    finally:
        await admin.close()


async def ensure_named(settings: Settings, topics: Iterable[str]) -> list[str]:
    """`ensure_topics` for topic names (prefix included), as a client outside the services has them:
    a registry topic gets the registry's partition count, any other topic one partition."""
    from visionloop.contracts.topics import TOPICS

    by_name = {settings.topic(spec.name): spec for spec in TOPICS.values()}
    wanted = set(topics)
    specs = [by_name[name] for name in wanted if name in by_name]
    return await ensure_topics(settings, specs, extra=[(name, 1) for name in wanted if name not in by_name])


_warned_short: set[str] = set()


async def _grow(admin: AIOKafkaAdminClient, wanted: dict[str, int]) -> None:
    """Give existing topics the registry's partition count where they have fewer."""
    if not wanted:
        return
    short = {}
    for topic in await admin.describe_topics(list(wanted)):
        name, count = topic.get("topic"), len(topic.get("partitions") or ())
        if topic.get("error_code") == 0 and name in wanted and count < wanted[name]:
            short[name] = count
    if not short:
        return
    try:
        await admin.create_partitions({name: NewPartitions(wanted[name]) for name in short})
        log.warning("topics grown to the registry's partition counts: %s", {n: (c, wanted[n]) for n, c in short.items()})
    except Exception as exc:  # Tansu: "CreatePartitionsRequest cannot be used"
        for name, count in short.items():
            if name not in _warned_short:
                _warned_short.add(name)
                log.warning(
                    "topic %s has %d partitions, the registry says %d, and the broker cannot add partitions "
                    "(%s): it works with %d; delete the topic while the stack is stopped to have it re-created",
                    name, count, wanted[name], type(exc).__name__, count,
                )


async def broker_epoch(settings: Settings) -> str:
    """The id of the broker's current life, agreed by every process.

    Each process appends a fresh id to the epoch topic and reads back the first message: on a
    broker that has just lost its topics (the embedded one restarted), that is a new value. A
    planned restart (`libs/rotation.py`) writes the first message itself, naming the life it
    continues (`planned_epoch`).
    """
    await write_epoch(settings, uuid.uuid4().hex)
    epoch = await first_epoch(settings)
    if epoch is None:
        raise RuntimeError("the broker's epoch topic is empty right after a write to it")
    return epoch


async def write_epoch(settings: Settings, value: str, *, client_id: str | None = None) -> None:
    """Append `value` to the epoch topic (created if missing)."""
    topic = settings.topic(EPOCH_TOPIC)
    await ensure_topics(settings, [], extra=[(topic, 1)])
    extra = {"client_id": client_id} if client_id else {}
    producer = AIOKafkaProducer(**(client_kwargs(settings) | extra), acks="all")  # type: ignore[arg-type]
    await producer.start()
    try:
        await producer.send_and_wait(topic, value.encode(), key=b"epoch")
    finally:
        await producer.stop()


async def first_epoch(settings: Settings, *, client_id: str | None = None, timeout_s: float = 10.0) -> str | None:
    """The first message of the epoch topic (the broker's current epoch); None where there is none."""
    topic = settings.topic(EPOCH_TOPIC)
    extra = {"client_id": client_id} if client_id else {}
    consumer = AIOKafkaConsumer(**(client_kwargs(settings) | extra), enable_auto_commit=False)  # type: ignore[arg-type]
    await consumer.start()
    try:
        if topic not in await consumer.topics():
            return None
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        try:
            record = await asyncio.wait_for(consumer.getone(), timeout=timeout_s)
        except TimeoutError:
            return None
        return record.value.decode()
    finally:
        await consumer.stop()


def planned_epoch(previous: str) -> str:
    """A new epoch that continues `previous`: the broker was restarted by plan, with every record
    no consumer had read written back to it, so nothing needs re-publishing."""
    return f"{uuid.uuid4().hex}+{previous.split('+', 1)[0]}"


def continues(epoch: str, last: str | None) -> bool:
    """Whether `epoch` is a planned continuation of `last` (see `planned_epoch`)."""
    _, plus, previous = epoch.partition("+")
    return bool(plus) and last is not None and previous == last.split("+", 1)[0]


async def publish_once(settings: Settings, payload: "Payload", *, project: str, producer: str, key: str | None = None) -> "Envelope[Any]":
    """Publish one contract event from outside any service (the CLI's commands); return its envelope.

    The topic is created first if it does not exist. For events a service emits as the effect of
    its work, use the runtime (outbox) instead.
    """
    from visionloop.contracts import Envelope
    from visionloop.contracts.topics import spec_for

    spec = spec_for(type(payload))
    await ensure_topics(settings, [spec])
    envelope = Envelope.of(payload, producer=producer, project=project)
    client = AIOKafkaProducer(**client_kwargs(settings), acks="all")  # type: ignore[arg-type]
    await client.start()
    try:
        await client.send_and_wait(
            settings.topic(spec.name), envelope.model_dump_json().encode(),
            key=(key or spec.key_of(envelope)).encode(),
        )
    finally:
        await client.stop()
    return envelope
