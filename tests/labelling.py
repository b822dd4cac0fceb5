"""Helpers of the labelling tests (gateway + verifier): a running stack over real HTTP, tokens,
events published in bulk, and waiting for the loop's answers. `fake_lab` runs the services on the
in-memory bus (no Kafka); `running_lab` over the real broker."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaProducer
from helpers import Collector, eventually

from visionloop.app import ServiceHost
from visionloop.contracts import (
    Detection,
    Envelope,
    ImageRecognized,
    ImageRef,
    ImageSource,
    ImageUnrecognized,
    LabelRejected,
    LabelSubmitted,
    LabelVerified,
    ModelRef,
    Payload,
    RecognitionMeta,
    TrainingRequested,
    UnrecognizedReason,
    topic_of,
)
from visionloop.libs.bus.fake import FakeBus
from visionloop.libs.kafka import client_kwargs, ensure_named
from visionloop.libs.settings import Settings
from visionloop.services.labeling_gateway import store
from visionloop.services.labeling_gateway.admin import create_project
from visionloop.services.labeling_gateway.auth import Role

MODEL = ModelRef(model_id="demo-detector", version=3)
CLASSES = ["car", "person", "bicycle"]


def png(width: int = 320, height: int = 240, seed: int = 0) -> bytes:
    """A small distinct PNG (the seed changes its pixels, so its SHA-256)."""
    from PIL import Image

    image = Image.new("RGB", (width, height), ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    image.putpixel((seed % width, (seed // width) % height), (255, 255, 255))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def fake_image(n: int, width: int = 640, height: int = 480) -> ImageRef:
    """An ImageRef whose bytes are never read (queue tests)."""
    sha = hashlib.sha256(f"fake-{n}-{uuid.uuid4()}".encode()).hexdigest()
    return ImageRef(image_id=sha, blob_uri=f"file:///nonexistent/{sha}", width=width, height=height, format="JPEG", byte_size=1000)


async def stored_image(blobs: Any, seed: int, width: int = 320, height: int = 240) -> tuple[ImageRef, bytes]:
    """A real image in the blob store."""
    data = png(width, height, seed)
    ref = await blobs.put(data)
    return ImageRef(image_id=ref.sha256, blob_uri=ref.uri, width=width, height=height, format="PNG", byte_size=len(data)), data


def recognition(uncertainty: float) -> RecognitionMeta:
    return RecognitionMeta(model=MODEL, model_sha256="a" * 64, conf_threshold=0.25, uncertainty=uncertainty)


def unrecognized(image: ImageRef, uncertainty: float = 0.5, detections: list[Detection] | None = None) -> ImageUnrecognized:
    return ImageUnrecognized(
        image=image, source=ImageSource(), reason=UnrecognizedReason.UNCERTAIN, message="uncertain",
        uncertainty=uncertainty, recognition=recognition(uncertainty), detections=detections or [], class_names=CLASSES,
    )


def recognized(image: ImageRef, prelabels: list[Detection], uncertainty: float = 0.1) -> ImageRecognized:
    return ImageRecognized(image=image, source=ImageSource(), prelabels=prelabels, recognition=recognition(uncertainty), class_names=CLASSES)


async def publish_many(settings: Settings, payloads: list[Payload], *, project: str) -> list[Envelope[Any]]:
    """Publish events on their topics with one producer (fast for hundreds)."""
    await ensure_named(settings, {topic_of(p, settings.topic_prefix) for p in payloads})
    producer = AIOKafkaProducer(**client_kwargs(settings), acks="all", linger_ms=5)
    await producer.start()
    envelopes = []
    try:
        sends = []
        for payload in payloads:
            envelope = Envelope.of(payload, producer="test", project=project, correlation_id=payload.image.image_id)  # type: ignore[attr-defined]
            envelopes.append(envelope)
            sends.append(await producer.send(topic_of(payload, settings.topic_prefix), envelope.model_dump_json().encode(),
                                             key=payload.image.image_id.encode()))  # type: ignore[attr-defined]
        await asyncio.gather(*sends)
    finally:
        await producer.stop()
    return envelopes


LABEL_PAYLOADS = (LabelSubmitted, LabelVerified, LabelRejected, TrainingRequested)


def label_topics(settings: Settings) -> list[str]:
    return [topic_of(p, settings.topic_prefix) for p in LABEL_PAYLOADS]


@dataclass
class Lab:
    """Gateway and verifier running over the real broker and PostgreSQL, served on loopback."""

    settings: Settings
    pool: asyncpg.Pool
    host: ServiceHost
    http: httpx.AsyncClient
    project: str
    tokens: dict[str, str] = field(default_factory=dict)
    events: Collector | None = None
    bus: FakeBus | None = None
    """The in-memory bus of a `fake_lab` (None over the real broker)."""

    @property
    def base_url(self) -> str:
        return self.host.endpoints["labeling-gateway"]

    @property
    def blobs(self) -> Any:
        """The blob store the services use."""
        from visionloop.libs.blob import open_blob_store

        return open_blob_store(self.settings.blob_location)

    @property
    def schema(self) -> str:
        return f'"{self.settings.schema_for("labeling-gateway")}"'

    @property
    def verifier_schema(self) -> str:
        return f'"{self.settings.schema_for("verifier")}"'

    def auth(self, role_or_token: str) -> dict[str, str]:
        token = self.tokens.get(role_or_token, role_or_token)
        return {"Authorization": f"Bearer {token}"}

    async def token(self, role: str, user: str, project: str | None = "") -> str:
        """A new token (straight in the gateway's tables: quicker than the CLI's own pool)."""
        async with self.pool.acquire() as conn:
            _, token = await store.create_token(
                conn, self.schema, project=self.project if project == "" else project, role=Role.parse(role), user_id=user, created_by="test"
            )
        return token

    async def tasks(self, where: str = "true") -> list[asyncpg.Record]:
        return await self.pool.fetch(f"SELECT * FROM {self.schema}.tasks WHERE {where}")

    async def wait_tasks(self, count: int, where: str = "state = 'queued'", timeout: float = 30) -> None:
        async def enough() -> bool:
            return await self.pool.fetchval(f"SELECT count(*) FROM {self.schema}.tasks WHERE {where}") >= count

        await eventually(enough, timeout=timeout, interval=0.1)

    def messages(self, event_type: str) -> list[dict[str, Any]]:
        """The label topics' events of `event_type` so far, as JSON (as a consumer reads them)."""
        if self.bus is not None:
            return [json.loads(e.model_dump_json()) for e in self.bus.log
                    if isinstance(e.payload, LABEL_PAYLOADS) and e.event_type == event_type]
        assert self.events is not None
        return [m for m in self.events.messages if m.get("event_type") == event_type]

    async def publish(self, payloads: list[Payload], *, project: str) -> list[Envelope[Any]]:
        """Publish image events (on the fake bus: delivered, with all they cause, before this returns)."""
        if self.bus is None:
            return await publish_many(self.settings, payloads, project=project)
        envelopes = [Envelope.of(p, producer="test", project=project, correlation_id=p.image.image_id)  # type: ignore[attr-defined]
                     for p in payloads]
        await self.bus.deliver(*envelopes)
        return envelopes

    async def wait_events(self, event_type: str, count: int, timeout: float = 30) -> list[dict[str, Any]]:
        await eventually(lambda: len(self.messages(event_type)) >= count, timeout=timeout, interval=0.05)
        return self.messages(event_type)


    async def use_project(self, project: str, classes: list[str] | None = None) -> "Lab":
        """Create `project` (with tokens of every role) and make it the one the helpers use."""
        await create_project(self.settings, project, classes if classes is not None else CLASSES)
        self.project = project
        for role in ("annotator", "reviewer", "admin"):
            self.tokens[role] = await self.token(role, f"{role}-{project}")
        return self


