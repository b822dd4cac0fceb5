"""The two hops of `visionloop bench bus`, each in its own process
(`python -m visionloop.bench.bus_hop {raw|framework}`, started by the bench): one consumes `image
ingested` and emits `image accepted` through the framework (inbox, outbox, PostgreSQL), the other
does the same with plain aiokafka clients. The module docstring of `visionloop.bench.bus` defines
what is measured."""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import hashlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

ARMS = ("raw", "framework")
READY = "ready"
"""What a hop prints on stdout once it consumes."""


def _raw_topics(settings: Any) -> tuple[str, str]:
    return settings.topic("bench.raw.image.ingested"), settings.topic("bench.raw.image.accepted")


def _sample_input(n: int, arm: str) -> tuple[bytes, bytes]:
    """An `image ingested` envelope as bytes, keyed by its image id (unique per arm and n)."""
    from visionloop.contracts import Envelope, ImageIngested, ImageRef, ImageSource

    digest = hashlib.sha256(f"bench-{arm}-{n}".encode()).hexdigest()
    payload = ImageIngested(
        submission_id=f"bench-{n}",
        image=ImageRef(
            image_id=digest,
            blob_uri=f"file:///blobs/{digest[:2]}/{digest}",
            width=640,
            height=480,
            format="JPEG",
            byte_size=48_213,
        ),
        source=ImageSource(domain={"site": "bench", "camera": "c1"}, source_system="bench"),
    )
    envelope = Envelope.of(payload, producer="bench/driver", project="bench")
    return digest.encode(), envelope.model_dump_json().encode()


def _accepted(event: Any) -> Any:
    """What the hop emits for an `image ingested`: the image, accepted, with a fixed hash."""
    from visionloop.contracts import ImageAccepted, ImageHashes

    return ImageAccepted(
        submission_id=event.payload.submission_id,
        image=event.payload.image,
        source=event.payload.source,
        hashes=ImageHashes(phash="0" * 16),
    )


def _batch() -> int:
    return int(os.environ.get("VL_BENCH_BATCH", "1"))


async def _framework_hop(settings: Any, stop: asyncio.Event) -> dict[str, int]:
    from visionloop.contracts import Envelope, ImageAccepted, ImageIngested
    from visionloop.libs.bus import Runtime, Unit
    from visionloop.libs.db import create_pool

    pool = await create_pool(settings)
    runtime = Runtime("hop", settings, pool=pool, description="Benchmark hop: accepts every image.")

    async def accept(event: Envelope[ImageIngested], unit: Unit[ImageIngested]) -> None:
        """Accept every ingested image (the bench measures the bus, not a decision)."""
        unit.emit(_accepted(event))

    async def accept_prepared(event: Envelope[ImageIngested], unit: Unit[ImageIngested], result: Any) -> None:
        """Accept every ingested image of a batch."""
        unit.emit(_accepted(event))

    async def prepare(events: list[Any]) -> list[None]:
        return [None] * len(events)

    if _batch() > 1:
        runtime.consume_batch(ImageIngested, accept_prepared, prepare=prepare, max_records=_batch())
    else:
        runtime.consume(ImageIngested, accept)
    runtime.produces(ImageAccepted)
    await runtime.start()
    print(READY, flush=True)
    try:
        await stop.wait()
    finally:
        await runtime.stop()
        await pool.close()
    return dict(runtime.counters)


def _raw_output(settings: Any) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The raw hop's output, serialised once (the framework's size), and its headers."""
    from visionloop.contracts import Envelope, ImageIngested

    incoming = Envelope[ImageIngested].model_validate_json(_sample_input(0, "template")[1])
    template = Envelope.of(
        _accepted(incoming), producer=f"hop/{settings.instance}", project="bench", causation=incoming
    )
    value = template.model_dump_json().encode()
    headers = [
        ("content-type", b"application/octet-stream"),
        ("event_type", template.event_type.encode()),
        ("schema_version", template.schema_version.encode()),
        ("event_id", str(template.event_id).encode()),
        ("correlation_id", template.correlation_id.encode()),
    ]
    return value, headers


def _raw_clients(settings: Any, source: str) -> tuple[Any, Any]:
    """The raw hop's consumer (the bus's group settings, auto-commit off) and producer, not started."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    from visionloop.libs.kafka import client_kwargs, consumer_kwargs

    consumer = AIOKafkaConsumer(
        source,
        **consumer_kwargs(settings),  # type: ignore[arg-type]  # the bus's fetch long-poll limit
        group_id=settings.topic("bench.raw"),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
    )
    producer = AIOKafkaProducer(**client_kwargs(settings), acks="all", enable_idempotence=False)  # type: ignore[arg-type]
    return consumer, producer


async def _raw_hop(settings: Any, stop: asyncio.Event) -> dict[str, int]:
    source, sink = _raw_topics(settings)
    # A ready-made output of the framework's size: the raw arm does no serialisation at all.
    value, headers = _raw_output(settings)
    consumer, producer = _raw_clients(settings, source)
    await consumer.start()
    await producer.start()
    counters = {"handled": 0}

    async def loop() -> None:
        while True:
            record = await consumer.getone()
            await producer.send_and_wait(sink, value, key=record.key, headers=headers)
            await consumer.commit()  # per message, after the output is acknowledged: the bus's policy
            counters["handled"] += 1

    async def batches() -> None:
        while True:
            got = await consumer.getmany(timeout_ms=1000, max_records=_batch())
            records = [r for rs in got.values() for r in rs]
            sent = [await producer.send(sink, value, key=r.key, headers=headers) for r in records]
            await asyncio.gather(*sent)
            if records:
                await consumer.commit()  # once per batch, after every output is acknowledged
            counters["handled"] += len(records)

    task = asyncio.create_task(batches() if _batch() > 1 else loop())
    print(READY, flush=True)
    try:
        await stop.wait()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await producer.stop()
        await consumer.stop()
    return counters


def _hop_main(arm: str) -> None:
    """Entry point of a hop process: settings from `VL_*`, `ready` on stdout, SIGTERM stops it."""
    from visionloop.libs.settings import Settings

    settings = Settings()
    hop = {"framework": _framework_hop, "raw": _raw_hop}[arm]

    async def main() -> dict[str, int]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await hop(settings, stop)

    profile_dir = os.environ.get("VL_BENCH_PROFILE")
    profiler = cProfile.Profile() if profile_dir else None
    if profiler is not None:
        profiler.enable()
    counters = asyncio.run(main())
    if profiler is not None:
        profiler.disable()
        Path(profile_dir).mkdir(parents=True, exist_ok=True)  # type: ignore[arg-type]
        profiler.dump_stats(str(Path(profile_dir) / f"{arm}.prof"))  # type: ignore[arg-type]
    print(json.dumps(counters), flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1] in ARMS:
        _hop_main(sys.argv[1])
    else:
        sys.exit("usage: python -m visionloop.bench.bus_hop {raw|framework}  (run by `visionloop bench bus`)")
