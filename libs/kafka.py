"""Kafka plumbing below the bus: the FastStream broker factory, topic creation, broker epoch.

Defaults work on both the embedded Tansu broker and Apache Kafka: no idempotent or
transactional producer (Tansu refuses them; the inbox makes effects exactly-once instead),
`acks=all`, and short group timeouts only where the broker is the embedded one.

On the embedded broker every client also refreshes its metadata every few seconds
(`EMBEDDED_METADATA_MAX_AGE_MS`). A restarted Tansu has lost its topics and re-creates any topic
a client names with its own default of 4 partitions, not the registry's count; a producer still
holding the old broker's metadata sends to partitions that no longer exist, and Tansu acknowledges
those records without storing them. Fresh metadata ends that window within seconds, and the bus
replays its outbox only after it (`Runtime._check_epoch`).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from faststream.kafka import KafkaBroker
from faststream.security import BaseSecurity, SASLPlaintext, SASLScram256, SASLScram512

from visionloop.contracts.topics import TopicSpec
from visionloop.libs.settings import Settings

if TYPE_CHECKING:
    from visionloop.contracts import Envelope, Payload

log = logging.getLogger(__name__)

TOPIC_ALREADY_EXISTS = 36
EPOCH_TOPIC = "vl._broker.epoch"
"""Internal topic whose first message names the broker's life: a new value means lost topics."""
EMBEDDED_METADATA_MAX_AGE_MS = 3000
"""How often clients of the embedded broker refresh their metadata (aiokafka's default: 5 minutes)."""


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


def metadata_refresh_s(settings: Settings) -> float:
    """Longest time until every client of this process has fresh metadata (0: not bounded here)."""
    return EMBEDDED_METADATA_MAX_AGE_MS / 1000 if embedded(settings) else 0.0


def consumer_kwargs(settings: Settings) -> dict[str, object]:
    """Options for plain aiokafka consumers: connection plus the fetch long-poll limit in force."""
    return client_kwargs(settings) | {"fetch_max_wait_ms": settings.fetch_max_wait_ms}


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

    Returns the names created now.
    """
    wanted = [(settings.topic(s.name), s.partitions) for s in specs] + list(extra)
    admin = AIOKafkaAdminClient(**client_kwargs(settings))  # type: ignore[arg-type]
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [
            NewTopic(name, partitions, settings.kafka_replication_factor)
            for name, partitions in wanted
            if name not in existing
        ]
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


async def broker_epoch(settings: Settings) -> str:
    """The id of the broker's current life, agreed by every process.

    Each process appends a fresh id to the epoch topic and reads back the first message: on a
    broker that has just lost its topics (the embedded one restarted), that is a new value.
    """
    topic = settings.topic(EPOCH_TOPIC)
    await ensure_topics(settings, [], extra=[(topic, 1)])
    producer = AIOKafkaProducer(**client_kwargs(settings), acks="all")  # type: ignore[arg-type]
    await producer.start()
    try:
        await producer.send_and_wait(topic, uuid.uuid4().hex.encode(), key=b"epoch")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(**client_kwargs(settings), enable_auto_commit=False)  # type: ignore[arg-type]
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        record = await asyncio.wait_for(consumer.getone(), timeout=10)
        return record.value.decode()
    finally:
        await consumer.stop()


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