def lab_settings(kafka_bootstrap: str, database_url: str, folder: Path) -> Settings:
    """Settings of one test module's stack: its own topics, schemas and blob folder."""
    tag = uuid.uuid4().hex[:8]
    return Settings(
        state_dir=folder / "state", kafka_bootstrap=kafka_bootstrap, kafka_embedded=True, database_url=database_url,
        blob_url=(folder / "blobs").as_uri(), topic_prefix=f"t{tag}.", schema_prefix=f"t{tag}_",
        retry_backoff_ms=20, retry_backoff_max_ms=200, outbox_relay_interval_s=0.2, heartbeat_interval_s=1.0,
        instance=f"test-{tag}",
    )


@contextlib.asynccontextmanager
async def running_lab(
    kafka_bootstrap: str, database_url: str, folder: Path, *, env: dict[str, str] | None = None,
    services: tuple[str, ...] = ("labeling-gateway", "verifier"),
) -> AsyncIterator[Lab]:
    """Gateway and verifier for a whole test module (starting them takes seconds: consumer
    group joins), configured by `VL_*` variables in `env`; each test uses its own project."""
    settings = lab_settings(kafka_bootstrap, database_url, folder)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=10)
    assert pool is not None
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VL_LABELING_GATEWAY_PORT", "0")
        for name, value in (env or {}).items():
            patch.setenv(name, value)
        host = ServiceHost(settings, list(services))
        await host.start()
    http = httpx.AsyncClient(base_url=host.endpoints["labeling-gateway"], timeout=30)
    lab = Lab(settings=settings, pool=pool, host=host, http=http, project="")
    lab.tokens["global-admin"] = await lab.token("admin", "root", project=None)
    lab.events = Collector(settings, *label_topics(settings))
    await lab.events.__aenter__()
    try:
        yield lab
    finally:
        await lab.events.__aexit__(None, None, None)
        await http.aclose()
        await host.stop()
        for row in await pool.fetch("SELECT nspname FROM pg_namespace WHERE nspname LIKE $1", settings.schema_prefix + "%"):
            await pool.execute(f'DROP SCHEMA IF EXISTS "{row["nspname"]}" CASCADE')
        await pool.close()


def _delivering(app: Any, bus: FakeBus) -> Any:
    """`app` that delivers what a request emitted (and what that causes) before the answer leaves,
    as if the outbox relay and the consumers were instant."""

    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await app(scope, receive, send)

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                await bus.flush()
            await send(message)

        await app(scope, receive, sending)

    return wrapped


async def _relay(bus: FakeBus) -> None:
    """Deliver what background loops emit (webhooks, timers), every 20 ms."""
    while True:
        if any(runtime.outside for runtime in bus.runtimes):
            await bus.flush()
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def fake_lab(
    database_url: str, folder: Path, *, env: dict[str, str] | None = None, services: tuple[str, ...] = ("labeling-gateway", "verifier"),
) -> AsyncIterator[Lab]:
    """`running_lab` on the in-memory bus (libs/bus/fake.py): the services' own wiring, their SQL on
    PostgreSQL, their HTTP apps served on loopback, their background loops running; no Kafka. An
    event emitted by a request is delivered, with all it causes, before the answer leaves; one a
    background loop emits, within 20 ms. Delivery itself (relay, offsets, retries, restarts) is
    proven over the real broker elsewhere (test_bus.py, test_broker_restart.py, test_chaos.py)."""
    from visionloop import services as registry
    from visionloop.libs.blob import open_blob_store
    from visionloop.libs.service import Adapters

    settings = lab_settings("127.0.0.1:9", database_url, folder)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=10)
    assert pool is not None
    bus = FakeBus()
    adapters = Adapters(blobs=open_blob_store(settings.blob_location))
    server = ServiceHost(settings, [])  # only its loopback HTTP serving is used
    loops: list[asyncio.Task[Any]] = []
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in (env or {}).items():
                patch.setenv(name, value)
            for name in services:
                spec = registry.get(name)
                runtime = bus.runtime(spec.name, pool=pool, settings=settings)
                app = spec.wire(runtime, adapters, spec.settings() if spec.settings else None)  # type: ignore[arg-type]
                await runtime.migrate(spec.migrations)
                await runtime.start()
                loops += [asyncio.create_task(work(), name=f"{name}-{what}") for what, work in runtime.background_work.items()]
                if app is not None:
                    await server._serve(spec.name, _delivering(app, bus), 0)
        relay = asyncio.create_task(_relay(bus), name="fake-relay")
        loops.append(relay)
        http = httpx.AsyncClient(base_url=server.endpoints["labeling-gateway"], timeout=30)
        lab = Lab(settings=settings, pool=pool, host=server, http=http, project="", bus=bus)
        server.runtimes = bus.runtimes  # type: ignore[assignment]
        lab.tokens["global-admin"] = await lab.token("admin", "root", project=None)
        yield lab
        await http.aclose()
        if relay.done():
            relay.result()  # a handler that failed on an event a background loop emitted
    finally:
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        server.runtimes = []
        await server.stop()
        for row in await pool.fetch("SELECT nspname FROM pg_namespace WHERE nspname LIKE $1", settings.schema_prefix + "%"):
            await pool.execute(f'DROP SCHEMA IF EXISTS "{row["nspname"]}" CASCADE')
        await pool.close()
